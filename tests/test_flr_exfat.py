"""File-level recovery from exFAT volumes that exfat-fuse wrote.

`mkfs.exfat` (exfatprogs) makes the file system and exfat-fuse, a user-space exFAT
implementation, writes the files into the image file through a FUSE mount. exfat-fuse
always asks the kernel for a `fuseblk` mount, which needs a block device, and there are
none here (no loop devices): a small LD_PRELOAD shim, compiled at first use, turns that
one mount(2) into a plain `fuse` mount (and drops `blksize=`, which only fuseblk takes).
exfat-fuse still reads and writes every byte of the image itself; `fsck.exfat -n` checks it.

What exfat-fuse never writes is made by patching one entry set (its checksum recomputed,
`fsck.exfat -n` still clean): a ValidDataLength short of the length (the rest must read
as zeros, not the bytes on disk), a directory of many clusters marked contiguous
(NoFatChain, as Windows writes directories) and a read-only attribute.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import struct
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.flr.exfat import ExfatVolume, set_checksum
from tests.conftest import run_cli
from tests.test_api import serving_api
from tests.test_flr import MIB, Backed, disk_with, one_line_error, run_cli_prefix, sh, sha256
from tests.test_nfs_serve import serve_with_mount

pytestmark = pytest.mark.slow

CLUSTER = 4096
LONG_NAME = "é日本" * 10 + "x" * 166 + ".txt"  # 200 characters, 250 bytes of UTF-8 (Linux allows 255)
MTIME = 1_700_000_001  # an odd second: exFAT keeps it in the 10 ms increment field

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
int mount(const char *source, const char *target, const char *type, unsigned long flags, const void *data) {
    int (*real)(const char *, const char *, const char *, unsigned long, const void *) = dlsym(RTLD_NEXT, "mount");
    static char options[4096];
    if (type != NULL && strcmp(type, "fuseblk") == 0 && data != NULL) {
        char *kept = options;
        const char *option = data;
        while (*option) {
            size_t length = strcspn(option, ",");
            if (strncmp(option, "blksize=", 8) != 0 && kept + length + 2 < options + sizeof options) {
                if (kept != options) *kept++ = ',';
                memcpy(kept, option, length);
                kept += length;
            }
            option += length + (option[length] == ',');
        }
        *kept = 0;
        type = "fuse";
        data = options;
    }
    return real(source, target, type, flags, data);
}
"""


