"""File-level recovery from LVM2 logical volumes, in PVs written by hand and checked by LVM's own tools.

Disk 0 has a GPT: partition 1 is ext4, partition 2 an LVM2 PV of VG vg0 with LVs root
(ext4, in two segments, the second half of the LV before the first on the PV), docs (FAT),
snap (the copy-on-write store of a snapshot of root: refused) and far (on a PV of vg0 that
is not on this disk: refused). Disk 1 is a PV on the whole disk, without a partition table,
of VG vg-data with LV my-files (XFS): names with '-', which the /files view doubles.
`pvck` checks each PV's headers and checksums and `vgcfgrestore --list` imports its
metadata, so the format is LVM's, not only this reader's idea of it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.store import open_store
from tests.lvm2_pv import EXTENT, MDA_OFFSET, MIB, PE_START, Lv, Segment, Vg, write_pv
from tests.test_api import serving_api
from tests.test_flr import Backed as FlrBacked
from tests.test_flr import LONG_NAME, NON_ASCII, disk_with, ext4_image, fat_image, make_tree, one_line_error, sh, \
    sha256, xfs_image
from tests.conftest import run_cli
from tests.test_nfs_serve import serve_with_mount

pytestmark = pytest.mark.slow

HALF = 4 * EXTENT  # root's 32 MiB ext4 is 8 extents: LV extents 0-3 on PE 12-15, 4-7 on PE 0-3
SNAPSHOT = Segment(0, 8, text='type = "snapshot"\nchunk_size = 8\norigin = "root"\ncow_store = "snap"\n')


def vg0() -> Vg:
    return Vg("vg0", PE_START + 20 * EXTENT, [
        Lv("root", [Segment(0, 4, pv_extent=12), Segment(4, 4, pv_extent=0)]),
        Lv("docs", [Segment(0, 8, pv_extent=4)]),
        Lv("snap", [Segment(0, 1, pv_extent=16)]),
        Lv("snapshot0", [SNAPSHOT], visible=False),
        Lv("far", [Segment(0, 2, pv="pv1", pv_extent=0)]),
    ], elsewhere={"pv1": 10})


def vg_data() -> Vg:
    return Vg("vg-data", PE_START + 77 * EXTENT, [Lv("my-files", [Segment(0, 75, pv_extent=1)])], metadata_areas=2)


@dataclass
class Backed(FlrBacked):
    """The disks backed up, and the PV images on their own for LVM's tools."""

    pvs: list[Path]


@pytest.fixture(scope="module")
def backed(tmp_path_factory: pytest.TempPathFactory) -> Backed:
    work = tmp_path_factory.mktemp("flr-lvm")
    tree = make_tree(work / "tree", b"hello, logical volume\n")
    root, docs, xfs, plain = work / "root.img", work / "docs.img", work / "xfs.img", work / "plain.img"
    ext4_image(tree, root)
    fat_image(tree, docs)
    xfs_image(tree, xfs)
    ext4_image(tree, plain)
    pv0 = write_pv(work / "pv0.img", vg0(), {12: (root, 0, HALF), 0: (root, HALF, HALF), 4: (docs, 0, 8 * EXTENT),
                                            16: (root, 0, EXTENT)})  # snap's store looks like an ext4: refused anyway
    pv1 = write_pv(work / "pv1.img", vg_data(), {1: (xfs, 0, 75 * EXTENT)})
    disk0 = disk_with([plain, pv0], "gpt", work / "disk0.img")
    store = work / "store"
    run_cli("--store", str(store), "init", check=True)
    point = run_cli("--store", str(store), "backup", "--vm", "lvm", str(disk0), str(pv1), check=True).stdout.strip()
    return Backed(store, tree, [disk0, pv1], point, [pv0, pv1])


