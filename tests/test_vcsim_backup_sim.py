"""The simulator behaves as ESXi does for VADP-style backups (tests/vcsim/sim_*.go).

Real disk files, snapshots with deltas and deep configs, CBT and QueryChangedDiskAreas,
removal and consolidation, and /folder with its failure switches, seen through pyvmomi
and HTTP the way the backup job sees them.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from typing import Any

import pytest
from pyVmomi import vim, vmodl

from appliance.errors import VsphereError
from appliance.vsphere.client import Connection, wait_for_task
from tests.vcsim import ControlError, Vcsim, vcsim

__all__ = ["vcsim"]  # the fixture, imported for pytest

MiB = 1 << 20
CHANGE_ID = re.compile(r"^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/(\d+)$")
QUERY = "dcPath=DC0&dsName=LocalDS_0"


@pytest.fixture
def soap(vcsim: Vcsim) -> Iterator[Connection]:  # noqa: F811
    with vcsim.connection() as connection:
        yield connection


def find_vm(connection: Connection, moid: str) -> vim.VirtualMachine:
    return vim.VirtualMachine(moid, connection.service._stub)


def disks_of(config: vim.vm.ConfigInfo) -> list[vim.vm.device.VirtualDisk]:
    return [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def snapshot(vm: vim.VirtualMachine, name: str = "backup", quiesce: bool = False) -> vim.vm.Snapshot:
    snap: vim.vm.Snapshot = wait_for_task(vm.CreateSnapshot_Task(name, "", False, quiesce), "snapshot", 30)
    return snap


def remove(snap: vim.vm.Snapshot) -> None:
    wait_for_task(snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True), "remove", 30)


def folder(vcsim: Vcsim, method: str, path: str,  # noqa: F811
           headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = vcsim.https(timeout=10)
    try:
        connection.request(method, f"/folder/{path}?{QUERY}", headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def areas(vm: vim.VirtualMachine, snap: vim.vm.Snapshot, key: int, change_id: str, start: int = 0) -> Any:
    return vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=start, changeId=change_id)


def test_disks_get_vmfs_files_and_a_snapshot_gets_a_delta_and_its_own_config(
        vcsim: Vcsim, soap: Connection) -> None:  # noqa: F811
    vm = find_vm(soap, vcsim.make_vm("db", [8 * MiB, 16 * MiB]))
    first, second = disks_of(vm.config)
    assert (first.backing.fileName, second.backing.fileName) == ("[LocalDS_0] db/db.vmdk", "[LocalDS_0] db/db_1.vmdk")
    assert second.capacityInBytes == 16 * MiB and second.capacityInKB == 16 * 1024
    assert not first.backing.changeId  # enabled in the spec, active only from the next stun
    status, _, descriptor = folder(vcsim, "GET", "db/db_1.vmdk")
    assert status == 200
    text = descriptor.decode()
    assert text.startswith("# Disk DescriptorFile") and 'createType="vmfs"' in text and "parentCID=ffffffff" in text
    assert f'RW {16 * MiB // 512} VMFS "db_1-flat.vmdk"' in text and "ddb.uuid" in text
    status, headers, _ = folder(vcsim, "HEAD", "db/db_1-flat.vmdk")
    assert (status, headers["Content-Length"]) == (200, str(16 * MiB))
    assert folder(vcsim, "GET", "DC0_H0_VM0/disk1.vmdk")[0] == 500  # the inventory's VMs run: their disks are locked
    vcsim.set_power("DC0_H0_VM0", "poweredOff")
    assert b'RW 2048 VMFS "disk1-flat.vmdk"' in folder(vcsim, "GET", "DC0_H0_VM0/disk1.vmdk")[2]

    snap = snapshot(vm)
    frozen = disks_of(snap.config)
    assert [d.backing.fileName for d in frozen] == ["[LocalDS_0] db/db.vmdk", "[LocalDS_0] db/db_1.vmdk"]
    frozen_id = CHANGE_ID.match(frozen[0].backing.changeId)
    assert frozen_id and frozen_id.group(3) == "0"
    live = disks_of(vm.config)
    assert live[0].backing.fileName == "[LocalDS_0] db/db-000001.vmdk"
    assert live[0].backing.parent.fileName == "[LocalDS_0] db/db.vmdk"
    assert live[0].backing.changeId == frozen[0].backing.changeId.replace("/0", "/1")
    status, _, delta = folder(vcsim, "GET", "db/db-000001.vmdk")
    assert status == 200 and 'createType="vmfsSparse"' in delta.decode()
    assert 'parentFileNameHint="db.vmdk"' in delta.decode() and '"db-000001-delta.vmdk"' in delta.decode()
    files = {f.name for f in vm.layoutEx.file}
    assert {"[LocalDS_0] db/db-000001.vmdk", "[LocalDS_0] db/db-000001-delta.vmdk"} <= files
    assert vm.snapshot.currentSnapshot == snap and vm.snapshot.rootSnapshotList[0].snapshot == snap

    on_top = snapshot(vm, "second")
    assert disks_of(vm.config)[0].backing.fileName == "[LocalDS_0] db/db-000002.vmdk"
    assert disks_of(on_top.config)[0].backing.fileName == "[LocalDS_0] db/db-000001.vmdk"
    assert disks_of(snap.config)[0].backing.fileName == "[LocalDS_0] db/db.vmdk"  # not shared with the VM's


def test_guest_writes_land_on_the_delta_and_removal_merges_them(vcsim: Vcsim, soap: Connection) -> None:  # noqa: F811
    vm = find_vm(soap, vcsim.make_vm("web", [8 * MiB]))
    vcsim.guest_write("web", 0, 4096, b"A" * 4096)
    snap = snapshot(vm)
    vcsim.guest_write("web", 0, 6144, b"B" * 4096)
    assert vcsim.live_read("web", 0, 4096, 8192) == b"A" * 2048 + b"B" * 4096 + b"\0" * 2048
    status, headers, body = folder(vcsim, "GET", "web/web-flat.vmdk", {"Range": "bytes=4096-12287"})
    assert (status, headers["Content-Range"]) == (206, f"bytes 4096-12287/{8 * MiB}")
    assert body == b"A" * 4096 + b"\0" * 4096  # the snapshot's view: the write after it is not there
    _, headers, _ = folder(vcsim, "HEAD", "web/web-000001-delta.vmdk")
    assert int(headers["Content-Length"]) == 4096  # only what was written, never the whole disk
    with pytest.raises(ControlError):
        vcsim.guest_write("web", 0, 8 * MiB - 1, b"xx")

    remove(snap)
    assert disks_of(vm.config)[0].backing.fileName == "[LocalDS_0] web/web.vmdk"
    assert folder(vcsim, "HEAD", "web/web-000001.vmdk")[0] == 404
    assert folder(vcsim, "GET", "web/web-flat.vmdk", {"Range": "bytes=4096-12287"})[2] == \
        b"A" * 2048 + b"B" * 4096 + b"\0" * 2048
    assert vm.snapshot is None and not vm.runtime.consolidationNeeded


def test_changed_disk_areas_full_incremental_and_paged(vcsim: Vcsim, soap: Connection) -> None:  # noqa: F811
    vm = find_vm(soap, vcsim.make_vm("app", [32 * MiB]))
    key = disks_of(vm.config)[0].key
    vcsim.guest_write("app", 0, 0, b"x" * 1024)
    vcsim.guest_write("app", 0, 20 * MiB, b"y" * 512)
    first = snapshot(vm, "first")
    full = areas(vm, first, key, "*")
    assert (full.startOffset, full.length) == (0, 32 * MiB)
    assert [(a.start, a.length) for a in full.changedArea] == [(0, 1024), (20 * MiB, 512)]
    since = disks_of(first.config)[0].backing.changeId
    remove(first)
    vcsim.guest_write("app", 0, 512, b"z" * 1024)  # overlaps the first write: the areas merge
    vcsim.guest_write("app", 0, 4096, b"w" * 10)
    second = snapshot(vm, "second")
    delta = areas(vm, second, key, since)
    assert [(a.start, a.length) for a in delta.changedArea] == [(512, 1024), (4096, 10)]
    assert [(a.start, a.length) for a in areas(vm, second, key, "*").changedArea] == [(0, 1536), (4096, 10),
                                                                                       (20 * MiB, 512)]
    with pytest.raises(vim.fault.FileFault, match="changeId is not valid"):
        areas(vm, second, key, "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/0")
    with pytest.raises(vmodl.fault.InvalidArgument):
        areas(vm, second, 4000, "*")

    vcsim.switch("qcda_page", 16 * MiB)
    page = areas(vm, second, key, "*")
    assert (page.length, [(a.start, a.length) for a in page.changedArea]) == (16 * MiB, [(0, 1536), (4096, 10)])
    rest = areas(vm, second, key, "*", start=page.length)
    assert (rest.startOffset, rest.length, [(a.start, a.length) for a in rest.changedArea]) == \
        (16 * MiB, 16 * MiB, [(20 * MiB, 512)])
    vcsim.switch("qcda_fault", 1)
    with pytest.raises(vim.fault.FileFault):
        areas(vm, second, key, "*")
    assert areas(vm, second, key, "*").length == 16 * MiB  # the count ran out


def test_cbt_starts_at_a_stun_and_a_resize_restarts_it(vcsim: Vcsim, soap: Connection) -> None:  # noqa: F811
    vm = find_vm(soap, vcsim.make_vm("files", [8 * MiB], cbt=False))
    no_cbt = snapshot(vm)
    assert not disks_of(no_cbt.config)[0].backing.changeId
    with pytest.raises(vim.fault.FileFault):
        areas(vm, no_cbt, disks_of(vm.config)[0].key, "*")
    remove(no_cbt)
    wait_for_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)), "enable CBT", 30)
    assert vm.config.changeTrackingEnabled and not disks_of(vm.config)[0].backing.changeId
    wait_for_task(vm.PowerOnVM_Task(), "power on", 30)
    before = disks_of(vm.config)[0]
    assert CHANGE_ID.match(before.backing.changeId)
    wait_for_task(vm.PowerOffVM_Task(), "power off", 30)
    before.capacityInBytes, before.capacityInKB = 12 * MiB, 12 * 1024
    grow = vim.vm.device.VirtualDeviceSpec(operation="edit", device=before)
    wait_for_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[grow])), "grow", 30)
    after = disks_of(vm.config)[0]
    assert after.capacityInBytes == 12 * MiB and after.backing.changeId.split("/")[0] != \
        before.backing.changeId.split("/")[0]
    assert folder(vcsim, "HEAD", "files/files-flat.vmdk")[1]["Content-Length"] == str(12 * MiB)
    wait_for_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)), "disable CBT", 30)
    assert not disks_of(vm.config)[0].backing.changeId


def test_failed_merge_leaves_the_delta_for_consolidation(vcsim: Vcsim, soap: Connection) -> None:  # noqa: F811
    vm = find_vm(soap, vcsim.make_vm("mail", [8 * MiB]))
    vcsim.switch("quiesce_fault")
    with pytest.raises(VsphereError, match="ApplicationQuiesceFault"):
        snapshot(vm, quiesce=True)
    assert vm.snapshot is None and disks_of(vm.config)[0].backing.fileName == "[LocalDS_0] mail/mail.vmdk"
    snap = snapshot(vm)
    vcsim.switch("remove_locked", 1)
    with pytest.raises(VsphereError, match="FileLocked"):
        remove(snap)
    assert vm.snapshot.currentSnapshot == snap
    vcsim.guest_write("mail", 0, 0, b"late")
    vcsim.switch("consolidate_fail")
    remove(snap)
    assert vm.snapshot is None and vm.runtime.consolidationNeeded
    assert disks_of(vm.config)[0].backing.fileName == "[LocalDS_0] mail/mail-000001.vmdk"
    with pytest.raises(VsphereError, match="FileLocked"):
        wait_for_task(vm.ConsolidateVMDisks_Task(), "consolidate", 30)
    vcsim.clear_switch("consolidate_fail")
    wait_for_task(vm.ConsolidateVMDisks_Task(), "consolidate", 30)
    assert not vm.runtime.consolidationNeeded
    assert disks_of(vm.config)[0].backing.fileName == "[LocalDS_0] mail/mail.vmdk"
    assert folder(vcsim, "GET", "mail/mail-flat.vmdk", {"Range": "bytes=0-3"})[2] == b"late"


def test_folder_locks_the_live_disk_and_fails_as_switched(vcsim: Vcsim, soap: Connection) -> None:  # noqa: F811
    vm = find_vm(soap, vcsim.make_vm("erp", [8 * MiB]))
    vcsim.set_power("erp", "poweredOn")
    assert folder(vcsim, "GET", "erp/erp-flat.vmdk", {"Range": "bytes=0-9"})[0] == 500
    snapshot(vm)
    assert folder(vcsim, "GET", "erp/erp-flat.vmdk", {"Range": "bytes=0-9"})[0] == 206
    assert folder(vcsim, "GET", "erp/erp-000001.vmdk")[0] == 500

    vcsim.switch("ignore_range")
    status, headers, _ = folder(vcsim, "GET", "erp/erp-flat.vmdk", {"Range": "bytes=0-9"})
    assert (status, headers["Content-Length"]) == (200, str(8 * MiB))
    vcsim.clear_switch("ignore_range")
    vcsim.switch("short_body", 1)
    with pytest.raises(http.client.IncompleteRead):
        folder(vcsim, "GET", "erp/erp-flat.vmdk", {"Range": "bytes=0-65535"})
    vcsim.switch("periodic_503", 2)
    statuses = [folder(vcsim, "HEAD", "erp/erp.vmdk")[0] for _ in range(4)]
    assert statuses.count(503) == 2 and statuses.count(200) == 2
    vcsim.clear_switch("periodic_503")

    vcsim.switch("require_cookie")
    assert folder(vcsim, "HEAD", "erp/erp.vmdk")[0] == 401
    session = soap.service._stub.cookie.split("=", 1)[1].split(";")[0].strip('"')
    assert folder(vcsim, "HEAD", "erp/erp.vmdk", {"Cookie": f"vmware_soap_session={session}"})[0] == 200
    ticket = soap.content.sessionManager.AcquireGenericServiceTicket(
        vim.SessionManager.HttpServiceRequestSpec(method="httpGet", url=f"{vcsim.url}/../folder")).id
    status, headers, _ = folder(vcsim, "HEAD", "erp/erp.vmdk", {"Cookie": f"vmware_cgi_ticket={ticket}"})
    assert status == 200 and "vmware_soap_session=" in headers["Set-Cookie"]
    assert folder(vcsim, "HEAD", "erp/erp.vmdk", {"Cookie": f"vmware_cgi_ticket={ticket}"})[0] == 401  # used once
    given = headers["Set-Cookie"].split(";")[0]
    assert folder(vcsim, "HEAD", "erp/erp.vmdk", {"Cookie": given})[0] == 200

    vcsim.switch("expire_sessions")
    assert folder(vcsim, "HEAD", "erp/erp.vmdk", {"Cookie": given})[0] == 401
    with pytest.raises(vim.fault.NotAuthenticated):
        vm.config.name  # noqa: B018  (any SOAP call)
    log = vcsim.folder_requests()
    assert log[0].path == "/folder/erp/erp-flat.vmdk" and log[0].range == "bytes=0-9" and log[0].status == 500
    assert log[0].query == QUERY and log[-1].cookies == ("vmware_soap_session",) and log[-1].status == 401


def test_removing_an_older_snapshot_merges_its_delta_under_the_newer(vcsim: Vcsim, soap: Connection) -> None:  # noqa: F811
    vm = find_vm(soap, vcsim.make_vm("crm", [8 * MiB]))
    key = disks_of(vm.config)[0].key
    older = snapshot(vm, "older")
    vcsim.guest_write("crm", 0, 0, b"1" * 512)
    newer = snapshot(vm, "newer")
    vcsim.guest_write("crm", 0, 512, b"2" * 512)
    remove(older)
    assert disks_of(newer.config)[0].backing.fileName == "[LocalDS_0] crm/crm.vmdk"
    live = disks_of(vm.config)[0].backing
    assert (live.fileName, live.parent.fileName) == ("[LocalDS_0] crm/crm-000002.vmdk", "[LocalDS_0] crm/crm.vmdk")
    assert [(a.start, a.length) for a in areas(vm, newer, key, "*").changedArea] == [(0, 512)]
    assert vm.snapshot.rootSnapshotList[0].snapshot == newer
    remove(newer)
    assert folder(vcsim, "GET", "crm/crm-flat.vmdk", {"Range": "bytes=0-1023"})[2] == b"1" * 512 + b"2" * 512
    assert [f.name for f in vm.layoutEx.file if f.name.endswith(".vmdk")] == ["[LocalDS_0] crm/crm.vmdk",
                                                                             "[LocalDS_0] crm/crm-flat.vmdk"]
