"""One backup of one vSphere VM: check, snapshot, ask CBT, read, ingest, and always clean up.

The order matters for what a failure leaves behind:

1. Check the VM (refusals name their reason) and remove this appliance's snapshots a
   crashed backup left on it.
2. Write the intent record, then take the tagged snapshot (quiesced, or crash-consistent
   under `quiesce = "try"` when the guest cannot be quiesced).
3. Read the disks as the snapshot recorded them: descriptors first (a delta or a
   multi-extent disk is refused), then each disk's changed areas since the previous
   point's changeId, or everything allocated for a full backup.
4. Ingest all disks as one restore point; the changeIds are committed with it, so a
   failed backup never moves the base of the next incremental.
5. Remove the snapshot whatever happened (success, failure, cancel, SIGTERM), retrying
   while its files are locked, consolidate when vSphere says so, then drop the intent.

A disk is read whole (a full) when there is no previous point, the previous point has no
changeId for it, its tracking uuid changed (CBT was reset), its size changed, it is not
the same device, or CBT fails to answer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyVmomi import vim

from appliance.errors import VsphereError
from appliance.ingest.backup import ReadCounter, ingest
from appliance.jobs import Step
from appliance.names import VM_NAME
from appliance.protection.intents import Intents
from appliance.protection.reader import SnapshotDiskSource
from appliance.store.catalog import RestorePoint
from appliance.store.repository import Store
from appliance.vsphere.changes import EVERYTHING, ChangeId, ChangeTrackingFailed, changed_areas
from appliance.vsphere.client import Session, datacenter_of, faults, find_vm, wait_for_task
from appliance.vsphere.endpoints import endpoint_for
from appliance.vsphere.disks import SnapshotDisk, check_vm, flat_extent, snapshot_disks
from appliance.vsphere.snapshots import Taken, consolidate_if_needed, find_snapshot, owner_prefix, remove_snapshot, \
    snapshot_name, sweep, take_snapshot
from appliance.vsphere.transfer import DatastoreFile, DiskTransport, FolderTransport, datacenter_path

#: A .vmx is a few KiB and an .nvram at most a few hundred; larger files are not what they claim.
CONFIG_FILE_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True)
class BackupOptions:
    quiesce: str = "try"  # "yes" | "try" | "no"
    enable_cbt: bool = True
    streams: int = 4


class JobContext(Protocol):
    """What a backup needs of the job it runs in (`appliance.jobs.Job`)."""

    id: str

    def step(self, name: str, /, **fields: object) -> contextlib.AbstractContextManager[Step]: ...
    def note(self, name: str, level: int = logging.INFO, /, **fields: object) -> None: ...
    def check_cancelled(self) -> None: ...


@dataclass
class DiskPlan:
    disk: SnapshotDisk
    extent: DatastoreFile
    mode: str  # "full" | "incremental"
    reason: str  # why full, or the changeId the increment is from
    wanted: list[tuple[int, int]]
    allocated: list[tuple[int, int]] | None  # None: unknown, every area is read

    @property
    def changed_bytes(self) -> int:
        return sum(length for _, length in self.wanted)


@dataclass
class BackupResult:
    point: RestorePoint
    consistency: str
    disks: list[DiskPlan]
    bytes_read: int
    requests: int
    seconds: float
    swept: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"point": self.point.id, "vm": self.point.vm, "consistency": self.consistency,
                "bytes_read": self.bytes_read, "requests": self.requests, "seconds": round(self.seconds, 3),
                "changed_bytes": sum(plan.changed_bytes for plan in self.disks), "swept_snapshots": self.swept,
                "disks": [{"label": plan.disk.label, "capacity": plan.disk.capacity, "mode": plan.mode,
                           "reason": plan.reason, "changed_bytes": plan.changed_bytes} for plan in self.disks]}


def back_up_vm(store: Store, session: Session, connection_name: str, vm_name: str, options: BackupOptions,
               job: JobContext, intents: Intents, count_read: ReadCounter | None = None) -> BackupResult:
    """Take one restore point of `vm_name` from vSphere; see the module docstring for the steps."""
    started = time.monotonic()
    timeout = session.settings.timeout
    prefix = owner_prefix(store.config.store_id)
    with job.step("check", vm=vm_name):
        VM_NAME.check(vm_name)
        session.ensure()
        vm = _look_up(session, vm_name)
    with job.step("sweep"):
        swept = sweep(session.connection, vm.obj, prefix, timeout)
    if options.enable_cbt and not vm.tracking:
        with job.step("enable-cbt"):
            _enable_change_tracking(vm, timeout)
    name = snapshot_name(store.config.store_id, job.id)
    intent = intents.record(vm_name, connection_name, job.id, name)
    taken: Taken | None = None
    try:
        with job.step("snapshot", name=name, quiesce=options.quiesce):
            taken = take_snapshot(session.connection, vm.obj, name, options.quiesce, timeout)
        if taken.consistency == "crash" and options.quiesce != "no":
            job.note("backup.crash_consistent", logging.WARNING, vm=vm_name,
                     reason="the guest could not be quiesced; the point is crash-consistent")
        result = _read_snapshot(store, session, connection_name, vm, taken, options, job, count_read)
    finally:
        _clean_up(session, vm, taken, name, intent.job, job, timeout)
        intents.done(intent)
    result.swept, result.seconds = swept, time.monotonic() - started
    return result


@dataclass(frozen=True)
class _Vm:
    """What the backup reads of the VM once, at its check: property reads are SOAP calls, and the
    session may have expired by the time the disks are read."""

    obj: vim.VirtualMachine
    name: str
    datacenter: str  # dcPath
    tracking: bool
    instance_uuid: str
    vmx_path: str  # "[datastore] folder/name.vmx"
    host: str  # the ESXi host that runs it, as the inventory names it: its disks are read there


def _look_up(session: Session, name: str) -> _Vm:
    machine = find_vm(session.connection, name)
    check_vm(machine)
    with faults(f"read VM {name!r}"):
        config: Any = machine.config  # pyVmomi types every property as optional; check_vm saw it set
        runtime: Any = machine.runtime
        return _Vm(machine, name, datacenter_path(datacenter_of(machine)), bool(config.changeTrackingEnabled),
                   str(config.instanceUuid or ""), str(config.files.vmPathName),
                   str(runtime.host.name) if runtime.host is not None else "")


def _enable_change_tracking(vm: _Vm, timeout: float) -> None:
    """CBT starts at the VM's next stun (the backup snapshot is one), so this backup is still a full one."""
    what = f"enable changed block tracking on VM {vm.name!r}"
    with faults(what):
        task = vm.obj.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True))
    wait_for_task(task, what, timeout)