@pytest.mark.parametrize("pv, vg", [(0, "vg0"), (1, "vg-data")])
def test_lvm_reads_the_hand_written_pv(backed: Backed, tmp_path: Path, pv: int, vg: str) -> None:
    """The peer: pvck finds no fault in the headers or checksums, and vgcfgrestore imports the VG's metadata."""
    quiet = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    headers = subprocess.run(["pvck", "--dump", "headers", str(backed.pvs[pv])], capture_output=True, text=True,
                             env=quiet)
    said = headers.stdout + headers.stderr
    assert headers.returncode == 0 and "CHECK" not in said and f"# vgname {vg} seqno 7" in said, said
    text = tmp_path / "metadata.txt"
    subprocess.run(["pvck", "--dump", "metadata", "--file", str(text), str(backed.pvs[pv])], capture_output=True,
                   check=True, env=quiet)
    imported = subprocess.run(["vgcfgrestore", "--list", "--file", str(text), vg], capture_output=True, text=True,
                              env=quiet)
    lines = [line.split() for line in imported.stdout.splitlines()]
    assert imported.returncode == 0 and ["VG", "name:", vg] in lines, imported.stdout + imported.stderr


def test_each_logical_volume_is_listed_with_its_names_size_and_format(backed: Backed) -> None:
    listing = json.loads(backed.cli("files", "ls", "--vm", "lvm", "--json").stdout)
    shown = [(v["partition"], v["scheme"], v["format"], v["type"], v["size"]) for v in listing["0"]]
    assert shown == [(1, "gpt", "ext", shown[0][3], 32 * MIB), (2, "gpt", "lvm2", shown[1][3], 81 * MIB),  # all of it
                     ("2/vg0/root", "lvm2", "ext", "linear", 32 * MIB),
                     ("2/vg0/docs", "lvm2", "fat", "linear", 32 * MIB),
                     ("2/vg0/snap", "lvm2", "unknown", "linear", 4 * MIB),
                     ("2/vg0/far", "lvm2", "unknown", "linear", 8 * MIB)]
    root = listing["0"][2]
    assert (root["vg"], root["lv"], root["refused"]) == ("vg0", "root", None)
    assert "snapshot of 'root'" in listing["0"][4]["refused"] and "not on this disk" in listing["0"][5]["refused"]
    assert [(v["partition"], v["format"]) for v in listing["1"]] == [(0, "lvm2"), ("0/vg-data/my-files", "xfs")]
    text = backed.cli("files", "ls", "--vm", "lvm").stdout
    assert "partition 2/vg0/root  lvm2" in text and "(logical volume 2/vg0/snap cannot be browsed" in text


#: (disk, volume, path in the volume, path in the source tree)
FILES = [
    (0, "2/vg0/root", "/hello.txt", "hello.txt"), (0, "2/vg0/root", "/dir/big.bin", "dir/big.bin"),
    (0, "2/vg0/root", "/sparse.bin", "sparse.bin"), (0, "2/vg0/root", f"/dir/sub/{NON_ASCII}", f"dir/sub/{NON_ASCII}"),
    (0, "2/vg0/root", f"/{LONG_NAME}", LONG_NAME),
    (0, "2/vg0/docs", "/hello.txt", "hello.txt"), (0, "2/vg0/docs", "/docs/big.bin", "dir/big.bin"),
    (1, "0/vg-data/my-files", "/dir/big.bin", "dir/big.bin"), (1, "0/vg-data/my-files", f"/{LONG_NAME}", LONG_NAME),
    (0, "1", "/dir/big.bin", "dir/big.bin"), (0, "01", "/hello.txt", "hello.txt"),
]


