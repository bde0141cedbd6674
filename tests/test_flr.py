"""File-level recovery from real file systems built without mounts or loop devices.

ext4 (`mkfs.ext4 -d`), XFS (`mkfs.xfs -p protofile`), NTFS (`mkntfs` + `ntfscp`) and
FAT (`mkfs.fat` + `mcopy`) images are laid into an MBR disk and a GPT disk (`sfdisk`),
backed up, and read back through `appliance files`. LUKS volumes (`cryptsetup luksFormat`
works on a plain file) are refused by name. BitLocker volumes cannot be made on Linux;
their signature is the same kind of check as LUKS's. LVM2 logical volumes are tested in
`test_flr_lvm.py`, on PVs written by hand (`pvcreate` needs a block device).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.store import open_store
from appliance.store.formats import CHUNK_ID_SIZE
from tests.conftest import run_cli
from tests.test_api import serving_api
from tests.test_nfs_serve import Serve, serve_with_mount

pytestmark = pytest.mark.slow

MIB = 1 << 20
LONG_NAME = "L" * 250 + ".txt"
NON_ASCII = "naïve-日本.txt"


def sh(*command: str, stdin: bytes | None = None) -> None:
    subprocess.run(command, check=True, input=stdin, capture_output=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tree(root: Path, hello: bytes) -> Path:
    rng = random.Random(15)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(hello)
    (root / "dir" / "big.bin").write_bytes(rng.randbytes(3_000_000))
    (root / "dir" / "link").symlink_to("../hello.txt")
    os.link(root / "hello.txt", root / "hard.txt")
    with open(root / "sparse.bin", "wb") as sparse:
        sparse.truncate(10 * MIB)
        sparse.seek(5 * MIB)
        sparse.write(rng.randbytes(1024))
    (root / "dir" / "sub" / NON_ASCII).write_bytes("é\n".encode())
    (root / LONG_NAME).write_bytes(b"a long name\n")
    os.chmod(root / "dir" / "big.bin", 0o600)
    return root


def ext4_image(tree: Path, image: Path) -> None:
    sh("mkfs.ext4", "-q", "-F", "-I", "256", "-d", str(tree), str(image), "32M")


def xfs_image(tree: Path, image: Path) -> None:
    """XFS wants 300 MiB at least; the image is sparse and its zeros cost the store nothing."""
    proto = image.with_suffix(".proto")
    proto.write_text("\n".join([
        "/dev/null", "0 0", "d--755 0 0",
        f"hello.txt ---644 0 0 {tree / 'hello.txt'}",
        "dir d--755 0 0",
        f"big.bin ---600 0 0 {tree / 'dir' / 'big.bin'}",
        "link l--777 0 0 ../hello.txt",
        "$", f"{LONG_NAME} ---644 0 0 {tree / LONG_NAME}", "$", ""]))
    with open(image, "wb") as out:
        out.truncate(300 * MIB)
    sh("mkfs.xfs", "-q", "-f", "-p", str(proto), str(image))


def ntfs_image(tree: Path, image: Path) -> None:
    with open(image, "wb") as out:
        out.truncate(32 * MIB)
    sh("mkntfs", "-F", "-q", "-Q", str(image))
    for name in ("hello.txt", LONG_NAME):
        sh("ntfscp", str(image), str(tree / name), name)
    sh("ntfscp", str(image), str(tree / "dir" / "big.bin"), "big.bin")
    sh("ntfscp", str(image), str(tree / "dir" / "sub" / NON_ASCII), NON_ASCII)


def fat_image(tree: Path, image: Path) -> None:
    sh("mkfs.fat", "-C", str(image), str(32 * 1024))
    sh("mmd", "-i", str(image), "::/docs")
    sh("mcopy", "-i", str(image), str(tree / "hello.txt"), "::/hello.txt")
    sh("mcopy", "-i", str(image), str(tree / "dir" / "big.bin"), "::/docs/big.bin")
    sh("mcopy", "-i", str(image), str(tree / "dir" / "sub" / NON_ASCII), f"::/docs/{NON_ASCII}")


def disk_with(parts: list[Path], label: str, out: Path) -> Path:
    """A disk image with a partition table of `label` holding each image in turn (1 MiB aligned)."""
    sizes = [-(-part.stat().st_size // MIB) for part in parts]
    with open(out, "wb") as disk:
        disk.truncate((sum(sizes) + 2) * MIB)
    layout = f"label: {label}\n" + "".join(f"start={1 + sum(sizes[:i])}M,size={size}M\n"
                                           for i, size in enumerate(sizes))
    sh("sfdisk", "-q", str(out), stdin=layout.encode())
    for i, part in enumerate(parts):
        sh("dd", f"if={part}", f"of={out}", "bs=1M", f"seek={1 + sum(sizes[:i])}", "conv=notrunc,sparse", "status=none")
    return out


@dataclass
class Backed:
    store: Path
    tree: Path
    disks: list[Path]
    first_point: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--store", str(self.store), *args)


@pytest.fixture(scope="module")
def backed(tmp_path_factory: pytest.TempPathFactory) -> Backed:
    work = tmp_path_factory.mktemp("flr")
    tree = make_tree(work / "tree", b"hello, first version\n")
    images = {}
    for name, build in (("ext4", ext4_image), ("xfs", xfs_image), ("ntfs", ntfs_image), ("fat", fat_image)):
        images[name] = work / f"{name}.img"
        build(tree, images[name])
    disks = [disk_with([images["fat"], images["ntfs"]], "dos", work / "disk0.img"),
             disk_with([images["ext4"], images["xfs"]], "gpt", work / "disk1.img")]
    store = work / "store"
    run_cli("--store", str(store), "init", check=True)
    point = run_cli("--store", str(store), "backup", "--vm", "flr", *map(str, disks), check=True).stdout.strip()
    return Backed(store, tree, disks, point)


def test_the_disks_partitions_and_file_systems_are_listed(backed: Backed) -> None:
    listing = json.loads(backed.cli("files", "ls", "--vm", "flr", "--json").stdout)
    assert [(v["partition"], v["scheme"], v["format"]) for v in listing["0"]] == [(1, "mbr", "fat"), (2, "mbr", "ntfs")]
    assert [(v["partition"], v["scheme"], v["format"]) for v in listing["1"]] == [(1, "gpt", "ext"), (2, "gpt", "xfs")]


#: (disk, partition, path in the volume, path in the source tree)
FILES = [
    (1, 1, "/hello.txt", "hello.txt"), (1, 1, "/dir/big.bin", "dir/big.bin"), (1, 1, "/sparse.bin", "sparse.bin"),
    (1, 1, f"/dir/sub/{NON_ASCII}", f"dir/sub/{NON_ASCII}"), (1, 1, f"/{LONG_NAME}", LONG_NAME),
    (1, 1, "/hard.txt", "hello.txt"),
    (1, 2, "/hello.txt", "hello.txt"), (1, 2, "/dir/big.bin", "dir/big.bin"), (1, 2, f"/{LONG_NAME}", LONG_NAME),
    (0, 2, "/hello.txt", "hello.txt"), (0, 2, "/big.bin", "dir/big.bin"), (0, 2, f"/{NON_ASCII}", f"dir/sub/{NON_ASCII}"),
    (0, 2, f"/{LONG_NAME}", LONG_NAME),
    (0, 1, "/hello.txt", "hello.txt"), (0, 1, "/docs/big.bin", "dir/big.bin"), (0, 1, f"/docs/{NON_ASCII}", f"dir/sub/{NON_ASCII}"),
]


@pytest.mark.parametrize("disk, partition, path, source", FILES, ids=[f"{d}-p{p}{path[:40]}" for d, p, path, _ in FILES])
def test_every_file_reads_back_exactly(backed: Backed, tmp_path: Path, disk: int, partition: int, path: str,
                                       source: str) -> None:
    output = tmp_path / "out"
    result = backed.cli("files", "get", "--vm", "flr", "--disk", str(disk), "--partition", str(partition), path,
                        "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert sha256(output.read_bytes()) == sha256((backed.tree / source).read_bytes())
    if partition == 1 and disk == 1:  # ext4 keeps modes and mtimes (mkfs.ext4 -d copies whole seconds)
        original = (backed.tree / source).stat()
        assert output.stat().st_mode == original.st_mode and int(output.stat().st_mtime) == int(original.st_mtime)


def test_extracting_a_file_reads_little_more_than_the_file(backed: Backed, tmp_path: Path) -> None:
    result = backed.cli("files", "get", "--vm", "flr", "--disk", "1", "--partition", "1", "/dir/big.bin",
                        "--output", str(tmp_path / "big"))
    chunks = int(result.stderr.split("read ")[1].split(" chunks")[0])
    with open_store(backed.store) as store:
        chunk_size = store.config.chunk_size
    assert chunks * chunk_size <= 2 * 3_000_000 + 2 * chunk_size, (chunks, chunk_size)


def test_a_tar_keeps_links_modes_and_sparse_files(backed: Backed) -> None:
    result = subprocess.run([*run_cli_prefix(backed), "files", "dump", "--vm", "flr", "--disk", "1", "--partition", "1",
                             "/"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        members = {member.name: member for member in tar.getmembers()}
        assert members["root/dir/link"].issym() and members["root/dir/link"].linkname == "../hello.txt"
        hard = [members["root/hello.txt"], members["root/hard.txt"]]
        assert sum(member.islnk() for member in hard) == 1
        assert members["root/dir/big.bin"].mode == 0o600
        sparse = tar.extractfile("root/sparse.bin")
        assert sparse is not None and sha256(sparse.read()) == sha256((backed.tree / "sparse.bin").read_bytes())
        big = tar.extractfile("root/dir/big.bin")
        assert big is not None and sha256(big.read()) == sha256((backed.tree / "dir" / "big.bin").read_bytes())


def run_cli_prefix(backed: Backed) -> list[str]:
    import sys

    return [sys.executable, "-m", "appliance", "--store", str(backed.store)]


def test_a_zip_of_a_fat_folder(backed: Backed, tmp_path: Path) -> None:
    archive = tmp_path / "docs.zip"
    result = backed.cli("files", "dump", "--vm", "flr", "--disk", "0", "--partition", "1", "/docs", "--format", "zip",
                        "--output", str(archive))
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(archive) as opened:
        assert sha256(opened.read("docs/big.bin")) == sha256((backed.tree / "dir" / "big.bin").read_bytes())
        assert opened.read(f"docs/{NON_ASCII}") == "é\n".encode()


def test_a_changed_file_shows_both_versions(backed: Backed, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", b"hello, second version\n")
    ext4_image(tree, tmp_path / "ext4.img")
    xfs_image(tree, tmp_path / "xfs.img")
    disk1 = disk_with([tmp_path / "ext4.img", tmp_path / "xfs.img"], "gpt", tmp_path / "disk1.img")
    second = backed.cli("backup", "--vm", "flr", str(backed.disks[0]), str(disk1)).stdout.strip()
    found = json.loads(backed.cli("files", "find", "--vm", "flr", "hello.txt", "--json").stdout)
    versions = {(hit["point"], hit["disk"], hit["partition"]) for hit in found}
    assert {(backed.first_point, 1, 1), (second, 1, 1), (backed.first_point, 0, 2)} <= versions
    for point, text in ((backed.first_point, b"hello, first version\n"), (second, b"hello, second version\n")):
        output = tmp_path / f"hello-{point}"
        backed.cli("files", "get", "--vm", "flr", "--point", point, "--disk", "1", "--partition", "1", "/hello.txt",
                   "--output", str(output))
        assert output.read_bytes() == text


def test_paths_never_climb_above_the_volume_root(backed: Backed, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = backed.cli("files", "get", "--vm", "flr", "--point", backed.first_point, "--disk", "1", "--partition", "1",
                        "/../../hello.txt", "--output", str(output))
    assert result.returncode == 0 and output.read_bytes() == b"hello, first version\n"


def one_line_error(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert [line for line in lines if line.startswith("appliance: error:") and fragment in line], result.stderr
    assert "Traceback" not in result.stderr


def test_encrypted_and_unknown_volumes_are_named(backed: Backed, tmp_path: Path) -> None:
    luks = tmp_path / "luks.img"
    with open(luks, "wb") as out:
        out.truncate(32 * MIB)
    sh("cryptsetup", "luksFormat", "--type", "luks2", "-q", "--key-file", "-", str(luks), stdin=b"secret")
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as out:
        out.truncate(4 * MIB)
    disk = disk_with([luks, blank], "gpt", tmp_path / "locked.img")
    backed.cli("backup", "--vm", "locked", str(disk))
    one_line_error(backed.cli("files", "ls", "--vm", "locked", "--partition", "1", "/"), 1, "encrypted (LUKS")
    one_line_error(backed.cli("files", "ls", "--vm", "locked", "--partition", "2", "/"), 1, "no file system")
    one_line_error(backed.cli("files", "ls", "--vm", "locked", "/"), 1, "no file system this appliance reads")
    one_line_error(backed.cli("files", "ls", "--vm", "locked", "--partition", "9", "/"), 1, "no partition 9")


def test_a_damaged_superblock_is_a_clear_error(backed: Backed, tmp_path: Path) -> None:
    image = tmp_path / "ext4.img"
    ext4_image(backed.tree, image)
    with open(image, "r+b") as damaged:  # the magic stays, the geometry goes: blocks per group = 0
        damaged.seek(1024 + 0x20)
        damaged.write(b"\0\0\0\0")
    backed.cli("backup", "--vm", "damaged", str(image))
    one_line_error(backed.cli("files", "ls", "--vm", "damaged", "/"), 3, "ext file system")


def test_a_corrupt_chunk_is_an_error_never_wrong_bytes(backed: Backed, tmp_path: Path) -> None:
    """In a store of its own: the damaged chunk would be shared (deduplicated) with the other points."""
    image, store_path = tmp_path / "ext4.img", tmp_path / "store"
    ext4_image(backed.tree, image)
    run_cli("--store", str(store_path), "init", check=True)
    run_cli("--store", str(store_path), "backup", "--vm", "vm", str(image), check=True)
    data = image.read_bytes()
    with open_store(store_path) as store, store.env.begin() as txn:
        point = store.catalog.resolve(txn, "vm", "latest")
        chunk_size = store.config.chunk_size
        index = data.index((backed.tree / "dir" / "big.bin").read_bytes()[:4096]) // chunk_size + 1
        chunk_id = store.catalog.chunk_map(txn, point, 0)[index * CHUNK_ID_SIZE : (index + 1) * CHUNK_ID_SIZE]
        location = store.index.lookup(txn, chunk_id)
    assert location is not None
    pack = next(store_path.glob(f"packs/*/{location.pack_id:016x}.pack"))
    with open(pack, "r+b") as packed:
        packed.seek(location.offset + location.record_length // 2)
        byte = packed.read(1)
        packed.seek(-1, os.SEEK_CUR)
        packed.write(bytes([byte[0] ^ 0xFF]))
    output = tmp_path / "big"
    result = run_cli("--store", str(store_path), "files", "get", "--vm", "vm", "/dir/big.bin", "--output", str(output))
    one_line_error(result, 3, "checksum mismatch")
    assert not output.exists() and not list(tmp_path.glob(".big*"))


def test_the_api_lists_downloads_ranges_archives_and_finds(backed: Backed) -> None:
    with serving_api(backed.store) as api:
        base = f"/vms/flr/points/{backed.first_point}"
        volumes = api.client.get(f"{base}/volumes").json()
        assert [volume["format"] for volume in volumes["1"]] == ["ext", "xfs"]
        listing = api.client.get(f"{base}/files", params={"disk": 1, "partition": 1, "path": "/dir"}).json()
        assert {entry["name"]: entry["kind"] for entry in listing} == {"big.bin": "file", "link": "symlink", "sub": "dir"}
        big = (backed.tree / "dir" / "big.bin").read_bytes()
        where = {"disk": 1, "partition": 1, "path": "/dir/big.bin"}
        whole = api.client.get(f"{base}/files/content", params=where)
        assert whole.status_code == 200 and sha256(whole.content) == sha256(big)
        assert whole.headers["content-disposition"].startswith('attachment; filename="big.bin"')
        part = api.client.get(f"{base}/files/content", params=where, headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == big[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(big)}"
        tail = api.client.get(f"{base}/files/content", params=where, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == big[-10:]
        past = api.client.get(f"{base}/files/content", params=where, headers={"Range": f"bytes={len(big)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(big)}"
        folder = api.client.get(f"{base}/files/content", params={**where, "path": "/dir"})
        assert folder.status_code == 409 and folder.json()["error"] == "IsADirectory"
        named = api.client.get(f"{base}/files/content", params={"disk": 1, "partition": 1, "path": f"/dir/sub/{NON_ASCII}"})
        assert "filename*=UTF-8''na%C3%AFve-" in named.headers["content-disposition"]
        archive = api.client.get(f"{base}/files/archive", params={"disk": 0, "partition": 1, "path": "/docs",
                                                                  "format": "zip"})
        with zipfile.ZipFile(io.BytesIO(archive.content)) as opened:
            assert sha256(opened.read("docs/big.bin")) == sha256(big)
        found = api.client.get("/vms/flr/files", params={"name": "big.bin", "points": "1"}).json()
        assert {(hit["disk"], hit["partition"], hit["path"]) for hit in found} == {
            (0, 1, "/docs/big.bin"), (0, 2, "/big.bin"), (1, 1, "/dir/big.bin"), (1, 2, "/dir/big.bin")}
        encrypted = api.client.get("/vms/locked/points/latest/files", params={"partition": 1})
        assert encrypted.status_code == 409 and "encrypted (LUKS" in encrypted.json()["message"]


def test_the_files_view_serves_every_volume_over_fuse_and_nfs(backed: Backed, tmp_path: Path) -> None:
    server = serve_with_mount(backed.store, tmp_path / "mnt")
    try:
        point = tmp_path / "mnt" / "files" / "flr" / backed.first_point
        assert sorted(os.listdir(point)) == ["0-p1", "0-p2", "1-p1", "1-p2"]
        big = sha256((backed.tree / "dir" / "big.bin").read_bytes())
        for copy in (point / "0-p1" / "docs" / "big.bin", point / "0-p2" / "big.bin", point / "1-p1" / "dir" / "big.bin",
                     point / "1-p2" / "dir" / "big.bin"):
            assert sha256(copy.read_bytes()) == big, copy
        assert os.readlink(point / "1-p1" / "dir" / "link") == "../hello.txt"
        assert (point / "1-p1" / "dir" / "sub" / NON_ASCII).read_bytes() == "é\n".encode()
        with pytest.raises(OSError) as refused:
            (point / "1-p1" / "new.txt").write_bytes(b"x")
        assert refused.value.errno == errno.EROFS
        fetched = subprocess.run(["nfs-cat", server.url(f"/files/flr/{backed.first_point}/1-p2/dir/big.bin")],
                                 capture_output=True, check=True)
        assert sha256(fetched.stdout) == big
        listing = subprocess.run(["nfs-ls", server.url(f"/files/flr/{backed.first_point}/1-p1/dir")],
                                 capture_output=True, text=True, check=True)
        assert {"big.bin", "link", "sub"} <= {line.split()[-1] for line in listing.stdout.splitlines()}
        damaged_point = next((tmp_path / "mnt" / "files" / "damaged").iterdir())
        assert os.listdir(damaged_point) == ["0-p0"]  # shown: parsed only when opened
        with pytest.raises(OSError) as damaged:
            os.listdir(damaged_point / "0-p0")
        assert damaged.value.errno == errno.EIO
        assert "locked" in os.listdir(tmp_path / "mnt" / "files")
        assert os.listdir(next((tmp_path / "mnt" / "files" / "locked").iterdir())) == []  # LUKS and blank: none
    finally:
        assert server.stop() == 0


def test_an_index_answers_a_search_as_a_walk_does_and_goes_with_its_point(backed: Backed, tmp_path: Path) -> None:
    walked = backed.cli("files", "find", "--vm", "flr", "*.bin", "--json")
    assert walked.returncode == 0, walked.stderr
    indexed = backed.cli("files", "index", "--vm", "flr", "--all")
    assert indexed.returncode == 0 and "indexed point" in indexed.stderr, indexed.stderr
    assert backed.cli("files", "find", "--vm", "flr", "*.bin", "--json").stdout == walked.stdout
    with open_store(backed.store) as store, store.env.begin() as txn:
        assert store.catalog.file_index(txn, backed.first_point)

    image = tmp_path / "ext4.img"
    ext4_image(backed.tree, image)
    for _ in range(2):
        backed.cli("backup", "--vm", "pruned", str(image))
    backed.cli("files", "index", "--vm", "pruned", "--all")
    with open_store(backed.store) as store, store.env.begin() as txn:
        oldest = store.catalog.vm_points(txn, "pruned")[0].id
        assert store.catalog.file_index(txn, oldest) is not None
    assert backed.cli("prune", "--vm", "pruned", "--keep-last", "1").returncode == 0
    with open_store(backed.store) as store, store.env.begin() as txn:
        assert store.catalog.file_index(txn, oldest) is None


def test_a_serving_appliance_indexes_new_points_by_itself(backed: Backed) -> None:
    image = backed.disks[0]
    point = backed.cli("backup", "--vm", "fresh", str(image)).stdout.strip()
    server = Serve(backed.store)
    server.start()
    try:
        deadline = time.monotonic() + 60
        while f"event=files.indexed vm=fresh point={point}" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.2)
    finally:
        assert server.stop() == 0
    with open_store(backed.store) as store, store.env.begin() as txn:
        assert set(store.catalog.file_index(txn, point) or {}) == {(0, 1, ""), (0, 2, "")}


def test_the_restore_point_stays_byte_identical(backed: Backed, tmp_path: Path) -> None:
    for disk, original in enumerate(backed.disks):
        restored = tmp_path / f"disk{disk}.img"
        result = backed.cli("restore", "--vm", "flr", "--point", backed.first_point, "--disk", str(disk), "--output",
                            str(restored))
        assert result.returncode == 0, result.stderr
        assert sha256(restored.read_bytes()) == sha256(original.read_bytes())
