"""Damage to packs is caught by verify and by every read, never returned as data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.errors import IntegrityError
from appliance.ingest.backup import backup
from appliance.restore import restore_disk
from appliance.store import ReadPath, Store, open_store
from appliance.store.verify import verify
from tests.conftest import pack_bytes, replace_pack, write_image

pytestmark = pytest.mark.store_backends


def flipped(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1 :]


def test_clean_store_verifies(store: Store, tmp_path: Path) -> None:
    backup(store, "vm", [write_image(tmp_path / "d.img", 2 << 20)])
    report = verify(store, full=True)
    assert report.problems == [] and report.records == report.chunks > 0


def test_every_flipped_byte_is_caught(store_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Flip bytes across a whole pack (header, record headers, payloads, last byte)."""
    store = store_factory()
    image = write_image(tmp_path / "d.img", 1 << 20, seed=5)
    point = backup(store, "vm", [image])
    (pack_id,) = store.packs.list_packs()
    pack = pack_bytes(store, pack_id)
    size = len(pack)
    rng = random.Random(3)
    offsets = sorted(set(range(0, 128)) | {size - 1} | {rng.randrange(size) for _ in range(40)})
    store_path = store.path
    store.close()  # its pack backend still writes the damage: LMDB is what must not stay open twice
    for offset in offsets:
        replace_pack(store, pack_id, flipped(pack, offset))
        with open_store(store_path) as damaged:
            assert verify(damaged).problems, f"flip at {offset} not found by verify"
            with pytest.raises(IntegrityError, match=r"restore point|pack"):
                restore_disk(damaged, point, 0, tmp_path / f"out-{offset}.img")
            assert not (tmp_path / f"out-{offset}.img").exists()
    replace_pack(store, pack_id, pack)
    with open_store(store_path) as healed:
        assert verify(healed, full=True).problems == []


def test_integrity_error_names_point_and_offset(store: Store, tmp_path: Path) -> None:
    image = write_image(tmp_path / "d.img", 1 << 20, seed=5)
    point = backup(store, "vm", [image])
    (pack_id,) = store.packs.list_packs()
    pack = pack_bytes(store, pack_id)
    replace_pack(store, pack_id, flipped(pack, len(pack) - 1))

    with ReadPath(store) as read_path, pytest.raises(IntegrityError) as caught:
        read_path.read(point, 0, 0, 1 << 20)
    assert point.id in str(caught.value) and "offset" in str(caught.value)


def test_missing_pack_is_reported(store: Store, tmp_path: Path) -> None:
    backup(store, "vm", [write_image(tmp_path / "d.img", 1 << 20)])
    (pack_id,) = store.packs.list_packs()
    replace_pack(store, pack_id, None)
    problems = verify(store).problems
    assert any("missing" in p and store.packs.name_of(pack_id) in p for p in problems)


def test_truncated_pack_is_an_error_not_data(store: Store, tmp_path: Path) -> None:
    point = backup(store, "vm", [write_image(tmp_path / "d.img", 1 << 20, seed=4)])
    (pack_id,) = store.packs.list_packs()
    replace_pack(store, pack_id, pack_bytes(store, pack_id)[: -5000])
    assert any(store.packs.name_of(pack_id) in p for p in verify(store).problems)
    with ReadPath(store) as read_path, pytest.raises(IntegrityError, match="truncated"):
        read_path.read(point, 0, 0, 1 << 20)
