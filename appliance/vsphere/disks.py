"""Which VMs and disks a backup over the datastore file service can read, and where their bytes are.

The transport reads a disk's flat extent file. Some disks have none, or have one
that does not hold the disk's data: vSAN and vVols objects, raw device mappings,
independent disks (left out of snapshots, so a backup of them would not be of one
moment), encrypted disks. Those are refused before the snapshot, each with its
reason, so an operator learns at once what must change instead of reading a
half-made point. After the snapshot, each disk's descriptor must be a plain flat disk
with one extent and no parent: a delta means the VM had snapshots of its own when
the backup snapshot was taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from appliance.errors import BackupRefused, SourceError
from appliance.ingest.vmdk import SECTOR, parse_descriptor
from appliance.vsphere.client import faults
from appliance.vsphere.transfer import DESCRIPTOR_LIMIT, DatastoreFile, DiskTransport

# pyVmomi types every property of a device as optional; the functions below take devices as `Any` and
# read what a disk of a VM's configuration always has.

#: Datastore types whose disks are objects, not files with a -flat extent.
OBJECT_DATASTORES = {"vsan": "vSAN", "VVOL": "vVols", "PMEM": "persistent memory"}
_INDEPENDENT = {"independent_persistent", "independent_nonpersistent"}
_FLAT_TYPES = {"vmfs", "monolithicflat", "vmfseagerzeroedthick", "vmfsthin"}
_BUS_RANKS = ((vim.vm.device.VirtualSCSIController, 0), (vim.vm.device.VirtualAHCIController, 1),
              (vim.vm.device.VirtualNVMEController, 2), (vim.vm.device.VirtualIDEController, 3))
_CREATE_TYPE = re.compile(r'^\s*createType\s*=\s*"([^"]*)"', re.MULTILINE)


@dataclass(frozen=True)
class SnapshotDisk:
    """A disk as the backup snapshot recorded it."""

    key: int  # the device key: stable for the life of the disk, so points pair disks by it
    label: str  # "Hard disk 1"
    capacity: int  # bytes
    descriptor: DatastoreFile
    change_id: str | None


def check_vm(vm: vim.VirtualMachine) -> None:
    """BackupRefused naming every reason this VM cannot be backed up by this transport."""
    with faults(f"read the configuration of VM {vm.name!r}"):
        config = vm.config
        consolidation = bool(vm.runtime.consolidationNeeded)
        datastore_types = {ds.name: ds.summary.type for ds in vm.datastore}
    if config is None:
        raise BackupRefused(f"VM {vm.name!r} has no readable configuration (orphaned or inaccessible)")
    reasons = []
    if consolidation:
        reasons.append("its disks need consolidation (a delta no snapshot owns); consolidate them first")
    if getattr(config, "keyId", None) is not None:
        reasons.append("it is encrypted (VM encryption): its disk files are ciphertext")
    for disk in _disks(config):
        reasons.extend(f"{disk.deviceInfo.label}: {reason}" for reason in _disk_refusals(disk, datastore_types))
    if reasons:
        raise BackupRefused(f"VM {vm.name!r} cannot be backed up over the datastore file service: "
                            + "; ".join(reasons))


def _disk_refusals(disk: Any, datastore_types: dict[str, str]) -> list[str]:
    backing = disk.backing
    if isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo):
        mode = "physical" if backing.compatibilityMode == "physicalMode" else "virtual"
        return [f"a {mode}-mode raw device mapping has no disk file to read"]
    if not isinstance(backing, vim.vm.device.VirtualDevice.FileBackingInfo):
        return [f"its backing {type(backing).__name__} is not a disk file"]
    refusals = []
    datastore = DatastoreFile.parse("", backing.fileName).datastore
    kind = datastore_types.get(datastore, "")
    if kind in OBJECT_DATASTORES:
        refusals.append(f"it lives on {OBJECT_DATASTORES[kind]} datastore {datastore!r}, which has no -flat files")
    mode = str(getattr(backing, "diskMode", ""))
    if mode in _INDEPENDENT:
        refusals.append(f"it is {mode.replace('_', '-')}: snapshots leave it out")
    if getattr(backing, "keyId", None) is not None:
        refusals.append("it is encrypted")
    return refusals


def _disks(config: Any) -> list[Any]:
    """The disks in device order (bus kind, controller, unit: SCSI first), the order a restore point and
    its .vmx list them in."""
    devices = config.hardware.device or []
    controllers = {device.key: device for device in devices}

    def order(disk: Any) -> tuple[int, int, int]:
        controller = controllers.get(disk.controllerKey)
        bus = next((rank for kind, rank in _BUS_RANKS if isinstance(controller, kind)), len(_BUS_RANKS))
        return bus, int(getattr(controller, "busNumber", 0) or 0), int(disk.unitNumber or 0)

    return sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)), key=order)


def snapshot_disks(snapshot: vim.vm.Snapshot, datacenter: str) -> list[SnapshotDisk]:
    """The disks the snapshot recorded, in device order, with the changeIds of that moment."""
    with faults("read the backup snapshot's configuration"):
        config = snapshot.config
        disks = []
        for disk in _disks(config):
            backing = disk.backing
            if getattr(backing, "parent", None) is not None:
                raise BackupRefused(
                    f"{disk.deviceInfo.label} ({backing.fileName}) is a snapshot delta: the VM had snapshots of its "
                    "own before the backup; delete or consolidate them (a backup reads only base disks)")
            disks.append(SnapshotDisk(key=disk.key, label=disk.deviceInfo.label, capacity=_capacity(disk),
                                      descriptor=DatastoreFile.parse(datacenter, backing.fileName),
                                      change_id=getattr(backing, "changeId", None) or None))
    if not disks:
        raise BackupRefused("the VM has no virtual disks to back up")
    return disks


def _capacity(disk: Any) -> int:
    in_bytes = getattr(disk, "capacityInBytes", None)
    return int(in_bytes) if in_bytes else int(disk.capacityInKB) * 1024


def flat_extent(transport: DiskTransport, disk: SnapshotDisk) -> DatastoreFile:
    """The file holding the disk's bytes, from its descriptor; BackupRefused for anything but one flat extent."""
    where = f"{disk.label} descriptor {disk.descriptor}"
    text = transport.read_file(disk.descriptor, DESCRIPTOR_LIMIT).decode("utf-8", "replace")
    found = _CREATE_TYPE.search(text)
    create_type = found.group(1) if found else ""
    if create_type.lower() not in _FLAT_TYPES:
        raise BackupRefused(f"{where} has createType {create_type!r}: only flat (thick or thin) VMFS disks are read, "
                            "not sparse, delta, vSAN or raw-mapped ones")
    try:
        extents = parse_descriptor(text, where)
    except SourceError as exc:
        raise BackupRefused(str(exc)) from None
    if len(extents) != 1:
        raise BackupRefused(f"{where} has {len(extents)} extents; only single-extent disks are read")
    extent = extents[0]
    if extent.kind not in {"VMFS", "FLAT"} or extent.filename is None or extent.offset != 0:
        raise BackupRefused(f"{where}: its extent is {extent.kind} at sector {extent.offset}, not a flat file")
    if extent.sectors * SECTOR != disk.capacity:
        raise BackupRefused(f"{where}: its extent holds {extent.sectors * SECTOR} bytes but the disk has "
                            f"{disk.capacity}")
    return disk.descriptor.sibling(extent.filename)
