"""The datastore VFS directly (no FUSE): tree, read-only points, sessions, persistence."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import pytest

from appliance import session_commit
from appliance.datastore import sessions
from appliance.datastore.datastore import Datastore
from appliance.datastore.layout import overlay_path
from appliance.datastore.vfs import AttributeChanges, Kind
from appliance.errors import (
    AlreadyExists,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NotEmpty,
    NotFound,
    PermissionDenied,
    ReadOnly,
    SessionBusy,
    SessionDiskError,
    StaleHandle,
    TryAgain,
)
from appliance.ingest.backup import backup
from appliance.metrics import ApplianceMetrics
from appliance.store import ReadPath, Store
from appliance.protection.retention import Retention
from appliance.store.gc import prune
from tests.conftest import write_image

#: The datastore reads restore points through the store: every test runs on local packs and on S3.
pytestmark = pytest.mark.store_backends


@pytest.fixture
def datastore(store: Store, tmp_path: Path) -> Iterator[Datastore]:
    disk0 = write_image(tmp_path / "d0.img", 3 << 20, seed=1)
    disk1 = write_image(tmp_path / "d1.img", 1 << 20, seed=2)
    backup(store, "web", [disk0, disk1])
    with ReadPath(store) as read_path:
        ds = Datastore(store, read_path)
        yield ds
        ds.close()


def path_inode(ds: Datastore, path: str) -> int:
    inode = ds.root_inode
    for part in filter(None, path.split("/")):
        inode = ds.lookup(inode, part).inode
    return inode


def names(ds: Datastore, path: str) -> list[str]:
    return [entry.name for entry in ds.readdir(path_inode(ds, path))]


def make_session(ds: Datastore, name: str = "s1") -> sessions.SessionInfo:
    return sessions.create_session(ds.store, ds.namespace, ds.read_path, "web", "latest", name)


def test_tree_mirrors_the_catalog(datastore: Datastore, tmp_path: Path) -> None:
    assert names(datastore, "/") == ["restore-points", "sessions"]
    assert names(datastore, "/restore-points") == ["web"]
    (point,) = names(datastore, "/restore-points/web")
    files = names(datastore, f"/restore-points/web/{point}")
    assert sorted(files) == ["web-flat.vmdk", "web.vmdk", "web.vmx", "web_1-flat.vmdk", "web_1.vmdk"]
    flat = path_inode(datastore, f"/restore-points/web/{point}/web-flat.vmdk")
    data = datastore.read(flat, 0, 4 << 20)
    assert data == (tmp_path / "d0.img").read_bytes()
    descriptor = datastore.read(path_inode(datastore, f"/restore-points/web/{point}/web.vmdk"), 0, 4096)
    assert b'createType="vmfs"' in descriptor and b'RW 6144 VMFS "web-flat.vmdk"' in descriptor


def test_restore_points_are_read_only(datastore: Datastore) -> None:
    (point,) = names(datastore, "/restore-points/web")
    folder = path_inode(datastore, f"/restore-points/web/{point}")
    flat = path_inode(datastore, f"/restore-points/web/{point}/web-flat.vmdk")
    with pytest.raises(ReadOnly):
        datastore.write(flat, 0, b"x")
    with pytest.raises(ReadOnly):
        datastore.setattr(flat, AttributeChanges(size=0))
    with pytest.raises(ReadOnly):
        datastore.create(folder, "new", 0o644, 0, 0, False)
    with pytest.raises(ReadOnly):
        datastore.remove(folder, "web.vmx")
    with pytest.raises(ReadOnly):
        datastore.mkdir(datastore.root_inode, "x", 0o755, 0, 0)
    with pytest.raises(PermissionDenied):
        datastore.mkdir(path_inode(datastore, "/sessions"), "handmade", 0o755, 0, 0)
    assert datastore.getattr(flat).read_only


def test_session_writes_never_touch_the_point(datastore: Datastore, tmp_path: Path) -> None:
    make_session(datastore)
    (point,) = names(datastore, "/restore-points/web")
    base = path_inode(datastore, f"/restore-points/web/{point}/web-flat.vmdk")
    before = hashlib.sha256(datastore.read(base, 0, 4 << 20)).hexdigest()
    disk = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
    datastore.write(disk, 12345, b"hello" * 1000)
    datastore.fsync(disk)
    expected = bytearray((tmp_path / "d0.img").read_bytes())
    expected[12345 : 12345 + 5000] = b"hello" * 1000
    assert datastore.read(disk, 0, 4 << 20) == bytes(expected)
    assert hashlib.sha256(datastore.read(base, 0, 4 << 20)).hexdigest() == before


def test_file_operations_in_a_session(datastore: Datastore) -> None:
    make_session(datastore)
    root = path_inode(datastore, "/sessions/s1")
    lock = datastore.create(root, ".lck-0000000000000011", 0o600, 0, 0, exclusive=True)
    datastore.write(lock.inode, 0, b"lock")
    with pytest.raises(AlreadyExists):
        datastore.create(root, ".lck-0000000000000011", 0o600, 0, 0, exclusive=True)
    assert datastore.create(root, ".lck-0000000000000011", 0o600, 0, 0, exclusive=False).inode == lock.inode
    folder = datastore.mkdir(root, "logs", 0o755, 0, 0)
    datastore.rename(root, ".lck-0000000000000011", folder.inode, "moved")
    assert datastore.lookup(folder.inode, "moved").inode == lock.inode  # inode survives rename
    with pytest.raises(NotEmpty):
        datastore.rmdir(root, "logs")
    with pytest.raises(InvalidName):
        datastore.rename(root, "logs", folder.inode, "inside")
    datastore.setattr(lock.inode, AttributeChanges(size=2))
    assert datastore.read(lock.inode, 0, 100) == b"lo"
    datastore.remove(folder.inode, "moved")
    with pytest.raises(StaleHandle):
        datastore.getattr(lock.inode)
    datastore.rmdir(root, "logs")
    link = datastore.symlink(root, "current", "web.vmx", 0, 0)
    assert link.kind is Kind.SYMLINK and datastore.readlink(link.inode) == "web.vmx"
    datastore.mkdir(root, "d", 0o755, 0, 0)
    with pytest.raises(IsADirectory):
        datastore.remove(root, "d")
    with pytest.raises(InvalidName):
        datastore.rmdir(root, "..")
    with pytest.raises(PermissionDenied):
        datastore.rmdir(path_inode(datastore, "/sessions"), "s1")


@pytest.mark.parametrize("name, error", [("a/b", InvalidName), ("..", InvalidName), ("nul\x00", InvalidName),
                                         ("x" * 256, NameTooLong), ("", InvalidName)])
def test_bad_names_are_refused(datastore: Datastore, name: str, error: type) -> None:
    make_session(datastore)
    with pytest.raises(error):
        datastore.create(path_inode(datastore, "/sessions/s1"), name, 0o644, 0, 0, False)


def test_inodes_and_data_survive_a_restart(store: Store, datastore: Datastore) -> None:
    make_session(datastore)
    disk = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
    datastore.write(disk, 0, b"persist")
    datastore.fsync(disk)
    generation = datastore.getattr(disk).generation
    datastore.close()
    with ReadPath(store) as read_path:
        again = Datastore(store, read_path)
        assert path_inode(again, "/sessions/s1/web-flat.vmdk") == disk
        assert again.getattr(disk).generation == generation
        assert again.read(disk, 0, 7) == b"persist"
        again.close()


def test_two_sessions_are_isolated(datastore: Datastore) -> None:
    make_session(datastore, "a")
    make_session(datastore, "b")
    disk_a = path_inode(datastore, "/sessions/a/web-flat.vmdk")
    disk_b = path_inode(datastore, "/sessions/b/web-flat.vmdk")
    original = datastore.read(disk_b, 0, 100)
    datastore.write(disk_a, 0, b"A" * 100)
    assert datastore.read(disk_b, 0, 100) == original
    with pytest.raises(AlreadyExists):
        make_session(datastore, "a")


def test_commit_makes_a_child_point(store: Store, datastore: Datastore, tmp_path: Path) -> None:
    make_session(datastore)
    disk = path_inode(datastore, "/sessions/s1/web_1-flat.vmdk")
    datastore.write(disk, 1000, b"changed" * 100)
    datastore.fsync(disk)
    view = datastore.read(disk, 0, 1 << 20)
    datastore.close()
    point = session_commit.commit_session(store, datastore.namespace, datastore.read_path, "s1")
    with store.env.begin() as txn:
        parent = store.catalog.resolve(txn, "web", point.parent or "")
    assert point.stats["read_bytes"] < 1 << 20  # only overlay blocks were read
    assert datastore.read_path.read(point, 1, 0, 1 << 20) == view
    assert datastore.read_path.read(point, 0, 0, 3 << 20) == datastore.read_path.read(parent, 0, 0, 3 << 20)
    session_commit.export_session_disk(store, datastore.namespace, datastore.read_path, "s1", 1, tmp_path / "x.img")
    assert (tmp_path / "x.img").read_bytes() == view


def test_prune_keeps_a_point_a_session_runs_from(store: Store, datastore: Datastore, tmp_path: Path) -> None:
    make_session(datastore)
    disk = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
    view = datastore.read(disk, 0, 3 << 20)
    backup(store, "web", [write_image(tmp_path / "new.img", 3 << 20, seed=9)])
    removed, _ = prune(store, "web", Retention(keep_last=1))
    assert removed == []
    assert datastore.read(disk, 0, 3 << 20) == view
    sessions.delete_session(store, datastore.namespace, "s1")
    removed, report = prune(store, "web", Retention(keep_last=1))
    assert len(removed) == 1 and report.removed_chunks > 0


def test_commit_and_delete_refuse_while_served(store: Store, datastore: Datastore) -> None:
    make_session(datastore)
    with sessions.datastore_lock(store):
        with pytest.raises(SessionBusy):
            sessions.delete_session(store, datastore.namespace, "s1")
    sessions.delete_session(store, datastore.namespace, "s1")
    assert names(datastore, "/sessions") == []
    with pytest.raises(NotFound):
        sessions.get_session(datastore.namespace, "s1")


def test_session_disk_reads_from_memory_match_the_ordinary_path(datastore: Datastore) -> None:
    make_session(datastore)
    flat = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
    assert datastore.read_nowait(flat, 0, 4096) is None  # no chunk in memory yet: the ordinary path first
    expected = datastore.read(flat, 70_000, 200_000)  # opens the overlay, loads the chunks
    assert b"".join(datastore.read_nowait(flat, 70_000, 200_000) or [b"miss"]) == expected
    datastore.write(flat, 100_000, b"changed")
    merged = datastore.read(flat, 70_000, 200_000)
    assert merged[30_000:30_007] == b"changed"
    assert b"".join(datastore.read_nowait(flat, 70_000, 200_000) or [b"miss"]) == merged  # overlay block: page cache
    assert datastore.getattr_nowait(flat) == datastore.getattr(flat)
    with datastore.session_paused("s1"):  # the overlay is closed: nothing from memory
        assert datastore.read_nowait(flat, 70_000, 200_000) is None
    sessions.remove_released_session(datastore.store, datastore.namespace, "s1")
    datastore._changed()
    assert datastore.getattr_nowait(flat) is None


def test_session_disk_writes_on_the_callers_thread_only_when_nothing_waits(datastore: Datastore) -> None:
    make_session(datastore)
    flat = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
    (point,) = names(datastore, "/restore-points/web")
    point_flat = path_inode(datastore, f"/restore-points/web/{point}/web-flat.vmdk")
    block = bytes(range(256)) * 256  # one 64 KiB overlay block
    with datastore.session_paused("s1"):
        pass  # lets go of the overlay the lookup opened
    assert datastore.write_nowait(flat, 0, block) is None  # not open until the ordinary path opens it
    datastore.read(point_flat, 0, 4096)
    assert datastore.write_nowait(point_flat, 0, block) is None  # a restore point: `write` says ReadOnly
    original = datastore.read(flat, 0, 3 * len(block))  # opens the overlay
    assert datastore.write_nowait(flat, len(block), memoryview(block)) == len(block)
    assert datastore.write_nowait(flat, 10, b"partial") is None  # a block not yet in the overlay needs a fill
    with datastore.session_paused("s1"):
        assert datastore.read(flat, 0, 10) == original[:10]  # reads go on, and open the overlay again
        assert datastore.write_nowait(flat, 0, block) is None
        with pytest.raises(TryAgain):
            datastore.write(flat, 0, block)
    assert datastore.read(flat, 0, 3 * len(block)) == original[: len(block)] + block + original[2 * len(block) :]
    assert datastore.read(point_flat, len(block), len(block)) == original[len(block) : 2 * len(block)]


def test_a_write_that_meets_its_overlay_closing_is_retried_not_lost(datastore: Datastore) -> None:
    make_session(datastore)
    flat = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
    datastore.write(flat, 0, b"before")  # opens the overlay
    overlay = datastore.files.overlays[flat]
    with datastore.session_paused("s1"):  # flushed and closed under a writer that already holds it
        pass
    datastore.files.overlays[flat] = overlay  # the writer's view: let in before the pause, overlay in hand
    with pytest.raises(TryAgain):
        datastore.write(flat, 6, b"during")
    del datastore.files.overlays[flat]
    datastore.write(flat, 6, b"after")  # the client's retry reaches a reopened overlay
    assert datastore.read(flat, 0, 11) == b"beforeafter"


def test_a_pause_lets_no_overlay_outlive_it_and_no_change_reopen_one(datastore: Datastore) -> None:
    make_session(datastore)
    flat = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
    datastore.write(flat, 0, b"kept")
    node = datastore._node(flat)
    with datastore.session_paused("s1"):
        with pytest.raises(TryAgain):  # a write let in before the pause, reaching for the overlay after it
            datastore._overlay(node, changing=True)
        assert flat not in datastore.files.overlays
        assert datastore.read(flat, 0, 4) == b"kept"  # reads go on, and open the overlay again
        assert flat in datastore.files.overlays
    assert flat not in datastore.files.overlays  # released with the pause: a removal leaves no open file behind
    assert datastore.read(flat, 0, 4) == b"kept"


def test_a_damaged_overlay_is_a_session_disk_error_naming_it(datastore: Datastore, store: Store) -> None:
    """Overlay errors stop at the VFS: adapters see a SessionDiskError (EIO), never the overlay's classes."""
    info = make_session(datastore)
    flat = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
    datastore.write(flat, 0, b"kept")
    with datastore.session_paused("s1"):
        map_file = overlay_path(store, info.inode, 0) / "map"
        damaged = bytearray(map_file.read_bytes())
        damaged[0] ^= 0xFF  # the magic
        map_file.write_bytes(bytes(damaged))
    for call in (lambda: datastore.getattr(flat), lambda: datastore.read(flat, 0, 4),
                 lambda: datastore.write(flat, 0, b"x"), lambda: datastore.fsync(flat)):
        with pytest.raises(SessionDiskError, match=str(overlay_path(store, info.inode, 0))):
            call()
    assert datastore.getattr_nowait(flat) is None  # the slow path reports it


