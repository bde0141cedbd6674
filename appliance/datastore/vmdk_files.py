"""Text files the datastore synthesizes: VMDK descriptors and a fallback .vmx.

Descriptors use createType="vmfs" with one VMFS extent: the form ESXi expects on an
NFS datastore, which QEMU's vmdk driver reads too. Identifiers (CID, ddb.uuid) derive
from the restore point and disk, so a descriptor reads the same after every restart.
"""

from __future__ import annotations

import hashlib

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
