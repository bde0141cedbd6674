"""Writing new packs on behalf of one store operation."""

from __future__ import annotations

from appliance.store.index import ChunkLocation, PackInfo
from appliance.store.packs import PackWriter
from appliance.store.repository import Store

PACK_TARGET_SIZE = 64 << 20


class PackSink:
    """The packs one writer (an ingest, a GC repack) produces.

    Rotates at a target size, seals, remembers where each chunk went, and can
    delete everything it wrote if the operation fails before its index commit.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._writer: PackWriter | None = None
        self._records = 0
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
            self.seal()

    def seal(self) -> None:
        if self._writer is not None:
            size = self._writer.seal()
            self.sealed.append(PackInfo(self._writer.pack_id, size, self._records))
            self._writer = None

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None
        for info in self.sealed:
            self._store.packs.delete(info.pack_id)
