"""Text files the datastore synthesizes: VMDK descriptors and a fallback .vmx.

Descriptors use createType="vmfs" with one VMFS extent: the form ESXi expects on an
NFS datastore, which QEMU's vmdk driver reads too. Identifiers (CID, ddb.uuid) derive
from the restore point and disk, so a descriptor reads the same after every restart.
"""

from __future__ import annotations

import hashlib
import re

SECTOR = 512


def _geometry(sectors: int) -> tuple[int, int, int]:
    heads, per_track = 255, 63
    return max(1, min(65535, sectors // (heads * per_track))), heads, per_track


def descriptor_text(disk_name: str, size: int, identity: str) -> bytes:
    """A monolithic "vmfs" descriptor for `<disk_name>-flat.vmdk` of `size` bytes."""
    sectors = -(-size // SECTOR)
    digest = hashlib.blake2b(identity.encode(), digest_size=16).digest()
    cid = digest[:4].hex()
    uuid = " ".join(f"{b:02x}" for b in digest)
    cylinders, heads, per_track = _geometry(sectors)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid}\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{disk_name}-flat.vmdk"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{per_track}"\n'
        f'ddb.uuid = "{uuid}"\n'
        'ddb.virtualHWVersion = "14"\n'
    ).encode()


def minimal_vmx(vm: str, disk_names: list[str]) -> bytes:
    """A bootable-shape .vmx for a point backed up without its own configuration."""
    lines = [
        '.encoding = "UTF-8"',
        'config.version = "8"',
        'virtualHW.version = "14"',
        f'displayName = "{vm}"',
        'guestOS = "otherlinux-64"',
        'memSize = "1024"',
        'numvcpus = "1"',
        f'nvram = "{vm}.nvram"',
        'scsi0.present = "TRUE"',
        'scsi0.virtualDev = "lsilogic"',
    ]
    for unit, name in enumerate(disk_names):
        slot = unit if unit < 7 else unit + 1  # unit 7 is the SCSI controller itself
        lines += [f'scsi0:{slot}.present = "TRUE"', f'scsi0:{slot}.fileName = "{name}.vmdk"']
    return ("\n".join(lines) + "\n").encode()


#: `scsi0:1.fileName = "web_1.vmdk"` and the like: a virtual disk of the .vmx.
_DISK_LINE = re.compile(r'^(?P<key>(?P<bus>scsi|sata|ide|nvme)(?P<controller>\d+):(?P<unit>\d+))\.fileName'
                        r'\s*=\s*"(?P<value>[^"]*\.vmdk)"\s*$', re.IGNORECASE)
#: Device order across buses: SCSI first, as vSphere lists a VM's disks (and backups follow it).
_BUS_ORDER = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
_NVRAM_LINE = re.compile(r'^nvram\s*=\s*"[^"]*"\s*$', re.IGNORECASE)


def session_vmx(vmx: bytes, vm: str, disk_names: list[str]) -> bytes:
    """A backed-up .vmx made to name the session's files.

    The original names its disks as they were on the source datastore (other names,
    other folders, absolute /vmfs paths); the session holds them as `<name>.vmdk` in
    its own folder, in backup order. The disk entries, taken in device order (bus,
    controller, unit, SCSI first: the order backups list disks in), are pointed at those; entries
    past the backed-up disks are marked not present, so ESXi boots without them rather
    than refusing the VM. The nvram entry names `<vm>.nvram`. Every other line is kept.
    """
    lines = vmx.decode("utf-8", "surrogateescape").splitlines()
    disks = sorted(((_BUS_ORDER[m.group("bus").lower()], int(m.group("controller")), int(m.group("unit"))), index, m)
                   for index, line in enumerate(lines) if (m := _DISK_LINE.match(line.strip())))
    missing: set[str] = set()
    for order, (_, index, match) in enumerate(disks):
        if order < len(disk_names):
            lines[index] = f'{match.group("key")}.fileName = "{disk_names[order]}.vmdk"'
        else:
            missing.add(match.group("key").lower())
    for index, line in enumerate(lines):
        key, _, _ = line.strip().partition(".present")
        if key.lower() in missing and line.strip().lower().startswith(f"{key.lower()}.present"):
            lines[index] = f'{key}.present = "FALSE"'
        elif _NVRAM_LINE.match(line.strip()):
            lines[index] = f'nvram = "{vm}.nvram"'
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