@contextmanager
def exfat_fuse(image: Path, mountpoint: Path, shim: Path) -> Iterator[Path]:
    """The image mounted by exfat-fuse (in the foreground, `-d`, so its exit after unmounting is awaited)."""
    mountpoint.mkdir()
    environment = {**os.environ, "LD_PRELOAD": str(shim), "TZ": "IST-5:30"}  # a UTC offset of +05:30
    daemon = subprocess.Popen(["mount.exfat-fuse", "-d", str(image), str(mountpoint)], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert daemon.poll() is None and time.monotonic() < deadline, "exfat-fuse did not mount"
            time.sleep(0.05)
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
        assert daemon.wait(timeout=60) == 0


def write_tree(root: Path) -> dict[str, bytes]:
    """The files, by path in the volume, written in an order that makes the layouts the reader must handle."""
    rng = random.Random(7)
    files = {"/Docs/Nested/Deeper/note.txt": b"deep\n", f"/Docs/{LONG_NAME}": "é日本\n".encode(),
             "/empty.txt": b"", "/MixedCase.TXT": b"case\n", "/contig.bin": rng.randbytes(5 * CLUSTER + 123),
             "/valid.bin": rng.randbytes(6 * CLUSTER), "/readonly.txt": b"read only\n"}
    (root / "Docs" / "Nested" / "Deeper").mkdir(parents=True)
    (root / "Docs" / "Many").mkdir()
    for n in range(120):  # empty first: the directory grows alone, its clusters stay adjacent
        (root / "Docs" / "Many" / f"entry-number-{n:03}.txt").touch()
        files[f"/Docs/Many/entry-number-{n:03}.txt"] = f"{n}\n".encode()
    for path, data in files.items():
        (root / path[1:]).write_bytes(data)
    with open(root / "hole.tmp", "wb") as hole, open(root / "kept.bin", "wb") as kept:
        for _ in range(6):  # interleaved cluster by cluster; deleting hole.tmp leaves holes /frag.bin fills
            for handle in (hole, kept):
                handle.write(rng.randbytes(CLUSTER))
                handle.flush()
    files["/kept.bin"] = (root / "kept.bin").read_bytes()
    (root / "hole.tmp").unlink()
    files["/frag.bin"] = rng.randbytes(9 * CLUSTER + 77)
    (root / "frag.bin").write_bytes(files["/frag.bin"])
    for path in files:
        os.utime(root / path[1:], (MTIME, MTIME))
    return files


def fat_offset(image: bytes | bytearray) -> int:
    """Where the FAT starts: the boot sector's FatOffset, in 512-byte sectors (mkfs.exfat's default)."""
    return int(struct.unpack_from("<I", image, 0x50)[0]) * 512


def patch_entry(image: Path, name: str, attributes: int = 0, no_fat_chain: bool = False,
                valid_length: int | None = None) -> None:
    """OR `attributes` into a file entry, set its ValidDataLength, or mark it contiguous (NoFatChain) and zero
    its FAT entries, as Windows leaves them; then recompute the set checksum. The name (15 units at most) is
    found by its one name entry."""
    data = bytearray(image.read_bytes())
    encoded = name.encode("utf-16-le")
    at = data.find(bytes([0xC1, 0]) + encoded + bytes(30 - len(encoded))) - 64
    assert at > 0 and data[at] == 0x85 and data[at + 32] == 0xC0, name
    struct.pack_into("<H", data, at + 4, struct.unpack_from("<H", data, at + 4)[0] | attributes)
    if no_fat_chain:
        data[at + 33] |= 0x02
        first, length = struct.unpack_from("<IQ", data, at + 52)
        start = fat_offset(data) + first * 4
        data[start : start + 4 * -(-length // CLUSTER)] = bytes(4 * -(-length // CLUSTER))
    if valid_length is not None:
        struct.pack_into("<Q", data, at + 40, valid_length)
    struct.pack_into("<H", data, at + 2, set_checksum(bytes(data[at : at + 96])))
    image.write_bytes(data)


@dataclass
class ExfatBacked(Backed):
    """test_flr's backed-up disk, with the exFAT image and its files by path (their bytes as they must read)."""

    files: dict[str, bytes]
    image: Path


@pytest.fixture(scope="module")
def backed(tmp_path_factory: pytest.TempPathFactory) -> ExfatBacked:
    work = tmp_path_factory.mktemp("exfat")
    (work / "shim.c").write_text(SHIM)
    sh("cc", "-shared", "-fPIC", "-o", str(work / "shim.so"), str(work / "shim.c"), "-ldl")
    image = work / "exfat.img"
    with open(image, "wb") as out:
        out.truncate(32 * MIB)
    sh("mkfs.exfat", "-c", str(CLUSTER), str(image))
    with exfat_fuse(image, work / "mnt", work / "shim.so") as root:
        files = write_tree(root)
    sh("fsck.exfat", "-n", str(image))
    files["/valid.bin"] = files["/valid.bin"][: 2 * CLUSTER + 5] + bytes(4 * CLUSTER - 5)
    patch_entry(image, "valid.bin", valid_length=2 * CLUSTER + 5)
    patch_entry(image, "readonly.txt", attributes=0x01)
    patch_entry(image, "Many", no_fat_chain=True)
    sh("fsck.exfat", "-n", str(image))
    store = work / "store"
    disk = disk_with([image], "gpt", work / "disk.img")
    run_cli("--store", str(store), "init", check=True)
    point = run_cli("--store", str(store), "backup", "--vm", "exfat", str(disk), check=True).stdout.strip()
    return ExfatBacked(store, work, [disk], point, files, image)


def test_the_image_has_what_the_reader_must_handle(backed: ExfatBacked) -> None:
    """A contiguous file, a fragmented one, a contiguous directory of several clusters: exfat-fuse made them."""
    raw = backed.image.read_bytes()
    with open(backed.image, "rb") as image:
        volume = ExfatVolume(image)
        contig, frag = volume.child(volume.root, "contig.bin"), volume.child(volume.root, "frag.bin")
        docs = volume.child(volume.root, "docs")
        many = volume.child(docs, "many") if docs is not None else None
    assert contig is not None and contig.contiguous and backed.files["/contig.bin"] in raw
    assert frag is not None and not frag.contiguous and backed.files["/frag.bin"] not in raw
    assert backed.files["/frag.bin"][:CLUSTER] in raw  # written, in pieces
    assert many is not None and many.contiguous and many.length > CLUSTER


def test_the_volume_is_listed_and_lookups_ignore_case(backed: ExfatBacked, tmp_path: Path) -> None:
    listing = json.loads(backed.cli("files", "ls", "--vm", "exfat", "--json").stdout)
    assert [(v["partition"], v["scheme"], v["format"]) for v in listing["0"]] == [(1, "gpt", "exfat")]
    root = json.loads(backed.cli("files", "ls", "--vm", "exfat", "/", "--json").stdout)
    assert {entry["name"]: entry["kind"] for entry in root} == {
        "Docs": "dir", "empty.txt": "file", "MixedCase.TXT": "file", "contig.bin": "file", "valid.bin": "file",
        "readonly.txt": "file", "kept.bin": "file", "frag.bin": "file"}
    modes = {entry["name"]: entry["mode"] for entry in root}
    assert modes["readonly.txt"] == "0o444" and modes["contig.bin"] is None
    assert {entry["mtime_ns"] for entry in root if entry["kind"] == "file"} == {MTIME * 1_000_000_000}
    for asked, source in (("/mixedcase.txt", "/MixedCase.TXT"), ("/DOCS/nested/DEEPER/Note.TXT", "/Docs/Nested/Deeper/note.txt"),
                          (f"/docs/{LONG_NAME.upper()}", f"/Docs/{LONG_NAME}")):
        output = tmp_path / sha256(asked.encode())
        result = backed.cli("files", "get", "--vm", "exfat", asked, "--output", str(output))
        assert result.returncode == 0, result.stderr
        assert output.read_bytes() == backed.files[source]


def test_every_file_reads_back_exactly_through_the_cli(backed: ExfatBacked, tmp_path: Path) -> None:
    """Each file but the 120 small ones by `files get`; every file in a tar of the whole volume."""
    for number, (path, data) in enumerate(backed.files.items()):
        if path.startswith("/Docs/Many/"):
            continue
        output = tmp_path / str(number)
        result = backed.cli("files", "get", "--vm", "exfat", path, "--output", str(output))
        assert result.returncode == 0, result.stderr
        assert sha256(output.read_bytes()) == sha256(data), path
        assert output.stat().st_mtime_ns == MTIME * 1_000_000_000
    dumped = subprocess.run([*run_cli_prefix(backed), "files", "dump", "--vm", "exfat", "/"], capture_output=True,
                            check=True)
    with tarfile.open(fileobj=io.BytesIO(dumped.stdout)) as tar:
        members = {member.name: member for member in tar.getmembers()}
        for path, data in backed.files.items():
            content = tar.extractfile(f"root{path}")
            assert content is not None and sha256(content.read()) == sha256(data), path
        assert members["root/readonly.txt"].mode == 0o444 and members["root/contig.bin"].mode == 0o644
        assert members["root/Docs"].mode == 0o755


def test_a_folder_archive_and_a_search(backed: ExfatBacked, tmp_path: Path) -> None:
    archive = tmp_path / "docs.zip"
    result = backed.cli("files", "dump", "--vm", "exfat", "/Docs", "--format", "zip", "--output", str(archive))
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(archive) as opened:
        assert opened.read("Docs/Nested/Deeper/note.txt") == b"deep\n"
        assert opened.read(f"Docs/{LONG_NAME}") == "é日本\n".encode()
        assert len([name for name in opened.namelist() if name.startswith("Docs/Many/entry-")]) == 120
    walked = backed.cli("files", "find", "--vm", "exfat", "*.bin", "--json")
    assert {hit["path"] for hit in json.loads(walked.stdout)} == {"/contig.bin", "/valid.bin", "/kept.bin", "/frag.bin"}
    assert backed.cli("files", "index", "--vm", "exfat", "--all").returncode == 0
    assert backed.cli("files", "find", "--vm", "exfat", "*.bin", "--json").stdout == walked.stdout


def test_every_file_reads_back_exactly_through_the_api(backed: ExfatBacked) -> None:
    with serving_api(backed.store) as api:
        for path, data in backed.files.items():
            content = api.client.get("/vms/exfat/points/latest/files/content", params={"path": path})
            assert content.status_code == 200 and sha256(content.content) == sha256(data), path
        ranged = api.client.get("/vms/exfat/points/latest/files/content", params={"path": "/valid.bin"},
                                headers={"Range": f"bytes={2 * CLUSTER}-{2 * CLUSTER + 9}"})
        assert ranged.status_code == 206 and ranged.content == backed.files["/valid.bin"][2 * CLUSTER : 2 * CLUSTER + 10]


def test_every_file_reads_back_exactly_through_the_files_view(backed: ExfatBacked, tmp_path: Path) -> None:
    server = serve_with_mount(backed.store, tmp_path / "mnt")
    try:
        point = next((tmp_path / "mnt" / "files" / "exfat").iterdir())
        assert os.listdir(point) == ["0-p1"]
        for path, data in backed.files.items():
            assert sha256((point / "0-p1" / path[1:]).read_bytes()) == sha256(data), path
        assert (point / "0-p1" / "readonly.txt").stat().st_mode & 0o777 == 0o444
        with pytest.raises(OSError) as refused:
            (point / "0-p1" / "new.txt").write_bytes(b"x")
        assert refused.value.errno == errno.EROFS
    finally:
        assert server.stop() == 0


def damaged_copy(backed: ExfatBacked, tmp_path: Path, vm: str, at: int, value: bytes) -> None:
    image = tmp_path / f"{vm}.img"
    data = bytearray(backed.image.read_bytes())
    data[at : at + len(value)] = value
    image.write_bytes(data)
    assert backed.cli("backup", "--vm", vm, str(image)).returncode == 0


def test_a_damaged_boot_sector_is_a_one_line_error(backed: ExfatBacked, tmp_path: Path) -> None:
    damaged_copy(backed, tmp_path, "exfat-boot", 0x5C, struct.pack("<I", 0x7FFFFFFF))  # a cluster count past the end
    one_line_error(backed.cli("files", "ls", "--vm", "exfat-boot", "/"), 3, "exfat file system")


def test_a_looping_cluster_chain_is_an_error_never_wrong_bytes(backed: ExfatBacked, tmp_path: Path) -> None:
    with open(backed.image, "rb") as image:
        volume = ExfatVolume(image)
        frag = volume.child(volume.root, "frag.bin")
    assert frag is not None
    damaged_copy(backed, tmp_path, "exfat-loop", fat_offset(backed.image.read_bytes()) + frag.first_cluster * 4,
                 struct.pack("<I", frag.first_cluster))
    output = tmp_path / "frag.bin"
    result = backed.cli("files", "get", "--vm", "exfat-loop", "/frag.bin", "--output", str(output))
    one_line_error(result, 3, "loops back")
    assert not output.exists()
    kept = backed.cli("files", "get", "--vm", "exfat-loop", "/kept.bin", "--output", str(tmp_path / "kept.bin"))
    assert kept.returncode == 0 and (tmp_path / "kept.bin").read_bytes() == backed.files["/kept.bin"]