@pytest.mark.parametrize("disk, volume, path, source", FILES, ids=[f"{d}-{v}{p[:30]}" for d, v, p, _ in FILES])
def test_every_file_of_every_logical_volume_reads_back_exactly(backed: Backed, tmp_path: Path, disk: int, volume: str,
                                                               path: str, source: str) -> None:
    output = tmp_path / "out"
    result = backed.cli("files", "get", "--vm", "lvm", "--disk", str(disk), "--partition", volume, path,
                        "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert sha256(output.read_bytes()) == sha256((backed.tree / source).read_bytes())


def test_a_file_of_a_logical_volume_is_read_without_reading_the_disk(backed: Backed, tmp_path: Path) -> None:
    result = backed.cli("files", "get", "--vm", "lvm", "--partition", "2/vg0/root", "/dir/big.bin",
                        "--output", str(tmp_path / "big"))
    chunks = int(result.stderr.split("read ")[1].split(" chunks")[0])
    with open_store(backed.store) as store:
        chunk_size = store.config.chunk_size
    assert chunks * chunk_size <= 2 * 3_000_000 + 4 * chunk_size, (chunks, chunk_size)


def test_refused_logical_volumes_say_why_in_one_line(backed: Backed) -> None:
    def ls(volume: str) -> subprocess.CompletedProcess[str]:
        return backed.cli("files", "ls", "--vm", "lvm", "--partition", volume, "/")

    one_line_error(ls("2/vg0/snap"), 1, "logical volume 2/vg0/snap cannot be browsed: a snapshot of 'root'")
    one_line_error(ls("2/vg0/far"), 1, "its extents lie on pv1, another PV of VG 'vg0' that is not on this disk")
    one_line_error(ls("2"), 1, "partition 2 is an LVM2 physical volume: name one of its logical volumes")
    one_line_error(ls("2/vg0/nothing"), 1, "no partition 2/vg0/nothing (partitions: 1, 2, 2/vg0/root,")
    one_line_error(ls("2/vg0/root/../x"), 1, "no partition 2/vg0/root/../x")
    one_line_error(backed.cli("files", "ls", "--vm", "lvm", "/"), 1, "name a partition with --partition")
    one_line_error(ls("vg0/root"), 2, "invalid partition 'vg0/root'")


def damage_metadata(pv_image: Path, area: int) -> None:
    """One byte of the metadata text in the area at `area`: the LV would start at extent 2 of the PV, not 1."""
    with open(pv_image, "r+b") as pv:
        pv.seek(area)
        text = pv.read(MIB)
        pv.seek(area + text.index(b'"pv0", 1'))
        pv.write(b'"pv0", 2')


def test_a_damaged_metadata_area_is_a_clear_error_never_wrong_bytes(backed: Backed, tmp_path: Path) -> None:
    damaged = tmp_path / "pv.img"
    sh("cp", "--sparse=always", str(backed.pvs[1]), str(damaged))
    damage_metadata(damaged, MDA_OFFSET)
    backed.cli("backup", "--vm", "lvm-first-copy-damaged", str(damaged))
    output = tmp_path / "big.bin"  # LVM's second copy of the metadata is read instead
    backed.cli("files", "get", "--vm", "lvm-first-copy-damaged", "/dir/big.bin", "--output", str(output))
    assert sha256(output.read_bytes()) == sha256((backed.tree / "dir" / "big.bin").read_bytes())
    damage_metadata(damaged, vg_data().areas[1])
    backed.cli("backup", "--vm", "lvm-damaged", str(damaged))
    one_line_error(backed.cli("files", "ls", "--vm", "lvm-damaged", "--partition", "0/vg-data/my-files", "/"), 3,
                   "partition 0: LVM2 metadata area at byte 4096: its metadata text fails its CRC")
    listing = json.loads(backed.cli("files", "ls", "--vm", "lvm-damaged", "--json").stdout)
    assert [(v["partition"], v["format"]) for v in listing["0"]] == [(0, "lvm2")]
    assert "fails its CRC" in listing["0"][0]["error"]
    one_line_error(backed.cli("files", "find", "--vm", "lvm-damaged", "*"), 3, "fails its CRC")


def test_the_api_lists_logical_volumes_and_serves_their_files(backed: Backed) -> None:
    with serving_api(backed.store) as api:
        base = f"/vms/lvm/points/{backed.first_point}"
        volumes = api.client.get(f"{base}/volumes").json()
        assert [volume["partition"] for volume in volumes["0"]][2:4] == ["2/vg0/root", "2/vg0/docs"]
        big = sha256((backed.tree / "dir" / "big.bin").read_bytes())
        for disk, partition, path in ((0, "2/vg0/root", "/dir/big.bin"), (0, "2/vg0/docs", "/docs/big.bin"),
                                      (1, "0/vg-data/my-files", "/dir/big.bin")):
            where = {"disk": disk, "partition": partition, "path": path}
            content = api.client.get(f"{base}/files/content", params=where)
            assert content.status_code == 200 and sha256(content.content) == big, content.text[:200]
        listing = api.client.get(f"{base}/files", params={"partition": "2/vg0/root", "path": "/dir"}).json()
        assert {entry["name"] for entry in listing} == {"big.bin", "link", "sub"}
        refused = api.client.get(f"{base}/files", params={"partition": "2/vg0/snap"})
        assert refused.status_code == 409 and "snapshot of 'root'" in refused.json()["message"]
        invalid = api.client.get(f"{base}/files", params={"partition": "../x"})
        assert invalid.status_code == 422
        found = api.client.get("/vms/lvm/files", params={"name": "big.bin"}).json()
        assert {(hit["disk"], hit["partition"], hit["path"]) for hit in found} == {
            (0, 1, "/dir/big.bin"), (0, "2/vg0/root", "/dir/big.bin"), (0, "2/vg0/docs", "/docs/big.bin"),
            (1, "0/vg-data/my-files", "/dir/big.bin")}


def test_the_files_view_shows_each_logical_volume_as_a_folder(backed: Backed, tmp_path: Path) -> None:
    server = serve_with_mount(backed.store, tmp_path / "mnt")
    try:
        point = tmp_path / "mnt" / "files" / "lvm" / backed.first_point
        assert sorted(os.listdir(point)) == ["0-p1", "0-p2-vg0-docs", "0-p2-vg0-root", "1-p0-vg--data-my--files"]
        folders = {"2/vg0/root": "0-p2-vg0-root", "2/vg0/docs": "0-p2-vg0-docs",
                   "0/vg-data/my-files": "1-p0-vg--data-my--files"}
        for _, volume, path, source in FILES:
            if volume in folders:
                folder = folders[volume]
                assert sha256((point / folder / path.lstrip("/")).read_bytes()) == \
                    sha256((backed.tree / source).read_bytes()), (folder, path)
        assert os.readlink(point / "0-p2-vg0-root" / "dir" / "link") == "../hello.txt"
        over_nfs = server.url(f"/files/lvm/{backed.first_point}/1-p0-vg--data-my--files/dir/big.bin")
        fetched = subprocess.run(["nfs-cat", over_nfs], capture_output=True, check=True)
        assert sha256(fetched.stdout) == sha256((backed.tree / "dir" / "big.bin").read_bytes())
        damaged_point = next((tmp_path / "mnt" / "files" / "lvm-damaged").iterdir())
        assert os.listdir(damaged_point) == ["0-p0"]  # the PV is shown: its damage shows when it is opened
        with pytest.raises(OSError) as damaged:
            os.listdir(damaged_point / "0-p0")
        assert damaged.value.errno == errno.EIO
    finally:
        assert server.stop() == 0


def test_the_index_keeps_logical_volumes_apart_and_answers_as_a_walk_does(backed: Backed) -> None:
    walked = backed.cli("files", "find", "--vm", "lvm", "*.txt", "--json")
    assert walked.returncode == 0 and "2/vg0/root" in walked.stdout, walked.stderr
    assert backed.cli("files", "index", "--vm", "lvm", "--all").returncode == 0
    assert backed.cli("files", "find", "--vm", "lvm", "*.txt", "--json").stdout == walked.stdout
    with open_store(backed.store) as store, store.env.begin() as txn:
        keys = set(store.catalog.file_index(txn, backed.first_point) or {})
    assert keys == {(0, 1, ""), (0, 2, "vg0/root"), (0, 2, "vg0/docs"), (1, 0, "vg-data/my-files")}
