"""Ingest round trips, incremental chains, dedup and bad input."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
from pathlib import Path

import pytest

from appliance.errors import AlreadyExists, ChangedAreasError, NotFound, SourceError, UsageError
from appliance.ingest.backup import backup
from appliance.restore import restore_disk
from appliance.store import Store, writer
from appliance.store.catalog import new_point_id
from appliance.store.stats import store_statistics
from tests.conftest import BLOCK, mixed_image, sha256_of, write_image

pytestmark = pytest.mark.store_backends


def restore_sha(store: Store, point_id: str, vm: str, disk: int, tmp_path: Path) -> str:
    with store.env.begin() as txn:
        point = store.catalog.resolve(txn, vm, point_id)
    output = tmp_path / f"restored-{point.id}-{disk}.img"
    restore_disk(store, point, disk, output)
    return sha256_of(output)


def qemu_convert(raw: Path, subformat: str) -> Path:
    out = raw.with_name(f"{raw.stem}-{subformat}.vmdk")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", str(raw), str(out)],
        check=True,
    )
    return out


@pytest.mark.parametrize("subformat", [None, "monolithicFlat", "streamOptimized", "monolithicSparse"])
def test_round_trip_is_byte_identical(store: Store, tmp_path: Path, subformat: str | None) -> None:
    raw = write_image(tmp_path / "disk.img", 5 * BLOCK * 16 + 3 * 512, seed=1)
    source = raw if subformat is None else qemu_convert(raw, subformat)
    point = backup(store, "vm1", [source])
    expected_format = {None: "raw", "monolithicFlat": "vmdk-flat", "streamOptimized": "vmdk-stream",
                       "monolithicSparse": "vmdk-sparse"}[subformat]
    assert point.disks[0].source_format == expected_format
    assert point.disks[0].size == raw.stat().st_size
    assert restore_sha(store, point.id, "vm1", 0, tmp_path) == sha256_of(raw)


def test_several_disks_and_config_files(store: Store, tmp_path: Path) -> None:
    disks = [write_image(tmp_path / f"d{n}.img", (n + 1) * 1024 * 1024, seed=n) for n in range(3)]
    vmx = tmp_path / "vm.vmx"
    vmx.write_text('displayName = "web01"\n')
    point = backup(store, "web01", disks, config_files={".vmx": vmx})
    assert [d.name for d in point.disks] == ["web01", "web01_1", "web01_2"]
    for n, disk in enumerate(disks):
        assert restore_sha(store, point.id, "web01", n, tmp_path) == sha256_of(disk)
    with store.env.begin() as txn:
        assert store.catalog.file(txn, point, "web01.vmx") == vmx.read_bytes()


def mutate(image: Path, rng: random.Random, fraction: float) -> list[dict[str, int]]:
    """Overwrite ~fraction of 4 KiB blocks in clustered runs; returns changed areas."""
    size = image.stat().st_size
    areas = []
    with open(image, "r+b") as handle:
        for _ in range(max(1, int(size / 4096 * fraction / 8))):
            start = rng.randrange(0, size // 4096 - 8) * 4096
            handle.seek(start)
            handle.write(rng.randbytes(8 * 4096))
            areas.append({"start": start, "length": 8 * 4096})
    return areas


def test_incremental_chain_of_ten_restores_exactly(store: Store, tmp_path: Path) -> None:
    image = write_image(tmp_path / "disk.img", 4 << 20, seed=3)
    rng = random.Random(5)
    expected = [sha256_of(image)]
    points = [backup(store, "db", [image])]
    for day in range(1, 10):
        areas = tmp_path / f"day{day}.json"
        areas.write_text(json.dumps({"changedArea": mutate(image, rng, 0.02)}))
        points.append(backup(store, "db", [image], parent_ref=points[-1].id, changed_areas=[areas]))
        expected.append(sha256_of(image))
        assert points[-1].stats["read_bytes"] < image.stat().st_size / 2
    for point, digest in zip(points, expected):
        assert restore_sha(store, point.id, "db", 0, tmp_path) == digest
    assert points[3].parent == points[2].id


def test_incremental_handles_a_grown_disk(store: Store, tmp_path: Path) -> None:
    image = write_image(tmp_path / "disk.img", 1 << 20, seed=4)
    first = backup(store, "grow", [image])
    with open(image, "ab") as handle:
        handle.write(random.Random(1).randbytes(300 * 1024 + 512))
    areas = tmp_path / "none.json"
    areas.write_text(json.dumps({"changedArea": []}))
    second = backup(store, "grow", [image], parent_ref=first.id, changed_areas=[areas])
    assert second.disks[0].size == image.stat().st_size
    assert restore_sha(store, second.id, "grow", 0, tmp_path) == sha256_of(image)


def test_dedup_across_vms_shares_chunks(store: Store, tmp_path: Path) -> None:
    image = write_image(tmp_path / "golden.img", 2 << 20, seed=9)
    backup(store, "a", [image])
    before = store_statistics(store)
    backup(store, "b", [image])
    after = store_statistics(store)
    assert after.chunks == before.chunks
    assert after.stored_bytes == before.stored_bytes
    assert after.referenced_bytes == 2 * before.referenced_bytes
    assert after.dedup_ratio == pytest.approx(2 * before.dedup_ratio)


def test_referenced_bytes_are_counted_at_commit_and_from_the_maps_of_older_points(store: Store,
                                                                                  tmp_path: Path) -> None:
    image = tmp_path / "mixed.img"
    image.write_bytes(mixed_image(3))  # a zero region, and data in the short last chunk
    data = image.read_bytes()
    size = store.config.chunk_size
    expected = sum(len(data[at : at + size]) for at in range(0, len(data), size) if data[at : at + size].strip(b"\0"))
    point = backup(store, "a", [image, image])
    assert point.stats["referenced_bytes"] == 2 * expected
    assert store_statistics(store).referenced_bytes == 2 * expected

    with store.env.begin(write=True) as txn:  # as a point committed before points carried the count
        maps = [store.catalog.chunk_map(txn, point, disk) for disk in range(2)]
        stats = {key: value for key, value in point.stats.items() if key != "referenced_bytes"}
        older = dataclasses.replace(point, id=new_point_id(point.created - 86400), created=point.created - 86400,
                                    stats=stats)
        store.catalog.add_point(txn, older, maps, {})
    assert store_statistics(store).referenced_bytes == 4 * expected


def test_a_point_id_is_never_taken_twice(store: Store, tmp_path: Path) -> None:
    image = write_image(tmp_path / "a.img", 1 << 20, seed=1)
    point = backup(store, "a", [image])
    with store.env.begin(write=True) as txn:
        chunk_map = store.catalog.chunk_map(txn, point, 0)
        # 2000 points of one second: with 16 random bits, ids drawn blindly would collide (birthday bound)
        for _ in range(2000):
            made = dataclasses.replace(point, id=store.catalog.unused_point_id(txn, point.created))
            store.catalog.add_point(txn, made, [chunk_map], {})
    with pytest.raises(AlreadyExists), store.env.begin(write=True) as txn:
        store.catalog.add_point(txn, point, [bytes(len(chunk_map))], {})
    assert restore_sha(store, point.id, "a", 0, tmp_path) == sha256_of(image)


def test_zero_chunks_are_not_stored(store: Store, tmp_path: Path) -> None:
    image = tmp_path / "empty.img"
    image.write_bytes(b"")
    with open(image, "wb") as handle:
        handle.truncate(8 << 20)
    point = backup(store, "empty", [image])
    assert store_statistics(store).chunks == 0
    assert restore_sha(store, point.id, "empty", 0, tmp_path) == sha256_of(image)


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"changedArea": [{"start": 0, "length": (1 << 20) + 1}]}, "past the end"),
        ({"changedArea": [{"start": -1, "length": 10}]}, "non-negative"),
        ({"changedArea": [{"start": "0", "length": 10}]}, "non-negative"),
        ({"areas": []}, "no 'changedArea'"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_changed_areas_are_refused(store: Store, tmp_path: Path, doc: object, message: str) -> None:
    image = write_image(tmp_path / "disk.img", 1 << 20)
    parent = backup(store, "vm", [image])
    areas = tmp_path / "areas.json"
    areas.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ChangedAreasError, match=message):
        backup(store, "vm", [image], parent_ref=parent.id, changed_areas=[areas])
    with store.env.begin() as txn:
        assert [p.id for p in store.catalog.points(txn)] == [parent.id]


def test_bad_requests(store: Store, tmp_path: Path) -> None:
    image = write_image(tmp_path / "disk.img", 1 << 20)
    with pytest.raises(SourceError, match="missing.img"):
        backup(store, "vm", [tmp_path / "missing.img"])
    with pytest.raises(NotFound, match="unknown VM"):
        backup(store, "vm", [image], parent_ref="latest")
    backup(store, "vm", [image])
    with pytest.raises(NotFound, match="no restore point"):
        backup(store, "vm", [image], parent_ref="nope")
    with pytest.raises(UsageError, match="one per disk"):
        backup(store, "vm", [image, image], parent_ref="latest", changed_areas=[tmp_path / "x.json"])
    with store.env.begin() as txn:
        assert len(store.catalog.points(txn)) == 1


def test_failed_ingest_leaves_no_packs(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that turns out corrupt mid-read (after packs were sealed) rolls back all."""
    good = write_image(tmp_path / "good.img", 1 << 20, seed=2)
    bad_raw = write_image(tmp_path / "bad.img", 4 << 20, seed=3)
    bad = qemu_convert(bad_raw, "streamOptimized")
    data = bytearray(bad.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 4096, 97):
        data[offset] ^= 0xFF
    bad.write_bytes(bytes(data))
    # Seal packs as we go, so some are sealed before the failure.
    monkeypatch.setattr(writer, "PACK_TARGET_SIZE", 64 << 10)
    with pytest.raises(SourceError, match="grain"):
        backup(store, "vm", [good, bad])
    assert list(store.packs.list_packs()) == []
    assert list(store.packs.list_unsealed()) == []
    with store.env.begin() as txn:
        assert store.catalog.points(txn) == [] and store.index.packs(txn) == []
