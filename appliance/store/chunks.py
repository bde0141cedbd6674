"""Loading stored chunks: index lookup, pack read, checksum check, decompression.

Every read verifies the record's xxh3 checksum and that the record holds the chunk
that was asked for; a mismatch raises IntegrityError and no byte of it is returned.
`statistics()` counts the loads and the refused ones, so damage found while serving
shows up in metrics as well as in the log and the reader's I/O error.
Thread-safe: LMDB read transactions and zstd decompressors are per call / per thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import zstandard

from appliance.errors import IntegrityError
from appliance.store import formats
from appliance.store.index import ChunkLocation
from appliance.store.repository import Store


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

    def locate(self, cid: bytes) -> ChunkLocation:
        with self._store.env.begin() as txn:
            location = self._store.index.lookup(txn, cid)
        if location is None:
            raise IntegrityError(f"chunk {cid.hex()[:16]} is referenced but not in the index")
        return location

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
        header = formats.check_record(record, where)
        if header.chunk_id != cid:
            raise IntegrityError(f"{where}: record holds chunk {header.chunk_id.hex()[:16]}, not {cid.hex()[:16]}")
        return header, record

    def decode(self, header: formats.RecordHeader, record: bytes, where: str) -> bytes:
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
        try:
            location = self.locate(cid)
            header, record = self.load_record(cid, location)
            data = self.decode(header, record, f"pack {location.pack_id:016x} offset {location.offset}")
        except IntegrityError:
            with self._counts_lock:
                self._failures += 1
            raise
        with self._counts_lock:
            self._loaded += 1
        return data