def test_writes_on_the_callers_thread_are_counted_like_the_others(store: Store, tmp_path: Path) -> None:
    backup(store, "web", [write_image(tmp_path / "d0.img", 1 << 20, seed=1)])
    metrics = ApplianceMetrics()
    with ReadPath(store) as read_path:
        datastore = Datastore(store, read_path, session_io=metrics)
        try:
            make_session(datastore)
            flat = path_inode(datastore, "/sessions/s1/web-flat.vmdk")
            before = datastore.getattr(flat)  # opens the overlay
            assert datastore.write_nowait(flat, 0, b"x" * 65536) == 65536
            after = datastore.getattr(flat)
            assert datastore.getattr_nowait(flat) == after and after.mtime_ns > before.mtime_ns
            assert datastore.read(flat, 0, 65536) == b"x" * 65536
        finally:
            datastore.close()
    written = metrics.registry.get_sample_value("appliance_session_written_bytes_total", {"session": "s1"})
    assert written == 65536


BACKED_UP_VMX = b""".encoding = "UTF-8"
displayName = "web-prod"
nvram = "web-prod.nvram"
scsi0.present = "TRUE"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "/vmfs/volumes/ds2/web-prod/web-prod_2.vmdk"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web-prod.vmdk"
sata0:0.present = "TRUE"
sata0:0.fileName = "web-prod_3.vmdk"
ide1:0.fileName = "debian.iso"
ethernet0.networkName = "VM Network"
"""


