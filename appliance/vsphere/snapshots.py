"""Backup snapshots: taken with a name that says whose they are, and always removed again.

A snapshot left behind grows its delta file until the datastore fills, so every
snapshot the appliance takes carries a tag in its name, `appliance-backup <store>
<job>`: the store's id keeps two appliances on one vCenter from sweeping each other's
snapshots, and no snapshot of another tool (or of an operator) is ever touched.
Removal retries while ESXi still holds the files locked (a backup reader just let go),
and a removal that leaves the VM running on a delta (`consolidationNeeded`) is
followed by a consolidation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from pyVmomi import vim

from appliance.errors import TaskFailed, VsphereError
from appliance.vsphere.client import Connection, faults, wait_for_task

#: Every appliance snapshot's name starts with this word.
TAG = "appliance-backup"
#: Removal is retried this many times while the files are locked, pausing LOCKED_PAUSE s, doubling.
REMOVE_ATTEMPTS = 5
LOCKED_PAUSE = 1.0
#: Faults that say the quiesce (VSS/VMware Tools freeze) failed, not the snapshot as such.
QUIESCE_FAULTS = frozenset({"ApplicationQuiesceFault", "ToolsUnavailable", "ToolsNotRunning"})


@dataclass(frozen=True)
class Taken:
    snapshot: vim.vm.Snapshot
    name: str
    consistency: str  # "application": quiesced by VMware Tools; "crash": as if the power was cut


def snapshot_name(store_id: str, job_id: str) -> str:
    return f"{TAG} {store_id[:8]} {job_id}"


def owner_prefix(store_id: str) -> str:
    """What every snapshot of this store's appliance is named with, and no other's."""
    return f"{TAG} {store_id[:8]} "


def take_snapshot(connection: Connection, vm: vim.VirtualMachine, name: str, quiesce: str,
                  timeout: float) -> Taken:
    """A snapshot without memory; `quiesce` is "yes" (fail if the guest cannot be quiesced), "try" (fall
    back to a crash-consistent snapshot) or "no"."""
    description = "Taken by the instant-recovery appliance for a backup; it removes it when the backup ends."
    what = f"snapshot VM {vm.name!r} as {name!r}"
    if quiesce != "no":
        try:
            with faults(what):
                task = vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=True)
            return Taken(wait_for_task(task, f"{what} (quiesced)", timeout), name, "application")
        except TaskFailed as failure:
            if quiesce == "yes" or failure.fault not in QUIESCE_FAULTS:
                raise
    with faults(what):
        task = vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=False)
    return Taken(wait_for_task(task, what, timeout), name, "crash")


def remove_snapshot(connection: Connection, vm: vim.VirtualMachine, snapshot: vim.vm.Snapshot, name: str,
                    timeout: float) -> None:
    """Remove (and merge) one snapshot; retried while ESXi reports its files locked."""
    what = f"remove snapshot {name!r} of VM {vm.name!r}"
    pause = LOCKED_PAUSE
    for attempt in range(1, REMOVE_ATTEMPTS + 1):
        try:
            with faults(what):
                task = snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
            wait_for_task(task, what, timeout)
            break
        except TaskFailed as failure:
            if failure.fault != "FileLocked" or attempt == REMOVE_ATTEMPTS:
                raise
            time.sleep(pause)
            pause *= 2


def consolidate_if_needed(connection: Connection, vm: vim.VirtualMachine, timeout: float) -> bool:
    """Merge deltas no snapshot owns any more; True if one was needed. A failure is an error: the VM is
    left running on a delta that grows, which an operator must hear about."""
    with faults(f"read VM {vm.name!r}"):
        needed = bool(vm.runtime.consolidationNeeded)
    if needed:
        what = f"consolidate the disks of VM {vm.name!r}"
        with faults(what):
            task = vm.ConsolidateVMDisks_Task()
        wait_for_task(task, what, timeout)
    return needed


def appliance_snapshots(vm: vim.VirtualMachine, prefix: str) -> list[tuple[vim.vm.Snapshot, str]]:
    """This appliance's snapshots of the VM (name starts with `prefix`), children before parents."""
    found = [(tree.snapshot, tree.name) for tree in _trees_of(vm) if tree.name.startswith(prefix)]
    return list(reversed(found))


def find_snapshot(vm: vim.VirtualMachine, name: str) -> vim.vm.Snapshot | None:
    return next((tree.snapshot for tree in _trees_of(vm) if tree.name == name), None)


def sweep(connection: Connection, vm: vim.VirtualMachine, prefix: str, timeout: float) -> list[str]:
    """Remove every snapshot of this appliance the VM still has (a crashed backup's); their names."""
    removed = []
    for snapshot, name in appliance_snapshots(vm, prefix):
        try:
            remove_snapshot(connection, vm, snapshot, name, timeout)
        except VsphereError:
            if find_snapshot(vm, name) is not None:
                raise
        removed.append(name)
    if removed:
        consolidate_if_needed(connection, vm, timeout)
    return removed


def snapshot_trees(info: vim.vm.SnapshotInfo | None) -> Iterator[vim.vm.SnapshotTree]:
    """Every snapshot of a VM's snapshot info (None: it has none), parents before their children."""
    pending = list(reversed(info.rootSnapshotList)) if info is not None else []
    while pending:
        tree = pending.pop()
        yield tree
        pending.extend(reversed(tree.childSnapshotList or []))


def _trees_of(vm: vim.VirtualMachine) -> list[vim.vm.SnapshotTree]:
    with faults(f"list the snapshots of VM {vm.name!r}"):
        return list(snapshot_trees(vm.snapshot))
