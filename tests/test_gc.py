"""Prune and GC: survivors stay byte-identical, garbage goes, crashes are harmless."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from appliance.errors import NotFound, UsageError
from appliance.ingest.backup import backup
from appliance.store import Store
from appliance.protection.retention import Retention
from appliance.store.gc import collect_garbage, prune
from appliance.store.stats import store_statistics
from appliance.store.verify import verify
from tests.conftest import record_holding, sha256_of, write_image
from tests.test_backup import mutate, restore_sha

pytestmark = pytest.mark.store_backends


def test_prune_keeps_survivors_identical_and_reclaims(store: Store, tmp_path: Path) -> None:
    image = write_image(tmp_path / "disk.img", 4 << 20, seed=21)
    rng = random.Random(2)
    digests, points = [], []
    for day in range(6):
        if day:
            areas = tmp_path / f"a{day}.json"
            areas.write_text(json.dumps({"changedArea": mutate(image, rng, 0.2)}))
            points.append(backup(store, "vm", [image], parent_ref="latest", changed_areas=[areas]))
        else:
            points.append(backup(store, "vm", [image]))
        digests.append(sha256_of(image))
    other = backup(store, "other", [write_image(tmp_path / "o.img", 1 << 20, seed=99)])
    before = store_statistics(store)
    removed, report = prune(store, "vm", Retention(keep_last=2))
    assert [p.id for p in removed] == [p.id for p in points[:4]]
    assert report.removed_chunks > 0 and report.reclaimed_bytes > 0
    after = store_statistics(store)
    assert after.stored_bytes < before.stored_bytes and after.points == 3
    for point, digest in zip(points[4:], digests[4:]):
        assert restore_sha(store, point.id, "vm", 0, tmp_path) == digest
    assert restore_sha(store, other.id, "other", 0, tmp_path) == sha256_of(tmp_path / "o.img")
    assert verify(store, full=True).problems == []
    # GC is idempotent once nothing is garbage.
    again = collect_garbage(store)
    assert again.removed_chunks == 0 and again.deleted_packs == 0


def test_gc_removes_leftovers_of_a_crashed_ingest(store: Store, tmp_path: Path) -> None:
    point = backup(store, "vm", [write_image(tmp_path / "d.img", 1 << 20)])
    orphan = store.packs.open_writer(store.allocate_pack_id())
    orphan.append(record_holding(b"x" * 100))
    orphan.seal()
    unsealed = store.packs.open_writer(store.allocate_pack_id())
    unsealed.append(record_holding(b"y" * 100))
    report = collect_garbage(store)
    assert report.deleted_packs == 1
    assert list(store.packs.list_unsealed()) == []
    assert restore_sha(store, point.id, "vm", 0, tmp_path) == sha256_of(tmp_path / "d.img")


def test_gc_defers_deletion_while_readers_are_active(store: Store, tmp_path: Path) -> None:
    backup(store, "vm", [write_image(tmp_path / "a.img", 1 << 20, seed=1)])
    backup(store, "vm", [write_image(tmp_path / "b.img", 1 << 20, seed=2)])
    with store.reader_lock():
        _, report = prune(store, "vm", Retention(keep_last=1))
    assert report.deferred_packs == 1 and report.deleted_packs == 0
    assert collect_garbage(store).deleted_packs == 1


@pytest.mark.parametrize("vm, keep, error", [("nobody", 1, NotFound), ("vm", 0, UsageError)])
def test_prune_refuses_bad_requests(store: Store, tmp_path: Path, vm: str, keep: int, error: type) -> None:
    backup(store, "vm", [write_image(tmp_path / "d.img", 1 << 20)])
    with pytest.raises(error):
        prune(store, vm, Retention(keep_last=keep))
