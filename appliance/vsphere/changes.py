"""Changed Block Tracking: which areas of a disk changed between two snapshots.

ESXi tags each disk with a changeId, `<tracking uuid>/<sequence>`, recorded in a
snapshot's configuration. `QueryChangedDiskAreas(snapshot, disk, offset, changeId)`
then lists the areas written since the snapshot that had that changeId (`*`: every
allocated area). An answer covers only part of the disk, so the caller pages until
the end; every answer is checked (it starts where asked, moves forward, its areas are
sorted, disjoint and inside the disk), because a wrong answer here silently makes a
restore point that lacks data. The tracking uuid changes when tracking is reset, and a
changeId of another uuid means nothing for this disk: the backup is then a full one.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyVmomi import vim, vmodl

from appliance.errors import VsphereError
from appliance.vsphere.client import fault_text

#: The changeId that asks for every allocated area: what a full backup of a thin disk reads.
EVERYTHING = "*"


class ChangeTrackingFailed(VsphereError):
    """CBT could not say what changed; the caller reads the whole disk instead."""


@dataclass(frozen=True)
class ChangeId:
    tracking: str  # the uuid part: the same for as long as tracking was never reset
    sequence: str

    @classmethod
    def parse(cls, text: str) -> ChangeId | None:
        """None for what is not a changeId (CBT off, or a value from something else)."""
        tracking, slash, sequence = text.rpartition("/")
        if not slash or not tracking.strip() or not sequence.strip():
            return None
        return cls(tracking.strip(), sequence.strip())


def changed_areas(vm: vim.VirtualMachine, snapshot: vim.vm.Snapshot, disk_key: int, capacity: int,
                  since: str) -> list[tuple[int, int]]:
    """(offset, length) areas of the disk at `snapshot` written since the changeId `since` (or allocated,
    for `EVERYTHING`), merged where they touch; ChangeTrackingFailed on any fault or inconsistent answer."""
    areas: list[tuple[int, int]] = []
    offset = 0
    while offset < capacity:
        try:
            info = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=disk_key, startOffset=offset, changeId=since)
        except vmodl.MethodFault as fault:
            raise ChangeTrackingFailed(f"changed areas of disk {disk_key} from offset {offset}: "
                                       f"{fault_text(fault)}") from None
        start, length = int(info.startOffset), int(info.length)
        if start != offset or length <= 0:
            raise ChangeTrackingFailed(f"changed areas of disk {disk_key}: asked from offset {offset}, the answer "
                                       f"covers {length} bytes from {start} (no progress)")
        end = start + length
        for area in info.changedArea or []:
            area_start, area_length = int(area.start), int(area.length)
            last_end = areas[-1][0] + areas[-1][1] if areas else 0
            if area_length <= 0 or area_start < max(start, last_end) or area_start + area_length > min(end, capacity):
                raise ChangeTrackingFailed(
                    f"changed areas of disk {disk_key}: area {area_start}+{area_length} is out of order or outside "
                    f"the answer's span {start}-{end} of a {capacity}-byte disk")
            if areas and area_start == last_end:
                areas[-1] = (areas[-1][0], areas[-1][1] + area_length)
            else:
                areas.append((area_start, area_length))
        offset = end
    return areas
