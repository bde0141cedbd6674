"""Verify: prove every committed byte and every reference of the store sound.

Three passes:

1. Walk each listed pack front to back: header checksum, then every record's
   checksum (live or not). After a damaged record its length cannot be trusted, so the
   walk resumes at the next record the index knows in that pack.
2. Every index entry must name a record the walk found intact, holding that chunk.
   With `full`, each such record is also decompressed and re-hashed (BLAKE3).
3. Every chunk map entry must name an indexed chunk.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from appliance.errors import IntegrityError
from appliance.store import formats
from appliance.store.catalog import map_entries
from appliance.store.chunks import ChunkLoader
from appliance.store.index import ChunkLocation, PackInfo
from appliance.store.repository import Store

MAX_LISTED_PROBLEMS = 50


@dataclass(slots=True)
class VerifyReport:
    packs: int = 0
    records: int = 0
    chunks: int = 0
    map_entries: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)


def _walk_pack(
    store: Store, info: PackInfo, known_offsets: list[int], report: VerifyReport
) -> dict[int, bytes]:
    """Intact records of a pack, as offset -> chunk id; damage goes to `report`."""
    where = store.packs.name_of(info.pack_id)
    intact: dict[int, bytes] = {}
    try:
        size = store.packs.pack_size(info.pack_id)
    except IntegrityError as exc:
        report.problem(str(exc))
        return intact
    if size != info.size:
        report.problem(f"{where}: size {size} differs from the committed size {info.size}")
    try:
        header = store.packs.read_range(info.pack_id, 0, formats.PACK_HEADER_SIZE)
        formats.check_pack_header(header, info.pack_id, where)
    except IntegrityError as exc:
        report.problem(str(exc))
    offset = formats.PACK_HEADER_SIZE
    while offset < info.size:
        try:
            head = store.packs.read_range(info.pack_id, offset, formats.RECORD_HEADER_SIZE)
            length = formats.RECORD_HEADER_SIZE + formats.decode_record_header(head, where).stored_length
            if offset + length > info.size:
                raise IntegrityError(f"{where} offset {offset}: record runs past the end of the pack")
            record = store.packs.read_range(info.pack_id, offset, length)
            intact[offset] = formats.check_record(record, f"{where} offset {offset}").chunk_id
            report.records += 1
            offset += length
        except IntegrityError as exc:
            report.problem(str(exc))
            resume = bisect.bisect_right(known_offsets, offset)
            if resume == len(known_offsets):
                break
            offset = known_offsets[resume]
    return intact


def verify(store: Store, full: bool = False, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    report = VerifyReport()
    with store.reader_lock(), store.env.begin() as txn:
        packs = store.index.packs(txn)
        by_pack: dict[int, list[tuple[bytes, ChunkLocation]]] = defaultdict(list)
        for cid, location in store.index.chunks(txn):
            by_pack[location.pack_id].append((cid, location))
        listed = {p.pack_id for p in packs}
        loader = ChunkLoader(store)
        total = sum(p.size for p in packs)
        done = 0
        for info in packs:
            entries = sorted(by_pack.get(info.pack_id, []), key=lambda e: e[1].offset)
            intact = _walk_pack(store, info, [loc.offset for _, loc in entries], report)
            report.packs += 1
            for cid, location in entries:
                report.chunks += 1
                if intact.get(location.offset) != cid:
                    report.problem(
                        f"chunk {cid.hex()[:16]}: no intact record at pack {location.pack_id:016x} "
                        f"offset {location.offset}"
                    )
                elif full:
                    try:
                        header, record = loader.load_record(cid, location)
                        data = loader.decode(header, record, f"pack {location.pack_id:016x} offset {location.offset}")
                        if formats.chunk_id(data) != cid:
                            raise IntegrityError(f"chunk {cid.hex()[:16]}: content does not hash to its id")
                    except IntegrityError as exc:
                        report.problem(str(exc))
            done += info.size
            if progress is not None:
                progress(done, total)
        for pack_id in by_pack.keys() - listed:
            report.problem(f"{len(by_pack[pack_id])} chunks point into pack {pack_id:016x}, which is not committed")
        for point_id, disk, chunk_map in store.catalog.chunk_maps(txn):
            missing = 0
            for slot, cid in enumerate(map_entries(chunk_map)):
                report.map_entries += 1
                if cid != formats.ZERO_CHUNK_ID and store.index.lookup(txn, cid) is None:
                    missing += 1
                    if missing == 1:
                        report.problem(
                            f"restore point {point_id} disk {disk}: chunk at offset "
                            f"{slot * store.config.chunk_size} is missing from the index"
                        )
            if missing > 1:
                report.problem(f"restore point {point_id} disk {disk}: {missing} missing chunks in all")
    return report
