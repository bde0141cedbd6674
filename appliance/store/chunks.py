"""Loading stored chunks: index lookup, pack read, checksum check, decompression.

Every read verifies the record's xxh3 checksum and that the record holds the chunk
that was asked for; a mismatch raises IntegrityError and no byte of it is returned.
Chunks asked for together (`load_many`) whose records lie next to each other in a pack
are read with one request: a disk's consecutive chunks were written side by side, and
with packs in S3 a request costs far more than the bytes it carries.
`statistics()` counts the loads and the refused ones, so damage found while serving
shows up in metrics as well as in the log and the reader's I/O error.
Thread-safe: LMDB read transactions and zstd decompressors are per call / per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from appliance.errors import IntegrityError
from appliance.store import formats
from appliance.store.index import ChunkLocation
from appliance.store.repository import Store

#: Records at most this far apart in a pack are read by one request (the gap is read and dropped).
MERGE_GAP_BYTES = 64 << 10
#: One merged request reads at most this much.
MERGE_LIMIT_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class LoaderStatistics:
    chunks_loaded: int  # chunks read from packs and decompressed by `load`
    integrity_failures: int  # `load` calls refused with IntegrityError (checksum, header, index)


class ChunkLoader:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._local = threading.local()
        self._sound_packs: set[int] = set()
        self._counts_lock = threading.Lock()
        self._loaded = 0
        self._failures = 0

    def statistics(self) -> LoaderStatistics:
        with self._counts_lock:
            return LoaderStatistics(self._loaded, self._failures)

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    def _check_pack(self, pack_id: int) -> None:
        """Check a pack's header once per loader, so damage there is never missed."""
        if pack_id not in self._sound_packs:
            header = self._store.packs.read_range(pack_id, 0, formats.PACK_HEADER_SIZE)
            formats.check_pack_header(header, pack_id, f"pack {pack_id:016x}")
            self._sound_packs.add(pack_id)

    def load_record(self, cid: bytes, location: ChunkLocation) -> tuple[formats.RecordHeader, bytes]:
        """The verified record of `cid`: its header and its stored payload."""
        where = f"pack {location.pack_id:016x} offset {location.offset}"
        self._check_pack(location.pack_id)
        record = self._store.packs.read_range(location.pack_id, location.offset, location.record_length)
        return _checked(record, cid, where), record

    def decode(self, header: formats.RecordHeader, record: bytes | memoryview, where: str) -> bytes:
        """The uncompressed chunk bytes of a verified record."""
        payload = memoryview(record)[formats.RECORD_HEADER_SIZE :]
        if header.compression == formats.COMPRESSION_NONE:
            data = bytes(payload)
        else:
            try:
                data = self._decompressor().decompress(payload, max_output_size=header.raw_length)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{where}: cannot decompress chunk: {exc}") from None
        if len(data) != header.raw_length:
            raise IntegrityError(f"{where}: chunk decompressed to {len(data)} bytes, expected {header.raw_length}")
        return data

    def load(self, cid: bytes) -> bytes:
        """The verified, decompressed bytes of `cid` (counted in `statistics()`)."""
        result = self.load_many([cid])[cid]
        if isinstance(result, IntegrityError):
            raise result
        return result

    def load_many(self, cids: list[bytes]) -> dict[bytes, bytes | IntegrityError]:
        """Each chunk's verified bytes, or the IntegrityError that refused it (one chunk's damage
        never fails the others); neighbouring records are read by one request."""
        results: dict[bytes, bytes | IntegrityError] = {}
        located = []
        with self._store.env.begin() as txn:
            for cid in cids:
                location = self._store.index.lookup(txn, cid)
                if location is None:
                    results[cid] = IntegrityError(f"chunk {cid.hex()[:16]} is referenced but not in the index")
                else:
                    located.append((cid, location))
        for run in _runs(sorted(located, key=lambda item: (item[1].pack_id, item[1].offset))):
            results.update(self._load_run(run))
        failures = sum(isinstance(result, IntegrityError) for result in results.values())
        with self._counts_lock:
            self._loaded += len(results) - failures
            self._failures += failures
        return results

    def _load_run(self, run: list[tuple[bytes, ChunkLocation]]) -> Iterator[tuple[bytes, bytes | IntegrityError]]:
        pack_id, start = run[0][1].pack_id, run[0][1].offset
        end = run[-1][1].offset + run[-1][1].record_length
        try:
            self._check_pack(pack_id)
            blob = memoryview(self._store.packs.read_range(pack_id, start, end - start))
        except IntegrityError as exc:
            for cid, _ in run:
                yield cid, exc
            return
        for cid, location in run:
            where = f"pack {pack_id:016x} offset {location.offset}"
            try:
                record = blob[location.offset - start : location.offset - start + location.record_length]
                yield cid, self.decode(_checked(record, cid, where), record, where)
            except IntegrityError as exc:
                yield cid, exc


def _checked(record: bytes | memoryview, cid: bytes, where: str) -> formats.RecordHeader:
    """The header of a record whose checksum holds and which holds chunk `cid`."""
    header = formats.check_record(record, where)
    if header.chunk_id != cid:
        raise IntegrityError(f"{where}: record holds chunk {header.chunk_id.hex()[:16]}, not {cid.hex()[:16]}")
    return header


def _runs(located: list[tuple[bytes, ChunkLocation]]) -> Iterator[list[tuple[bytes, ChunkLocation]]]:
    """Records sorted by pack and offset, cut into runs that one request can read."""
    run: list[tuple[bytes, ChunkLocation]] = []
    for cid, location in located:
        if run:
            first, last = run[0][1], run[-1][1]
            gap = location.offset - (last.offset + last.record_length)
            if (location.pack_id != last.pack_id or not 0 <= gap <= MERGE_GAP_BYTES
                    or location.offset + location.record_length - first.offset > MERGE_LIMIT_BYTES):
                yield run
                run = []
        run.append((cid, location))
    if run:
        yield run
