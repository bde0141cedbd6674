"""Writing new packs on behalf of one store operation."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from appliance.store.chunks import ChunkLoader

from appliance.store.index import ChunkLocation, PackInfo
from appliance.store.packs import PackWriter
from appliance.store.repository import Store

PACK_TARGET_SIZE = 64 << 20


class PackSink:
    """The packs one writer (an ingest, a GC repack) produces.

    Rotates at a target size, seals, remembers where each chunk went, and can
    delete everything it wrote if the operation fails before its index commit.
    A full pack is sealed (fsync, rename) on a thread of its own while the next
    one fills: the fsync of 64 MiB takes as long as producing them, and on the
    producer's thread it would stall the whole pipeline behind it. `seal` waits
    for every pack, so nothing is committed before it is durable.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._writer: PackWriter | None = None
        self._records = 0
        self._sealing: list[Future[PackInfo]] = []
        self._sealer: ThreadPoolExecutor | None = None
        self.sealed: list[PackInfo] = []
        self.locations: dict[bytes, ChunkLocation] = {}

    def add(self, cid: bytes, record: bytes, raw_length: int) -> None:
        if self._writer is None:
            self._writer = self._store.packs.open_writer(self._store.allocate_pack_id())
            self._records = 0
        offset = self._writer.append(record)
        self._records += 1
        self.locations[cid] = ChunkLocation(self._writer.pack_id, offset, len(record), raw_length)
        if self._writer.size >= PACK_TARGET_SIZE:
            if self._sealer is None:
                self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-seal")
            self._sealing.append(self._sealer.submit(_sealed, self._writer, self._records))
            self._writer = None

    def seal(self) -> None:
        """Seal the pack being filled and wait for every pack to be durable (a failure is raised here)."""
        failure = self._gather()
        if failure is not None:
            raise failure
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self.sealed.append(_sealed(writer, self._records))

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None
        self._gather()
        for info in self.sealed:
            self._store.packs.delete(info.pack_id)

    def _gather(self) -> BaseException | None:
        """Wait for the packs being sealed; keep those that were, return the first failure."""
        wait(self._sealing)
        failures = [future.exception() for future in self._sealing if future.exception() is not None]
        self.sealed.extend(future.result() for future in self._sealing if future.exception() is None)
        self._sealing.clear()
        if self._sealer is not None:
            self._sealer.shutdown(wait=True)
            self._sealer = None
        return failures[0] if failures else None


def copy_records(store: Store, sink: PackSink, chunks: Iterable[tuple[bytes, ChunkLocation]]) -> None:
    """Copy chunks' records, each verified on the way, into `sink`'s packs (a repack, or a rescue)."""
    loader = ChunkLoader(store)
    for cid, location in chunks:
        header, record = loader.load_record(cid, location)
        sink.add(cid, record, header.raw_length)


def _sealed(writer: PackWriter, records: int) -> PackInfo:
    return PackInfo(writer.pack_id, writer.seal(), records)
