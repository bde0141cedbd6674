"""The decisions of a vSphere backup that need no vSphere: names on the wire, read plans, full or incremental."""

from __future__ import annotations

import pytest

from appliance.errors import BackupRefused, TransferError
from appliance.protection.job import _why_full
from appliance.protection.reader import RANGE_SIZE, SnapshotDiskSource, _overlap, chunk_ranges
from appliance.store.catalog import DiskInfo, RestorePoint
from appliance.vsphere.changes import ChangeId
from appliance.vsphere.disks import SnapshotDisk, flat_extent
from appliance.vsphere.transfer import DatastoreFile, folder_target

MIB = 1 << 20


def test_folder_targets_percent_encode_every_name() -> None:
    file = DatastoreFile.parse("Europe/DC #1", "[ds & co] web 01/web?01.vmdk")
    assert file == DatastoreFile("Europe/DC #1", "ds & co", "web 01/web?01.vmdk")
    assert folder_target(file) == "/folder/web%2001/web%3F01.vmdk?dcPath=Europe%2FDC%20%231&dsName=ds%20%26%20co"
    assert file.sibling("web-flat.vmdk").path == "web 01/web-flat.vmdk"


@pytest.mark.parametrize("name", ["web.vmdk", "[ds]", "[ds] ", "ds] x.vmdk"])
def test_a_name_that_is_no_datastore_path_is_refused(name: str) -> None:
    with pytest.raises(TransferError, match="not a datastore path"):
        DatastoreFile.parse("DC0", name)


def test_read_plans_join_touching_areas_widen_to_chunks_and_split_long_runs() -> None:
    size = 64 * MIB
    assert chunk_ranges([(10, 5), (MIB - 1, 2)], size, MIB) == [(0, 2 * MIB)]
    assert chunk_ranges([(0, 1), (3 * MIB, 1)], size, MIB) == [(0, MIB), (3 * MIB, 4 * MIB)]
    long_run = chunk_ranges([(0, size)], size, MIB)
    assert all(end - start == RANGE_SIZE for start, end in long_run) and long_run[-1][1] == size
    assert chunk_ranges([(size - 10, 100)], size + 7, MIB) == [(63 * MIB, size + 7)]  # clipped to the disk


def test_only_allocated_parts_of_wanted_areas_are_read() -> None:
    assert _overlap([(0, 100)], [(10, 5), (50, 100)]) == [(10, 5), (50, 50)]
    assert _overlap([(0, 10), (20, 10)], [(5, 20)]) == [(5, 5), (20, 5)]


def test_holes_are_what_no_allocated_area_touches() -> None:
    source = SnapshotDiskSource(_NoTransport(), DatastoreFile("DC0", "ds", "a-flat.vmdk"), 8 * MIB, MIB,
                                [(0, 8 * MIB)], [(MIB + 5, 10), (4 * MIB, 2 * MIB)], 2, lambda: None)
    with source:
        holes = [index for index in range(8) if source.is_unallocated(index * MIB, MIB)]
    assert holes == [0, 2, 3, 6, 7]


INSTANCE = "5012a3b4-0000-4000-8000-000000000001"


def _point(disks: list[dict[str, object]], instance: str = INSTANCE) -> RestorePoint:
    return RestorePoint("20261206T000000Z-0000", "web", 0.0, None, (DiskInfo("web", 8 * MIB, "vmdk-flat", 8),),
                        origin={"source": "vsphere", "instance_uuid": instance, "disks": disks})


def _disk(change_id: str | None, capacity: int = 8 * MIB, key: int = 2000) -> SnapshotDisk:
    return SnapshotDisk(key, "Hard disk 1", capacity, DatastoreFile("DC0", "ds", "web/web.vmdk"), change_id)


TRACKED = "52 aa bb cc dd ee ff 00-11 22 33 44 55 66 77 88"


@pytest.mark.parametrize(("before", "now", "reason"), [
    (None, _disk(f"{TRACKED}/4"), "no previous restore point"),
    ({"key": 2001, "capacity": 8 * MIB, "change_id": f"{TRACKED}/3"}, _disk(f"{TRACKED}/4"), "does not have"),
    ({"key": 2000, "capacity": 4 * MIB, "change_id": f"{TRACKED}/3"}, _disk(f"{TRACKED}/4"), "size changed"),
    ({"key": 2000, "capacity": 8 * MIB, "change_id": None}, _disk(f"{TRACKED}/4"), "CBT was off"),
    ({"key": 2000, "capacity": 8 * MIB, "change_id": f"{TRACKED}/3"}, _disk(None), "not active"),
    ({"key": 2000, "capacity": 8 * MIB, "change_id": "52 00-00/3"}, _disk(f"{TRACKED}/4"), "reset"),
])
def test_a_disk_is_read_whole_for_each_reason_a_changeid_cannot_be_trusted(
        before: dict[str, object] | None, now: SnapshotDisk, reason: str) -> None:
    previous = None if before is None else _point([before])
    found = _why_full(now, previous, 0, INSTANCE)
    assert found is not None and reason in found


def test_a_point_of_another_vm_of_the_same_name_is_no_base() -> None:
    previous = _point([{"key": 2000, "capacity": 8 * MIB, "change_id": f"{TRACKED}/3"}], instance="other")
    found = _why_full(_disk(f"{TRACKED}/9"), previous, 0, INSTANCE)
    assert found is not None and "another instance uuid" in found


def test_a_disk_with_the_same_tracking_uuid_is_incremental() -> None:
    previous = _point([{"key": 2000, "capacity": 8 * MIB, "change_id": f"{TRACKED}/3"}])
    assert _why_full(_disk(f"{TRACKED}/9"), previous, 0, INSTANCE) is None
    assert ChangeId.parse(f"{TRACKED}/9") == ChangeId(TRACKED, "9")
    assert ChangeId.parse("*") is None and ChangeId.parse("") is None


class _NoTransport:
    """Answers nothing: the tests above never read."""

    def read_file(self, file: DatastoreFile, limit: int) -> bytes:
        raise AssertionError(f"unexpected read of {file}")

    def read_range(self, file: DatastoreFile, offset: int, length: int) -> bytes:
        raise AssertionError(f"unexpected read of {file}")

    def close(self) -> None:
        pass


class _Descriptors(_NoTransport):
    def __init__(self, text: str) -> None:
        self.text = text

    def read_file(self, file: DatastoreFile, limit: int) -> bytes:
        return self.text.encode()


FLAT = '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n' \
       'RW 16384 VMFS "web-flat.vmdk"\nddb.adapterType = "lsilogic"\n'


def test_a_flat_descriptor_names_the_file_to_read() -> None:
    assert flat_extent(_Descriptors(FLAT), _disk(None)) == DatastoreFile("DC0", "ds", "web/web-flat.vmdk")


@pytest.mark.parametrize(("text", "reason"), [
    (FLAT.replace('"vmfs"', '"seSparse"'), "createType 'seSparse'"),
    (FLAT.replace("parentCID=ffffffff", "parentCID=12345678"), "delta"),
    (FLAT + 'RW 16384 VMFS "web-flat2.vmdk"\n', "2 extents"),
    (FLAT.replace("RW 16384", "RW 8192"), "holds 4194304 bytes"),
    (FLAT.replace('"web-flat.vmdk"', '"web-flat.vmdk" 8'), "sector 8"),
])
def test_descriptors_of_disks_that_are_not_one_flat_file_are_refused(text: str, reason: str) -> None:
    with pytest.raises(BackupRefused, match=reason):
        flat_extent(_Descriptors(text), _disk(None))