def test_session_vmx_names_the_sessions_disks(datastore: Datastore, store: Store, tmp_path: Path) -> None:
    image = write_image(tmp_path / "d.img", 1 << 20, seed=3)
    vmx = tmp_path / "web-prod.vmx"
    vmx.write_bytes(BACKED_UP_VMX)
    point = backup(store, "web", [image, image], config_files={".vmx": vmx})
    make_session(datastore)
    text = datastore.read(path_inode(datastore, "/sessions/s1/web.vmx"), 0, 1 << 16).decode()
    lines = text.splitlines()
    assert 'scsi0:0.fileName = "web.vmdk"' in lines  # device order: scsi0:0, scsi0:1, then sata0:0
    assert 'scsi0:1.fileName = "web_1.vmdk"' in lines
    assert 'sata0:0.present = "FALSE"' in lines and 'sata0:0.fileName = "web-prod_3.vmdk"' in lines
    assert 'nvram = "web.nvram"' in lines and 'ide1:0.fileName = "debian.iso"' in lines
    assert 'ethernet0.networkName = "VM Network"' in lines and 'displayName = "web-prod"' in lines
    point_vmx = datastore.read(path_inode(datastore, f"/restore-points/web/{point.id}/web.vmx"), 0, 1 << 16)
    assert point_vmx == BACKED_UP_VMX  # the restore point shows the backup as it was