def _clean_up(session: Session, vm: _Vm, taken: Taken | None, name: str, job_id: str,
              job: JobContext, timeout: float) -> None:
    """Remove the backup snapshot; runs on every exit, cancelled or not (never through `job.step`, which
    refuses to start once the job is cancelled). A snapshot task that timed out may have made the
    snapshot after all, so it is looked up by name when `taken` is None."""
    try:
        session.ensure()
        snapshot = taken.snapshot if taken is not None else find_snapshot(vm.obj, name)
        if snapshot is None:
            return
        remove_snapshot(session.connection, vm.obj, snapshot, name, timeout)
        job.note("backup.snapshot_removed", vm=vm.name, snapshot=name)
    except VsphereError as exc:
        job.note("backup.snapshot_left", logging.ERROR, vm=vm.name, snapshot=name, job_id=job_id, reason=str(exc))
        raise VsphereError(f"the backup snapshot {name!r} of VM {vm.name!r} could not be removed: {exc}; "
                           "the next backup or start removes it") from None
    try:
        consolidate_if_needed(session.connection, vm.obj, timeout)
    except VsphereError as exc:
        job.note("backup.consolidation_failed", logging.ERROR, vm=vm.name, reason=str(exc))
        raise VsphereError(f"the backup snapshot of VM {vm.name!r} was removed, but its delta was not merged "
                           f"({exc}): the VM runs on a delta that grows; consolidate its disks") from None


def _read_snapshot(store: Store, session: Session, connection_name: str, vm: _Vm, taken: Taken,
                   options: BackupOptions, job: JobContext, count_read: ReadCounter | None) -> BackupResult:
    transport = FolderTransport(session, endpoint_for(session, vm.host))
    try:
        with job.step("disks"):
            disks = snapshot_disks(taken.snapshot, vm.datacenter)
            extents = [flat_extent(transport, disk) for disk in disks]
            files = _config_files(transport, vm)
        previous = _previous_point(store, vm.name)
        with job.step("changed-areas"):
            session.ensure()
            plans = [_plan(vm, taken.snapshot, disk, extent, previous, index, job)
                     for index, (disk, extent) in enumerate(zip(disks, extents))]
        incremental = previous is not None and any(plan.mode == "incremental" for plan in plans)
        origin = {"source": "vsphere", "connection": connection_name, "url": session.settings.url,
                  "instance_uuid": vm.instance_uuid, "snapshot": taken.name, "consistency": taken.consistency,
                  "disks": [{"key": plan.disk.key, "label": plan.disk.label, "file": str(plan.disk.descriptor),
                             "capacity": plan.disk.capacity, "change_id": plan.disk.change_id, "mode": plan.mode}
                            for plan in plans]}
        with job.step("ingest", disks=len(plans), incremental=incremental):
            with _sources(transport, plans, store.config.chunk_size, options.streams, job) as sources:
                parent = previous.id if incremental and previous is not None else None
                point = ingest(store, vm.name, sources, files, parent,
                               [plan.wanted for plan in plans] if incremental else None,
                               count_read=count_read, origin=origin)
                bytes_read = sum(source.bytes_read for source in sources)
        return BackupResult(point, taken.consistency, plans, bytes_read, transport.requests, 0.0)
    finally:
        transport.close()


