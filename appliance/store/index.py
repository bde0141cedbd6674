"""The chunk index: where each stored chunk lives, and which packs are committed.

Both tables live in the store's LMDB environment. Callers pass the transaction so
that an ingest can commit its chunks, packs and restore point in one atomic step.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import lmdb

_LOCATION = struct.Struct("<QQII")  # pack id, record offset, record length, raw length
_PACK = struct.Struct("<QQ")  # sealed size, record count
_PACK_KEY = struct.Struct(">Q")  # big-endian so LMDB iterates packs in id order


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """A chunk's record in a pack: `record_length` includes the record header."""

    pack_id: int
    offset: int
    record_length: int
    raw_length: int


@dataclass(frozen=True, slots=True)
class PackInfo:
    pack_id: int
    size: int
    records: int


class ChunkIndex:
    """Typed access to the `chunks` and `packs` tables."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._chunks = env.open_db(b"chunks")
        self._packs = env.open_db(b"packs")

    def lookup(self, txn: lmdb.Transaction, cid: bytes) -> ChunkLocation | None:
        raw = txn.get(cid, db=self._chunks)
        return None if raw is None else ChunkLocation(*_LOCATION.unpack(raw))

    def add(self, txn: lmdb.Transaction, cid: bytes, location: ChunkLocation) -> None:
        txn.put(
            cid,
            _LOCATION.pack(location.pack_id, location.offset, location.record_length, location.raw_length),
            db=self._chunks,
        )

    def remove(self, txn: lmdb.Transaction, cid: bytes) -> None:
        txn.delete(cid, db=self._chunks)

    def chunks(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, ChunkLocation]]:
        with txn.cursor(db=self._chunks) as cursor:
            for key, value in cursor:
                yield bytes(key), ChunkLocation(*_LOCATION.unpack(value))

    def count(self, txn: lmdb.Transaction) -> int:
        return int(txn.stat(self._chunks)["entries"])

    def add_pack(self, txn: lmdb.Transaction, info: PackInfo) -> None:
        txn.put(_PACK_KEY.pack(info.pack_id), _PACK.pack(info.size, info.records), db=self._packs)

    def remove_pack(self, txn: lmdb.Transaction, pack_id: int) -> None:
        txn.delete(_PACK_KEY.pack(pack_id), db=self._packs)

    def packs(self, txn: lmdb.Transaction) -> list[PackInfo]:
        with txn.cursor(db=self._packs) as cursor:
            return [
                PackInfo(_PACK_KEY.unpack(key)[0], *_PACK.unpack(value)) for key, value in cursor
            ]
