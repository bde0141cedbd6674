"""A store's index rebuilt from its packs and manifests, and several gateways sharing one bucket (real SeaweedFS)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from appliance.errors import StoreBusy
from appliance.ingest.backup import backup
from appliance.protection.retention import Retention
from appliance.store import Store, init_store, open_store
from appliance.store.catalog import referenced_chunks
from appliance.store.gateways import GATEWAY_SHIFT, condemned_packs
from appliance.store.gc import collect_garbage, prune
from appliance.store.manifests import ManifestShelf
from appliance.store.refresh import rebuild_index, refresh
from appliance.store.verify import verify
from tests.conftest import run_cli, sha256_of, write_image
from tests.s3_engines import S3Engine
from tests.test_backup import mutate, restore_sha
from tests.test_nfs_serve import Serve

MIB = 1 << 20


def points_of(store: Store) -> dict[str, str]:
    with store.env.begin() as txn:
        return {point.id: point.vm for point in store.catalog.points(txn)}


@pytest.mark.store_backends
def test_rebuild_index_brings_back_every_point(store_factory: Callable[..., Store], tmp_path: Path) -> None:
    import random

    store = store_factory()
    first = write_image(tmp_path / "a.img", 4 * MIB, seed=1)
    base = backup(store, "alpha", [first], config_files={".vmx": _vmx(tmp_path)})
    areas = tmp_path / "areas.json"
    areas.write_text(json.dumps({"changedArea": mutate(first, random.Random(3), 0.1)}))
    child = backup(store, "alpha", [first], parent_ref=base.id, changed_areas=[areas])
    other = backup(store, "beta", [write_image(tmp_path / "b.img", 2 * MIB, seed=2)])
    expected = {p.id: restore_sha(store, p.id, p.vm, 0, tmp_path) for p in (base, child, other)}
    path = store.path
    store.close()

    with open_store(path) as serving, serving.reader_lock(), pytest.raises(StoreBusy):
        rebuild_index(path)
    (path / "index" / "data.mdb").write_bytes(b"not an LMDB file")  # a damaged index
    report, aside = rebuild_index(path)
    assert aside is not None and aside.name.startswith("index.replaced-")
    assert (report.points_added, report.incomplete, report.damaged) == (3, [], [])
    with open_store(path) as rebuilt:
        assert points_of(rebuilt) == {base.id: "alpha", child.id: "alpha", other.id: "beta"}
        assert {p: restore_sha(rebuilt, p, vm, 0, _out(tmp_path, "rebuilt")) for p, vm in points_of(rebuilt).items()} \
            == expected
        with rebuilt.env.begin() as txn:
            assert rebuilt.catalog.get_point(txn, child.id).parent == base.id
            point = rebuilt.catalog.get_point(txn, base.id)
            assert rebuilt.catalog.file(txn, point, "alpha.vmx") == b'displayName = "alpha"\n'
        assert verify(rebuilt, full=True).problems == []
        # New packs never reuse the ids of packs the lost index knew.
        later = backup(rebuilt, "gamma", [write_image(tmp_path / "c.img", 1 * MIB, seed=9)])
        assert restore_sha(rebuilt, later.id, "gamma", 0, tmp_path) == sha256_of(tmp_path / "c.img")


def _out(tmp_path: Path, name: str) -> Path:
    """A directory of its own for restores of the same point from another index or gateway."""
    (tmp_path / name).mkdir(exist_ok=True)
    return tmp_path / name


def _vmx(tmp_path: Path) -> Path:
    vmx = tmp_path / "alpha.vmx"
    vmx.write_text('displayName = "alpha"\n')
    return vmx


@pytest.mark.store_backends
def test_a_damaged_manifest_is_named_and_its_point_left_out(store_factory: Callable[..., Store],
                                                             tmp_path: Path) -> None:
    store = store_factory()
    good = backup(store, "vm", [write_image(tmp_path / "a.img", 1 * MIB, seed=1)])
    bad = backup(store, "vm", [write_image(tmp_path / "b.img", 1 * MIB, seed=2)])
    name = ManifestShelf.name_of(bad.id)
    data = bytearray(store.packs.get_object(name) or b"")
    data[-5] ^= 0xFF
    store.packs.put_object(name, bytes(data))
    path = store.path
    store.close()
    report, _ = rebuild_index(path)
    assert report.points_added == 1 and len(report.damaged) == 1
    assert f"manifests/{bad.id}.manifest: manifest checksum mismatch" in report.damaged[0]
    with open_store(path) as rebuilt:
        assert list(points_of(rebuilt)) == [good.id]


def _gateway(engine: S3Engine, prefix: str, path: Path, grace: float = 0.0, join: bool = False) -> Store:
    init_store(path, chunk_size=64 << 10, s3=engine.location(prefix), join=join, gc_grace_seconds=grace)
    store = open_store(path)
    if join:
        with store.writer_lock():
            refresh(store)
    return store


def test_two_gateways_share_one_bucket(s3_engine: S3Engine, tmp_path: Path) -> None:
    prefix = f"{uuid.uuid4().hex[:12]}/"
    first = _gateway(s3_engine, prefix, tmp_path / "a")
    image_a = write_image(tmp_path / "a.img", 3 * MIB, seed=1)
    point_a = backup(first, "alpha", [image_a])

    joined = run_cli("--store", str(tmp_path / "b"), "init", "--join", "--s3-endpoint", s3_engine.endpoint,
                     "--s3-bucket", "appliance", "--s3-prefix", prefix,
                     "--s3-credentials-file", str(s3_engine.credentials_file), check=True)
    assert "gateway 1" in joined.stdout and "1 points added" in joined.stdout
    second = open_store(tmp_path / "b")
    try:
        assert second.config.store_id == first.config.store_id and second.config.gateway == 1
        assert restore_sha(second, point_a.id, "alpha", 0, tmp_path) == sha256_of(image_a)
        image_b = write_image(tmp_path / "b.img", 2 * MIB, seed=2)
        point_b = backup(second, "beta", [image_b])
        assert all(p.pack_id >> GATEWAY_SHIFT == 1 for p in _packs(second) if p.pack_id not in _ids(first))

        with first.writer_lock():
            report = refresh(first)
        assert report.points_added == 1 and report.packs_added >= 1
        assert points_of(first) == points_of(second)
        assert restore_sha(first, point_b.id, "beta", 0, _out(tmp_path, "first")) == sha256_of(image_b)

        # A session on the second gateway keeps its point from a prune on the first.
        newer = backup(second, "beta", [write_image(tmp_path / "b2.img", 1 * MIB, seed=3)])
        with first.writer_lock():
            refresh(first)
        run_cli("--store", str(tmp_path / "b"), "session", "create", "--vm", "beta", "--point", point_b.id,
                "--name", "s1", check=True)
        removed, _ = prune(first, "beta", Retention(keep_last=1))
        assert removed == []
        run_cli("--store", str(tmp_path / "b"), "session", "delete", "s1", check=True)
        removed, _ = prune(first, "beta", Retention(keep_last=1))
        assert [p.id for p in removed] == [point_b.id]
        with second.writer_lock():
            assert refresh(second).points_dropped == 1
        assert sorted(points_of(second)) == sorted([point_a.id, newer.id])
    finally:
        second.close()
        first.close()


def _packs(store: Store) -> list:  # type: ignore[type-arg]
    with store.env.begin() as txn:
        return store.index.packs(txn)


def _ids(store: Store) -> set[int]:
    return {info.pack_id for info in _packs(store)}


def test_gc_deletes_after_the_grace_period_and_a_late_commit_keeps_its_chunks(s3_engine: S3Engine,
                                                                               tmp_path: Path) -> None:
    """The first gateway condemns the only pack of an image; the second, not yet refreshed, backs the same
    image up by reference to that pack. Its commit copies the chunks out, so deleting the pack a grace
    period later breaks nothing on either gateway."""
    grace = 3.0
    prefix = f"{uuid.uuid4().hex[:12]}/"
    first = _gateway(s3_engine, prefix, tmp_path / "a", grace)
    image = write_image(tmp_path / "shared.img", 2 * MIB, seed=7)
    doomed = backup(first, "alpha", [image])
    backup(first, "alpha", [write_image(tmp_path / "newer.img", 1 * MIB, seed=8)])
    second = _gateway(s3_engine, prefix, tmp_path / "b", join=True)
    try:
        assert second.config.gc_grace_seconds == grace
        removed, report = prune(first, "alpha", Retention(keep_last=1))
        assert [p.id for p in removed] == [doomed.id]
        condemned = condemned_packs(first.packs)
        assert condemned and report.deleted_packs == 0
        assert condemned <= set(first.packs.list_packs())  # still readable by every gateway

        late = backup(second, "beta", [image])  # dedups onto the condemned pack: the commit copies it out
        with second.env.begin() as txn:
            chunk_map = second.catalog.chunk_map(txn, late, 0)
            used = {second.index.lookup(txn, cid).pack_id for cid in referenced_chunks(chunk_map)}  # type: ignore[union-attr]
        assert used and not used & condemned

        assert collect_garbage(first).deleted_packs == 0  # within the grace period nothing goes
        time.sleep(grace)
        report = collect_garbage(first)
        assert report.deleted_packs == len(condemned)
        assert not condemned & set(first.packs.list_packs()) and condemned_packs(first.packs) == set()
        with second.writer_lock():
            refresh(second)
        for n, store in enumerate((first, second)):
            assert restore_sha(store, late.id, "beta", 0, _out(tmp_path, str(n))) == sha256_of(image)
            assert verify(store, full=True).problems == []
    finally:
        second.close()
        first.close()


def test_one_collector_at_a_time(s3_engine: S3Engine, tmp_path: Path) -> None:
    from appliance.store.gateways import release_gc_lease, take_gc_lease

    prefix = f"{uuid.uuid4().hex[:12]}/"
    first = _gateway(s3_engine, prefix, tmp_path / "a")
    second = _gateway(s3_engine, prefix, tmp_path / "b", join=True)
    try:
        lease = take_gc_lease(first.packs, first.config.gateway)
        with pytest.raises(StoreBusy, match="gateway 0 is collecting garbage"):
            collect_garbage(second)
        release_gc_lease(first.packs, lease)
        assert collect_garbage(second).deleted_packs == 0
    finally:
        second.close()
        first.close()


@pytest.mark.slow
def test_two_serving_gateways_show_each_others_points_over_nfs(s3_engine: S3Engine, tmp_path: Path) -> None:
    """Each gateway runs `serve`; a point backed up through one appears over NFS on the other without a restart,
    byte-identical, and goes when the first prunes it."""
    prefix = f"{uuid.uuid4().hex[:12]}/"
    flags = ["--s3-endpoint", s3_engine.endpoint, "--s3-bucket", "appliance", "--s3-prefix", prefix,
             "--s3-credentials-file", str(s3_engine.credentials_file), "--gc-grace-minutes", "0"]
    first, second = tmp_path / "a", tmp_path / "b"
    run_cli("--store", str(first), "init", *flags, check=True)
    run_cli("--store", str(second), "init", "--join", *flags, check=True)
    image = write_image(tmp_path / "disk.img", 2 * MIB, seed=11)
    older = run_cli("--store", str(first), "backup", "--vm", "web", str(image), check=True).stdout.split()[-1]
    servers = [Serve(first), Serve(second)]
    for server in servers:
        server.start()
    try:
        newer = run_cli("--store", str(first), "backup", "--vm", "web", str(image), check=True).stdout.split()[-1]
        listing = _wait_for(lambda: _nfs_ls(servers[1], "/restore-points/web"), lambda names: newer in names)
        assert older in listing
        flat = subprocess.run(["nfs-cat", servers[1].url(f"/restore-points/web/{newer}/web-flat.vmdk")],
                              capture_output=True, timeout=60, check=True)
        assert flat.stdout == image.read_bytes()
        run_cli("--store", str(first), "prune", "--vm", "web", "--keep-last", "1", check=True)
        _wait_for(lambda: _nfs_ls(servers[1], "/restore-points/web"), lambda names: older not in names)
    finally:
        for server in servers:
            assert server.stop() == 0


def _nfs_ls(server: Serve, path: str) -> list[str]:
    """The names in a directory; none while it does not exist yet."""
    listed = subprocess.run(["nfs-ls", server.url(path)], capture_output=True, text=True, timeout=30)
    return [line.split()[-1] for line in listed.stdout.splitlines() if line.strip()]


def _wait_for(probe: Callable[[], list[str]], done: Callable[[list[str]], bool], seconds: float = 30) -> list[str]:
    deadline = time.monotonic() + seconds
    while True:
        found = probe()
        if done(found) or time.monotonic() > deadline:
            assert done(found), f"still {found} after {seconds} s"
            return found
        time.sleep(0.5)


@pytest.mark.store_backends
def test_points_made_before_manifests_get_theirs_at_the_next_commit(store_factory: Callable[..., Store],
                                                                     tmp_path: Path) -> None:
    store = store_factory()
    old = backup(store, "vm", [write_image(tmp_path / "a.img", 1 * MIB, seed=1)])
    store.packs.delete_object(ManifestShelf.name_of(old.id))  # as a store written by an earlier version
    with store.env.begin(write=True, db=store.env.open_db(b"meta")) as txn:
        txn.delete(b"manifests-published")
    assert store.manifests.point_ids() == set()
    new = backup(store, "vm", [write_image(tmp_path / "b.img", 1 * MIB, seed=2)])
    assert store.manifests.point_ids() == {old.id, new.id}
    path = store.path
    store.close()
    report, _ = rebuild_index(path)
    assert report.points_added == 2