@contextlib.contextmanager
def _sources(transport: DiskTransport, plans: list[DiskPlan], chunk_size: int, streams: int,
             job: JobContext) -> Iterator[list[SnapshotDiskSource]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(SnapshotDiskSource(transport, plan.extent, plan.disk.capacity, chunk_size,
                                                      plan.wanted, plan.allocated, streams, job.check_cancelled))
               for plan in plans]


def _plan(vm: _Vm, snapshot: vim.vm.Snapshot, disk: SnapshotDisk, extent: DatastoreFile,
          previous: RestorePoint | None, index: int, job: JobContext) -> DiskPlan:
    whole = [(0, disk.capacity)]
    reason = _why_full(disk, previous, index, vm.instance_uuid)
    if reason is None:
        assert previous is not None
        since = previous.origin["disks"][index]["change_id"]
        try:
            areas = changed_areas(vm.obj, snapshot, disk.key, disk.capacity, since)
            return DiskPlan(disk, extent, "incremental", f"changes since {since}", areas, None)
        except ChangeTrackingFailed as exc:
            reason = f"CBT failed ({exc})"
            job.note("backup.cbt_failed", logging.WARNING, disk=disk.label, reason=str(exc))
    allocated = None
    if disk.change_id is not None:
        try:
            allocated = changed_areas(vm.obj, snapshot, disk.key, disk.capacity, EVERYTHING)
        except ChangeTrackingFailed as exc:
            job.note("backup.cbt_failed", logging.WARNING, disk=disk.label, reason=str(exc))
    return DiskPlan(disk, extent, "full", reason, whole, allocated)


def _why_full(disk: SnapshotDisk, previous: RestorePoint | None, index: int, instance_uuid: str) -> str | None:
    """Why this disk must be read whole, or None when CBT can say what changed since the previous point."""
    if previous is None:
        return "no previous restore point"
    if previous.origin.get("instance_uuid") != instance_uuid:
        return "the previous point is of another VM of this name (another instance uuid)"
    before = previous.origin.get("disks", [])
    if index >= len(before) or before[index].get("key") != disk.key:
        return "a disk the previous point does not have"
    if before[index].get("capacity") != disk.capacity:
        return f"its size changed from {before[index].get('capacity')} to {disk.capacity} bytes"
    old = ChangeId.parse(before[index].get("change_id") or "")
    new = ChangeId.parse(disk.change_id or "")
    if old is None:
        return "the previous point has no changeId for it (CBT was off)"
    if new is None:
        return "CBT is not active on it"
    if old.tracking != new.tracking:
        return "its change tracking was reset (another tracking uuid)"
    return None


def _previous_point(store: Store, vm: str) -> RestorePoint | None:
    """The VM's newest point taken from vSphere: the base of an incremental."""
    with store.env.begin() as txn:
        points = store.catalog.points(txn, vm)
    return next((point for point in reversed(points) if point.origin.get("source") == "vsphere"), None)


def _config_files(transport: DiskTransport, vm: _Vm) -> dict[str, bytes]:
    """The VM's .vmx (and .nvram when it has one), kept so an instant boot registers the VM as it was."""
    vmx_file = DatastoreFile.parse(vm.datacenter, vm.vmx_path)
    files = {}
    vmx = transport.read_file(vmx_file, CONFIG_FILE_LIMIT)
    if vmx.strip():
        files[f"{vm.name}.vmx"] = vmx
    nvram_name = _nvram_name(vmx) or vmx_file.path.rsplit("/", 1)[-1].removesuffix(".vmx") + ".nvram"
    with contextlib.suppress(VsphereError):  # a VM never powered on has no .nvram yet
        nvram = transport.read_file(vmx_file.sibling(nvram_name), CONFIG_FILE_LIMIT)
        if nvram:
            files[f"{vm.name}.nvram"] = nvram
    return files


def _nvram_name(vmx: bytes) -> str | None:
    for line in vmx.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip().lower() == "nvram":
            return value.strip().strip('"') or None
    return None
