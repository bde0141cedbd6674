"""Format sniffing, raw and descriptor-described (flat/ZERO) disks, and their refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MIB, MIXED_IMAGE_SIZE, MIXED_ZERO_REGION, READ_PIECE_SIZES, mixed_image

from appliance.errors import SourceError
from appliance.ingest.sources import DESCRIPTOR_LIMIT, open_source

SECTOR = 512
SIZE = MIXED_IMAGE_SIZE
ZERO_REGION = MIXED_ZERO_REGION
PIECE_SIZES = READ_PIECE_SIZES
HEAD = '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="{}"\n\n'


IMAGE = mixed_image(7)


def write_sparse(path: Path, data: bytes) -> None:
    """Write `data` leaving a file-system hole wherever a whole 64 KiB block is zero."""
    with path.open("wb") as out:
        out.truncate(len(data))
        for start in range(0, len(data), 65536):
            block = data[start : start + 65536]
            if any(block):
                out.seek(start)
                out.write(block)


def files_open_under(directory: Path) -> int:
    """Count this process's descriptors on files under `directory`.

    Counting every descriptor would be racy: threads left by earlier tests (pack sealing, servers
    being stopped) open and close their own files while a test runs.
    """
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            count += 1
    return count


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("sources")
    made = {"raw": directory / "disk.raw", "sparse-raw": directory / "sparse.raw"}
    made["raw"].write_bytes(IMAGE)
    write_sparse(made["sparse-raw"], IMAGE)

    # Three extents: flat data at an offset into its file, a ZERO extent, and a flat
    # extent in a subdirectory; boundaries fall mid-sector-run of the 1 MiB pieces.
    split_a, split_b = ZERO_REGION[0] + 3 * SECTOR, ZERO_REGION[1] - 8 * SECTOR
    (directory / "a.bin").write_bytes(b"\xee" * 8 * SECTOR + IMAGE[:split_a])
    (directory / "sub").mkdir()
    write_sparse(directory / "sub" / "b.bin", IMAGE[split_b:])
    made["multi"] = directory / "multi.vmdk"
    made["multi"].write_text(
        HEAD.format("monolithicFlat")
        + f'RW {split_a // SECTOR} FLAT "a.bin" 8\n'
        + f"RW {(split_b - split_a) // SECTOR} ZERO\n"
        + f'RDONLY {(SIZE - split_b) // SECTOR} FLAT "sub/b.bin" 0\n'
        + '\nddb.adapterType = "lsilogic"\n'
    )
    write_sparse(directory / "esx-flat.vmdk", IMAGE)
    made["vmfs"] = directory / "esx.vmdk"
    made["vmfs"].write_text(HEAD.format("vmfs") + f'RW {SIZE // SECTOR} VMFS "esx-flat.vmdk"\n')

    if shutil.which("qemu-img") is not None:
        for subformat in ("monolithicFlat", "twoGbMaxExtentFlat"):
            made[subformat] = directory / f"{subformat}.vmdk"
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
                 str(made["raw"]), str(made[subformat])],
                check=True,
            )
    return made


def need(disks: dict[str, Path], name: str) -> Path:
    if name not in disks:
        pytest.fail("qemu-img is not installed (deploy/dev-setup.sh installs it)")
    return disks[name]


def holes_supported(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) == 0 and os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size
    except OSError:
        return False
    finally:
        os.close(fd)


SOURCES = [
    ("raw", "raw"),
    ("sparse-raw", "raw"),
    ("multi", "vmdk-flat"),
    ("vmfs", "vmdk-flat"),
    ("monolithicFlat", "vmdk-flat"),
    ("twoGbMaxExtentFlat", "vmdk-flat"),
]


@pytest.mark.parametrize("pieces", PIECE_SIZES, ids=["1MiB", "odd"])
@pytest.mark.parametrize(("name", "format"), SOURCES)
def test_reads_back_raw_bytes(disks: dict[str, Path], name: str, format: str, pieces: list[int]) -> None:
    with open_source(str(need(disks, name))) as source:
        assert (source.path, source.format, source.size) == (str(disks[name]), format, SIZE)
        out = bytearray()
        step = 0
        while len(out) < SIZE:
            want = min(pieces[step % len(pieces)], SIZE - len(out))
            out += source.read(len(out), want)
            step += 1
    assert out == IMAGE


@pytest.mark.parametrize(
    ("name", "offset", "length", "expected"),
    [
        ("sparse-raw", ZERO_REGION[0], ZERO_REGION[1] - ZERO_REGION[0], True),
        ("sparse-raw", ZERO_REGION[0] + 100, 5000, True),
        ("sparse-raw", 0, MIB, False),
        ("sparse-raw", ZERO_REGION[1] - 1, 2, False),
        ("sparse-raw", SIZE, 0, True),
        ("raw", ZERO_REGION[0], 4096, False),  # zeros, but written: unsure without reading
        ("multi", ZERO_REGION[0] + 3 * SECTOR, 4096, True),  # the ZERO extent
        ("multi", ZERO_REGION[0], MIB, False),  # starts in a.bin, which has no holes
        ("multi", ZERO_REGION[1] - 8 * SECTOR - 1, 2, False),
        ("vmfs", ZERO_REGION[0], 2 * MIB, True),
        ("monolithicFlat", ZERO_REGION[0], 2 * MIB, True),
        ("monolithicFlat", 3 * MIB, 4096, False),
    ],
)
def test_is_unallocated(disks: dict[str, Path], name: str, offset: int, length: int, expected: bool) -> None:
    path = need(disks, name)
    if expected and name != "multi" and not holes_supported(disks["sparse-raw"]):
        pytest.skip("file system does not report holes")
    with open_source(str(path)) as source:
        assert source.is_unallocated(offset, length) is expected


@pytest.mark.parametrize("name", ["raw", "multi"])
@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, SIZE + 1), (SIZE, 1), (5, -1)])
def test_range_outside_disk_is_value_error(disks: dict[str, Path], name: str, offset: int, length: int) -> None:
    with open_source(str(disks[name])) as source:
        with pytest.raises(ValueError, match="outside"):
            source.read(offset, length)
        with pytest.raises(ValueError, match="outside"):
            source.is_unallocated(offset, length)


@pytest.mark.parametrize("name", ["raw", "multi", "vmfs"])
def test_context_manager_releases_files(disks: dict[str, Path], name: str) -> None:
    directory = disks[name].parent
    assert files_open_under(directory) == 0
    with open_source(str(disks[name])) as source:
        assert files_open_under(directory) > 0
        assert source.read(0, 16) == IMAGE[:16]
    assert files_open_under(directory) == 0
    source.close()  # closing twice is harmless


@pytest.mark.parametrize("name", ["raw", "multi"])
def test_read_after_close_is_value_error(disks: dict[str, Path], name: str) -> None:
    source = open_source(str(disks[name]))
    source.close()
    with pytest.raises(ValueError, match="closed"):
        source.read(0, 1)


# -- refusals ----------------------------------------------------------------------

Setup = Callable[[Path], Path]


def write(name: str, content: bytes | str) -> Setup:
    def setup(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return setup


def with_extent(descriptor: str, extent: str, size: int) -> Setup:
    def setup(directory: Path) -> Path:
        (directory / extent).write_bytes(IMAGE[:size])
        return write("d.vmdk", descriptor)(directory)

    return setup


def converted(directory: Path, output_format: str, name: str) -> Path:
    """The first MiB of the test image, converted by qemu-img into `directory/name`."""
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is not installed (deploy/dev-setup.sh installs it)")
    (directory / "x.raw").write_bytes(IMAGE[:MIB])
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", output_format, str(directory / "x.raw"),
                    str(directory / name)], check=True)
    return directory / name


def qcow2(directory: Path) -> Path:
    return converted(directory, "qcow2", "x.qcow2")


FLAT_2048 = HEAD.format("monolithicFlat") + 'RW 2048 FLAT "d-flat.vmdk" 0\n'
REFUSALS: list[tuple[str, Setup, str]] = [
    ("missing-file", lambda d: d / "nope.raw", r"nope\.raw: cannot open: No such file"),
    ("directory", lambda d: d, r"is not a regular file or block device"),
    ("missing-extent", write("d.vmdk", FLAT_2048),
     r"d-flat\.vmdk \(named by .*d\.vmdk\): cannot open: No such file"),
    ("truncated-extent", with_extent(FLAT_2048, "d-flat.vmdk", 1000 * SECTOR),
     r"d-flat\.vmdk is truncated: descriptor declares 1048576 bytes, file has 512000$"),
    ("truncated-at-offset", with_extent(FLAT_2048.replace('" 0', '" 8'), "d-flat.vmdk", 2048 * SECTOR),
     r"d-flat\.vmdk is truncated: descriptor declares 1052672 bytes, file has 1048576$"),
    ("no-extents", write("d.vmdk", HEAD.format("monolithicFlat") + 'ddb.adapterType = "ide"\n'),
     r"d\.vmdk: descriptor declares no extents"),
    ("bad-extent-line", write("d.vmdk", HEAD.format("monolithicFlat") + 'RW 2048 FLAT d-flat.vmdk 0\n'),
     r"d\.vmdk: line 7 is not a valid extent line: 'RW 2048 FLAT d-flat\.vmdk 0'"),
    ("noaccess", with_extent(FLAT_2048.replace("RW", "NOACCESS"), "d-flat.vmdk", MIB),
     r"d\.vmdk: line 7: NOACCESS extent cannot be read"),
    ("vmfssparse", with_extent(HEAD.format("vmfsSparse") + 'RW 2048 VMFSSPARSE "d-delta.vmdk"\n', "d-delta.vmdk", MIB),
     r"d\.vmdk: line 7: VMFSSPARSE extents are not supported"),
    ("empty-sparse-extent", with_extent(HEAD.format("x") + 'RW 4096 SPARSE "s.vmdk"\n', "s.vmdk", 0),
     r"s\.vmdk: sparse header at offset 0 is truncated"),
    ("huge-descriptor", write("d.vmdk", FLAT_2048 + "#" * DESCRIPTOR_LIMIT),
     r"starts like a VMDK descriptor but is \d+ bytes"),
    ("qcow2", qcow2, r"x\.qcow2 is a qcow2 image, not a raw or VMDK disk"),
    ("vhdx", write("x.vhdx", b"vhdxfile" + bytes(4096)), r"is a VHDX image"),
]


@pytest.mark.parametrize(("case", "setup", "message"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refused_with_useful_message(tmp_path: Path, case: str, setup: Setup, message: str) -> None:
    path = setup(tmp_path)
    with pytest.raises(SourceError, match=message) as raised:
        open_source(str(path))
    assert "\n" not in str(raised.value)
    assert files_open_under(tmp_path) == 0


def test_sparse_extent_size_must_match_descriptor(tmp_path: Path) -> None:
    converted(tmp_path, "vmdk", "s.vmdk")
    descriptor = write("d.vmdk", HEAD.format("twoGbMaxExtentSparse") + 'RW 4096 SPARSE "s.vmdk"\n')(tmp_path)
    with pytest.raises(SourceError, match=r"s\.vmdk: sparse extent holds 1048576 bytes but .*line 7 declares 2097152"):
        open_source(str(descriptor))
    assert files_open_under(tmp_path) == 0


def test_relative_path_resolves_extents_next_to_descriptor(
    disks: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(disks["multi"].parent.parent)
    relative = f"{disks['multi'].parent.name}/{disks['multi'].name}"
    with open_source(relative) as source:
        assert source.path == relative
        assert source.read(SIZE - 100, 100) == IMAGE[-100:]
