"""Backups taken from vSphere, end to end against vcsim with our disk, snapshot, CBT and /folder additions.

Each test makes a VM with real disk files, writes into it as its guest would (through
the simulator's control endpoint, which CBT logs), backs it up with the appliance's
own job and checks the restore point byte for byte against what the disk held at the
snapshot. Faults come from the simulator's switches: what ESXi does on a bad day.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from appliance.activities import VmActivities
from appliance.errors import BackupRefused, NotFound, TransferError, TryAgain, VsphereError
from appliance.jobs import Job, JobCancelled, JobRunner, Step
from appliance.protection.intents import Intents
from appliance.protection.job import BackupOptions, BackupResult, back_up_vm
from appliance.protection.service import BackupService
from appliance.store import open_store
from appliance.store.reader import ReadPath
from appliance.store.repository import Store
from appliance.vsphere.client import Session, find_host, find_vm, wait_for_task
from appliance.vsphere.snapshots import TAG, snapshot_trees
from appliance.vsphere.endpoints import endpoint_for
from appliance.vsphere.transfer import DatastoreFile, FolderTransport
from tests.vcsim import Vcsim, vcsim  # noqa: F401

MIB = 1 << 20
VM = "web"
SIZES = (6 * MIB, 3 * MIB)


class Disks:
    """What the guest has written: the model each restore point must equal."""

    def __init__(self, vcsim: Vcsim, vm: str, sizes: tuple[int, ...]) -> None:  # noqa: F811
        self.vcsim, self.vm = vcsim, vm
        self.data = [bytearray(size) for size in sizes]
        self.random = random.Random(7)

    def write(self, disk: int, offset: int, length: int) -> None:
        data = self.random.randbytes(length)
        self.vcsim.guest_write(self.vm, disk, offset, data)
        self.data[disk][offset: offset + length] = data

    def snapshot(self) -> list[bytes]:
        return [bytes(disk) for disk in self.data]


@pytest.fixture
def web(vcsim: Vcsim) -> Disks:  # noqa: F811
    vcsim.make_vm(VM, SIZES)
    disks = Disks(vcsim, VM, SIZES)
    disks.write(0, 0, 2 * MIB)  # the rest of disk 0 stays a hole
    disks.write(0, 5 * MIB - 100, 300)
    disks.write(1, MIB, MIB)
    return disks


@pytest.fixture
def session(vcsim: Vcsim) -> Iterator[Session]:  # noqa: F811
    opened = Session(vcsim.settings())
    yield opened
    opened.close()


class RecordingJob(Job):
    """A job whose steps the test can hook: `on_step[name]` runs as that step starts (the guest acting
    while the backup runs, an operator cancelling)."""

    def __init__(self, **hooks: Any) -> None:
        super().__init__(id=f"test-{random.randrange(1 << 30):08x}", kind="backup", params={}, created=0.0)
        self.hooks = hooks

    @contextlib.contextmanager
    def step(self, name: str, /, **fields: object) -> Iterator[Step]:
        with super().step(name, **fields) as record:
            hook = self.hooks.get(name.replace("-", "_"))
            if hook is not None:
                hook()
            yield record


def back_up(store: Store, session: Session, job: Job | None = None, **options: Any) -> BackupResult:
    return back_up_vm(store, session, "vc", VM, BackupOptions(**options), job or RecordingJob(),
                      Intents(store.path / "backup-intents"))


def point_disks(store: Store, point_id: str) -> list[bytes]:
    with store.env.begin() as txn:
        point = store.catalog.get_point(txn, point_id)
    with ReadPath(store) as read_path:
        return [read_path.disk(point, index).read(0, disk.size) for index, disk in enumerate(point.disks)]


def snapshots_of(session: Session, vm: str = VM) -> list[str]:
    return [tree.name for tree in snapshot_trees(find_vm(session.connection, vm).snapshot)]


def points_of(store: Store) -> list[str]:
    with store.env.begin() as txn:
        return [point.id for point in store.catalog.points(txn)]


def test_full_then_incrementals_are_the_disks_at_each_snapshot(store: Store, session: Session, web: Disks,
                                                               vcsim: Vcsim) -> None:  # noqa: F811
    first = back_up(store, session)
    assert [plan.mode for plan in first.disks] == ["full", "full"]
    assert point_disks(store, first.point.id) == web.snapshot()
    assert first.consistency == "application" and first.point.origin["consistency"] == "application"
    # A full backup reads only what CBT says is allocated: the hole of disk 0 is never fetched.
    assert first.bytes_read < sum(SIZES) and first.bytes_read >= 2 * MIB + MIB
    assert snapshots_of(session) == []

    web.write(0, 4 * MIB + 10, 5000)
    web.write(1, 0, 100)
    requests_before = len(vcsim.folder_requests())
    second = back_up(store, session)
    assert [plan.mode for plan in second.disks] == ["incremental", "incremental"]
    assert second.point.parent == first.point.id
    assert point_disks(store, second.point.id) == web.snapshot()
    assert sum(plan.changed_bytes for plan in second.disks) == 5100
    ranges = [r.range for r in vcsim.folder_requests()[requests_before:] if r.range]
    assert ranges and second.bytes_read <= 2 * store.config.chunk_size  # one chunk per changed area

    third = back_up(store, session)  # nothing changed
    assert sum(plan.changed_bytes for plan in third.disks) == 0 and third.bytes_read == 0
    assert point_disks(store, third.point.id) == web.snapshot()
    changes = [disk["change_id"] for disk in third.point.origin["disks"]]
    assert all(change and change.rsplit("/", 1)[0] == first.point.origin["disks"][i]["change_id"].rsplit("/", 1)[0]
               for i, change in enumerate(changes))


def test_a_write_after_the_snapshot_is_not_in_its_point(store: Store, session: Session, web: Disks) -> None:
    at_snapshot = web.snapshot()
    job = RecordingJob(ingest=lambda: web.write(0, MIB, 4096))
    result = back_up(store, session, job)
    assert point_disks(store, result.point.id) == at_snapshot
    assert web.vcsim.live_read(VM, 0, MIB, 4096) == bytes(web.data[0][MIB: MIB + 4096])  # merged on removal
    assert point_disks(store, back_up(store, session).point.id) == web.snapshot()  # and in the next point


def test_quiesce_try_falls_back_to_a_crash_consistent_point(store: Store, session: Session, web: Disks,
                                                            vcsim: Vcsim) -> None:  # noqa: F811
    vcsim.switch("quiesce_fault")
    result = back_up(store, session, quiesce="try")
    assert result.consistency == "crash" and result.point.origin["consistency"] == "crash"
    with pytest.raises(VsphereError, match="quiesce|Quiesce"):
        back_up(store, session, quiesce="yes")
    assert points_of(store) == [result.point.id] and snapshots_of(session) == []


def test_a_cbt_fault_or_reset_makes_a_correct_full_backup(store: Store, session: Session, web: Disks,
                                                          vcsim: Vcsim) -> None:  # noqa: F811
    back_up(store, session)
    web.write(0, 3 * MIB, 10)
    vcsim.switch("qcda_fault", 1)
    after_fault = back_up(store, session)
    assert after_fault.disks[0].mode == "full" and "CBT failed" in after_fault.disks[0].reason
    assert point_disks(store, after_fault.point.id) == web.snapshot()

    machine = find_vm(session.connection, VM)
    for enabled in (False, True):  # a reset: a new tracking uuid, so old changeIds mean nothing
        wait_for_task(machine.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=enabled)), "cbt", 30)
    web.write(1, 2 * MIB, 10)
    reset = back_up(store, session)
    assert [plan.mode for plan in reset.disks] == ["full", "full"]
    assert "reset" in reset.disks[0].reason or "previous point has no changeId" in reset.disks[0].reason
    assert point_disks(store, reset.point.id) == web.snapshot()


def test_small_cbt_pages_are_followed_to_the_end_of_the_disk(store: Store, session: Session, web: Disks,
                                                             vcsim: Vcsim) -> None:  # noqa: F811
    vcsim.switch("qcda_page", 256 * 1024)
    back_up(store, session)
    web.write(0, 5 * MIB + 1000, 10)
    web.write(0, 100, 10)
    result = back_up(store, session)
    assert result.disks[0].mode == "incremental" and result.disks[0].changed_bytes == 20
    assert point_disks(store, result.point.id) == web.snapshot()


def test_folder_answers_that_cannot_be_trusted_fail_the_backup_and_leave_nothing(
        store: Store, session: Session, web: Disks, vcsim: Vcsim) -> None:  # noqa: F811
    vcsim.switch("ignore_range")
    with pytest.raises(TransferError, match="ignored the byte range"):
        back_up(store, session)
    vcsim.clear_switch("ignore_range")
    vcsim.switch("short_body")
    with pytest.raises(TransferError, match="ended after|broke off"):
        back_up(store, session)
    vcsim.clear_switch("short_body")
    assert points_of(store) == [] and snapshots_of(session) == []
    assert list((store.path / "backup-intents").iterdir()) == []


def test_busy_hosts_and_expired_sessions_are_retried(store: Store, session: Session, web: Disks,
                                                     vcsim: Vcsim) -> None:  # noqa: F811
    vcsim.switch("require_cookie")
    vcsim.switch("periodic_503", 3)
    result = back_up(store, session, job=RecordingJob(ingest=lambda: vcsim.switch("expire_sessions")))
    assert point_disks(store, result.point.id) == web.snapshot()
    requests = vcsim.folder_requests()
    assert {503, 401} <= {r.status for r in requests} and 206 in {r.status for r in requests}
    # Straight to the host: a service ticket first, then the host's own session cookie.
    assert all("dcPath=ha-datacenter" in r.query for r in requests)
    assert "vmware_cgi_ticket" in requests[0].cookies
    assert all(r.cookies for r in requests) and snapshots_of(session) == []


def test_reads_go_to_the_configured_url_when_asked(store: Store, vcsim: Vcsim, web: Disks) -> None:  # noqa: F811
    settings = vcsim.settings(disk_reads="url")
    session = Session(settings)
    try:
        vcsim.switch("require_cookie")
        result = back_up(store, session)
    finally:
        session.close()
    assert point_disks(store, result.point.id) == web.snapshot()
    requests = vcsim.folder_requests()
    assert all("dcPath=DC0" in r.query and r.cookies == ("vmware_soap_session",) for r in requests)


def test_a_running_vms_live_disk_is_locked(session: Session, web: Disks, vcsim: Vcsim) -> None:  # noqa: F811
    vcsim.set_power(VM, "poweredOn")
    transport = FolderTransport(session, endpoint_for(session, "DC0_H0"))
    try:
        with pytest.raises(TransferError, match="locked"):
            transport.read_range(DatastoreFile("DC0", "LocalDS_0", f"{VM}/{VM}-flat.vmdk"), 0, 4096)
    finally:
        transport.close()


def test_vms_this_transport_cannot_read_are_refused_with_the_reason(store: Store, session: Session,
                                                                     web: Disks) -> None:
    machine = find_vm(session.connection, VM)
    disk = next(d for d in machine.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    disk.backing.diskMode = "independent_persistent"
    change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)
    wait_for_task(machine.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change])), "independent", 30)
    with pytest.raises(BackupRefused, match="independent-persistent: snapshots leave it out"):
        back_up(store, session)
    with pytest.raises(NotFound, match="no VM named .nobody."):
        back_up_vm(store, session, "vc", "nobody", BackupOptions(), RecordingJob(), Intents(store.path / "i"))
    assert points_of(store) == [] and snapshots_of(session) == []


def test_a_vm_with_its_own_snapshot_is_refused_by_name(store: Store, session: Session, web: Disks) -> None:
    machine = find_vm(session.connection, VM)
    wait_for_task(machine.CreateSnapshot_Task(name="before-upgrade", memory=False, quiesce=False), "snapshot", 30)
    with pytest.raises(BackupRefused, match="snapshot delta: the VM had snapshots of its own"):
        back_up(store, session)
    assert snapshots_of(session) == ["before-upgrade"]  # another tool's snapshot is never touched


def test_snapshot_removal_retries_locked_files_and_consolidates(store: Store, session: Session, web: Disks,
                                                                vcsim: Vcsim) -> None:  # noqa: F811
    vcsim.switch("remove_locked", 2)
    back_up(store, session)
    assert snapshots_of(session) == []
    vcsim.switch("consolidate_fail")
    with pytest.raises(VsphereError, match="was removed, but its delta was not merged"):
        back_up(store, session)
    assert find_vm(session.connection, VM).runtime.consolidationNeeded
    with pytest.raises(BackupRefused, match="need consolidation"):
        back_up(store, session)
    vcsim.clear_switch("consolidate_fail")
    wait_for_task(find_vm(session.connection, VM).ConsolidateVMDisks_Task(), "consolidate", 30)
    assert point_disks(store, back_up(store, session).point.id) == web.snapshot()


def test_a_cancelled_backup_removes_its_snapshot_and_adds_no_point(store: Store, session: Session,
                                                                   web: Disks) -> None:
    job = RecordingJob()
    job.hooks["ingest"] = job.cancel
    with pytest.raises(JobCancelled):
        back_up(store, session, job)
    assert points_of(store) == [] and snapshots_of(session) == []
    assert list((store.path / "backup-intents").iterdir()) == []


def test_a_crashed_backups_snapshot_is_swept_by_the_next_one(store: Store, session: Session, web: Disks) -> None:
    """A backup killed between snapshot and removal leaves an intent record and a tagged snapshot; the next
    backup of the VM removes the snapshot (the serving appliance's reconcile does it at start)."""
    left = f"{TAG} {store.config.store_id[:8]} 20261206-000000-dead01"
    machine = find_vm(session.connection, VM)
    wait_for_task(machine.CreateSnapshot_Task(name=left, memory=False, quiesce=False), "snapshot", 30)
    result = back_up(store, session)
    assert result.swept == [left]
    assert snapshots_of(session) == []
    assert point_disks(store, result.point.id) == web.snapshot()


def test_an_incremental_keeps_every_earlier_point_intact(store: Store, session: Session, web: Disks) -> None:
    first = back_up(store, session)
    expected = point_disks(store, first.point.id)
    web.write(0, 0, MIB)
    back_up(store, session)
    assert point_disks(store, first.point.id) == expected


def point_disks_of_store(path: Path, point_id: str) -> list[bytes]:
    """A point's disks, from a store no process has open."""
    with open_store(path) as store:
        return point_disks(store, point_id)


@pytest.mark.parametrize("disk_reads", ["host", "url"])
def test_names_with_spaces_and_symbols_and_a_datacenter_in_a_folder(store: Store, vcsim: Vcsim,  # noqa: F811
                                                                      disk_reads: str) -> None:
    """Every name on the wire is percent-encoded: a datastore "back up #1 & co", a datacenter in a folder
    "Europe & Co" (the dcPath of a read through vCenter), a VM folder with a space."""
    session = Session(vcsim.settings(disk_reads=disk_reads))
    try:
        content = session.connection.content
        datacenter = next(e for e in content.rootFolder.childEntity if e.name == "DC0")
        wait_for_task(content.rootFolder.CreateFolder("Europe & Co").MoveIntoFolder_Task([datacenter]), "move", 30)
        datastore = "back up #1 & co"
        (vcsim.workdir / datastore).mkdir()
        spec = vim.host.NasVolume.Specification(remoteHost="192.0.2.1", remotePath="/exports/backup",
                                                localPath=datastore, accessMode="readWrite")
        find_host(session.connection, "DC0_H0").configManager.datastoreSystem.CreateNasDatastore(spec)
        vcsim.make_vm(VM, (2 * MIB,), datastore=datastore)
        disks = Disks(vcsim, VM, (2 * MIB,))
        disks.write(0, 4096, MIB)
        result = back_up(store, session)
    finally:
        session.close()
    assert point_disks(store, result.point.id) == disks.snapshot()
    reads = [r for r in vcsim.folder_requests() if r.range]
    assert reads and all("dsName=back%20up%20%231%20%26%20co" in r.query for r in reads)
    expected = "dcPath=ha-datacenter" if disk_reads == "host" else "dcPath=Europe%20%26%20Co%2FDC0"
    assert all(expected in r.query for r in reads)


def test_no_backup_starts_while_the_vms_instant_boot_is_migrated_back(store: Store, vcsim: Vcsim,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    activities = VmActivities()
    service = BackupService(store, JobRunner(tmp_path / "jobs"), activities, lambda name: ("vc", vcsim.settings()))
    with activities.holding(VM, "its instant boot (session s1) is being migrated"):
        with pytest.raises(TryAgain, match="VM 'web' is busy: its instant boot .* is being migrated"):
            service.submit(VM)
    assert activities.holder(VM) is None
