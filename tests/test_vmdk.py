"""Hosted sparse VMDK reading, checked against qemu-img's own conversions.

qemu-img is an independent writer: reading its files back must give the raw bytes
it converted from, and patched copies of its files are realistic malformed input.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MIB, MIXED_IMAGE_SIZE, MIXED_ZERO_REGION, READ_PIECE_SIZES, mixed_image

from appliance.errors import SourceError
from appliance.ingest.sources import open_source
from appliance.ingest.vmdk import GD_AT_END, SECTOR, parse_descriptor, parse_sparse_header

SIZE = MIXED_IMAGE_SIZE
ZERO_REGION = MIXED_ZERO_REGION
PIECE_SIZES = READ_PIECE_SIZES


IMAGE = mixed_image(20240601)


def read_all(path: Path, pieces: list[int]) -> bytes:
    with open_source(str(path)) as source:
        out = bytearray()
        step = 0
        while len(out) < source.size:
            want = min(pieces[step % len(pieces)], source.size - len(out))
            chunk = source.read(len(out), want)
            assert len(chunk) == want
            out += chunk
            step += 1
        return bytes(out)


def add_footer(stream: Path, target: Path) -> Path:
    """Rewrite qemu's streamOptimized file the way VMware writes it: GD located by the footer."""
    data = bytearray(stream.read_bytes())
    header = bytes(data[:SECTOR])
    data[56:64] = struct.pack("<Q", GD_AT_END)  # the header's gdOffset field
    data += struct.pack("<QII", 1, 0, 3).ljust(SECTOR, b"\0") + header + bytes(SECTOR)
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is not installed (deploy/dev-setup.sh installs it)")
    directory = tmp_path_factory.mktemp("vmdk")
    raw = directory / "disk.raw"
    raw.write_bytes(IMAGE)
    made: dict[str, Path] = {}
    for subformat in ("monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse"):
        target = directory / f"{subformat}.vmdk"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", str(raw), str(target)],
            check=True,
        )
        made[subformat] = target
    made["streamFooter"] = add_footer(made["streamOptimized"], directory / "streamFooter.vmdk")
    return made


def header_of(path: Path) -> tuple[int, int, int]:
    """(GD sector, sector of grain table 0, sector of grain 0) of a qemu-made file."""
    data = path.read_bytes()
    gd = parse_sparse_header(data[:SECTOR], str(path), 0).gd_offset
    if gd == GD_AT_END:
        gd = parse_sparse_header(data[-2 * SECTOR :], str(path), len(data) - 2 * SECTOR).gd_offset
    gt = struct.unpack_from("<I", data, gd * SECTOR)[0]
    grain = struct.unpack_from("<I", data, gt * SECTOR)[0]
    return gd, gt, grain


def patched(source: Path, tmp_path: Path, edit: Callable[[bytearray, tuple[int, int, int]], None]) -> Path:
    data = bytearray(source.read_bytes())
    edit(data, header_of(source))
    target = tmp_path / source.name
    target.write_bytes(bytes(data))
    return target


def put(data: bytearray, offset: int, value: bytes) -> None:
    data[offset : offset + len(value)] = value


# -- reading good files -------------------------------------------------------


@pytest.mark.parametrize("pieces", PIECE_SIZES, ids=["1MiB", "odd"])
@pytest.mark.parametrize(
    ("name", "format"),
    [
        ("monolithicSparse", "vmdk-sparse"),
        ("streamOptimized", "vmdk-stream"),
        ("streamFooter", "vmdk-stream"),
        ("twoGbMaxExtentSparse", "vmdk-sparse"),
    ],
)
def test_reads_back_raw_bytes(disks: dict[str, Path], name: str, format: str, pieces: list[int]) -> None:
    with open_source(str(disks[name])) as source:
        assert (source.format, source.size) == (format, SIZE)
    assert read_all(disks[name], pieces) == IMAGE


@pytest.mark.parametrize("name", ["monolithicSparse", "streamOptimized", "streamFooter"])
@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (ZERO_REGION[0], ZERO_REGION[1] - ZERO_REGION[0], True),
        (ZERO_REGION[0] + 4096, 100, True),
        (0, MIB, False),
        (ZERO_REGION[0] - 1, 2, False),
        (3 * MIB, 4096, False),
        (SIZE - 1, 1, False),
        (SIZE, 0, True),
    ],
)
def test_is_unallocated(disks: dict[str, Path], name: str, offset: int, length: int, expected: bool) -> None:
    with open_source(str(disks[name])) as source:
        assert source.is_unallocated(offset, length) is expected


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, SIZE + 1), (SIZE, 1), (5, -1)])
def test_range_outside_disk_is_value_error(disks: dict[str, Path], offset: int, length: int) -> None:
    with open_source(str(disks["streamOptimized"])) as source:
        with pytest.raises(ValueError, match="outside"):
            source.read(offset, length)
        with pytest.raises(ValueError, match="outside"):
            source.is_unallocated(offset, length)


@pytest.mark.parametrize(
    ("name", "version", "compressed"),
    [("monolithicSparse", 1, False), ("streamOptimized", 3, True)],
)
def test_header_fields(disks: dict[str, Path], name: str, version: int, compressed: bool) -> None:
    header = parse_sparse_header(disks[name].read_bytes()[:SECTOR], name, 0)
    assert (header.version, header.capacity, header.grain_size, header.gtes_per_gt) == (
        version,
        SIZE // SECTOR,
        128,
        512,
    )
    assert header.compressed is compressed
    assert header.compress_algorithm == int(compressed)


# -- malformed files refused at open ----------------------------------------------


def truncate(size: int) -> Callable[[bytearray, tuple[int, int, int]], None]:
    def edit(data: bytearray, _: tuple[int, int, int]) -> None:
        del data[size:]

    return edit


OPEN_ERRORS = [
    ("truncated-sparse", "monolithicSparse", truncate(MIB),
     r"grain table entry \d+ of table 0 points past end of file \(sector \d+, file has 2048 sectors\)"),
    ("truncated-header", "monolithicSparse", truncate(100), r"sparse header at offset 0 is truncated \(100 of 512"),
    ("gt-entry-past-eof", "monolithicSparse",
     lambda d, h: put(d, h[1] * SECTOR + 3 * 4, struct.pack("<I", 0x7FFFFFFF)),
     r"grain table entry 3 of table 0 points past end of file \(sector 2147483647, file has \d+ sectors\)"),
    ("gd-entry-past-eof", "monolithicSparse",
     lambda d, h: put(d, h[0] * SECTOR, struct.pack("<I", 99999)),
     r"grain directory entry 0 points past end of file \(sector 99999, file has \d+ sectors\)"),
    ("gd-past-eof", "monolithicSparse", lambda d, h: put(d, 56, struct.pack("<Q", 5000)),
     r"grain directory \(sector 5000, 1 entries\) extends past end of file"),
    ("bad-version", "monolithicSparse", lambda d, h: put(d, 4, struct.pack("<I", 7)), r"unsupported version 7"),
    ("bad-grain-size", "monolithicSparse", lambda d, h: put(d, 20, struct.pack("<Q", 100)),
     r"invalid grain size 100 sectors"),
    ("text-mode-transfer", "monolithicSparse", lambda d, h: put(d, 75, b"\n"), r"text-mode transfer"),
    ("unknown-compression", "streamOptimized", lambda d, h: put(d, 77, struct.pack("<H", 9)),
     r"unsupported compression algorithm 9"),
    ("delta-disk", "monolithicSparse",
     lambda d, h: put(d, d.index(b"parentCID=ffffffff"), b"parentCID=0badf00d"), r"is a delta \(snapshot\) disk"),
    ("no-footer", "streamFooter", truncate(-2 * SECTOR), r"no streamOptimized footer marker at offset"),
    ("no-end-of-stream", "streamFooter", lambda d, h: put(d, len(d) - SECTOR, b"\x01"), r"no end-of-stream marker"),
    ("footer-bad-magic", "streamFooter", lambda d, h: put(d, len(d) - 2 * SECTOR, b"XDMV"),
     r"sparse header at offset \d+ has bad magic b'XDMV'"),
    ("footer-gd-at-end", "streamFooter", lambda d, h: put(d, len(d) - 2 * SECTOR + 56, b"\xff" * 8),
     r"footer at offset \d+ does not locate the grain directory"),
]


@pytest.mark.parametrize(("case", "name", "edit", "message"), OPEN_ERRORS, ids=[c[0] for c in OPEN_ERRORS])
def test_malformed_file_refused_at_open(
    disks: dict[str, Path], tmp_path: Path, case: str, name: str,
    edit: Callable[[bytearray, tuple[int, int, int]], None], message: str,
) -> None:
    bad = patched(disks[name], tmp_path, edit)
    with pytest.raises(SourceError, match=message) as raised:
        open_source(str(bad))
    assert str(bad) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_bad_magic_in_sparse_extent_named_by_descriptor(disks: dict[str, Path], tmp_path: Path) -> None:
    descriptor = disks["twoGbMaxExtentSparse"]
    extent = descriptor.with_name("twoGbMaxExtentSparse-s001.vmdk")
    shutil.copy(descriptor, tmp_path / descriptor.name)
    data = bytearray(extent.read_bytes())
    put(data, 0, b"KDMW")
    (tmp_path / extent.name).write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"s001\.vmdk: sparse header at offset 0 has bad magic b'KDMW'"):
        open_source(str(tmp_path / descriptor.name))


# -- malformed compressed grains refused on read ------------------------------------


def replace_grain(payload: bytes) -> Callable[[bytearray, tuple[int, int, int]], None]:
    def edit(data: bytearray, where: tuple[int, int, int]) -> None:
        put(data, where[2] * SECTOR + 8, struct.pack("<I", len(payload)) + payload)

    return edit


def corrupt_zlib_header(data: bytearray, where: tuple[int, int, int]) -> None:
    put(data, where[2] * SECTOR + 12, b"\x00\x00")


def halve_compressed_size(data: bytearray, where: tuple[int, int, int]) -> None:
    size = struct.unpack_from("<I", data, where[2] * SECTOR + 8)[0]
    put(data, where[2] * SECTOR + 8, struct.pack("<I", size // 2))


READ_ERRORS = [
    ("corrupt-deflate", corrupt_zlib_header, r"grain at LBA 0 \(sector 128\) fails to inflate"),
    ("cut-deflate", halve_compressed_size, r"grain at LBA 0 \(sector 128\) has a truncated deflate stream"),
    ("short-grain", replace_grain(zlib.compress(bytes(1000))),
     r"grain at LBA 0 \(sector 128\) inflates to 1000 bytes, expected 65536"),
    ("long-grain", replace_grain(zlib.compress(bytes(70000))),
     r"grain at LBA 0 \(sector 128\) inflates to more than 65536 bytes, expected 65536"),
    ("wrong-lba", lambda d, w: put(d, w[2] * SECTOR, struct.pack("<Q", 128)),
     r"grain at sector 128 holds LBA 128, but grain table entry 0 of table 0 maps it to LBA 0"),
    ("grain-past-eof", lambda d, w: put(d, w[2] * SECTOR + 8, struct.pack("<I", 0x7FFFFFFF)),
     r"grain at LBA 0 \(grain table entry 0 of table 0, sector 128, 2147483647 bytes\) extends past end of file"),
    ("metadata-marker", lambda d, w: put(d, w[2] * SECTOR + 8, struct.pack("<I", 0)),
     r"grain table entry 0 of table 0 points at a metadata marker"),
]


@pytest.mark.parametrize("name", ["streamOptimized", "streamFooter"])
@pytest.mark.parametrize(("case", "edit", "message"), READ_ERRORS, ids=[c[0] for c in READ_ERRORS])
def test_malformed_grain_refused_on_read(
    disks: dict[str, Path], tmp_path: Path, name: str, case: str,
    edit: Callable[[bytearray, tuple[int, int, int]], None], message: str,
) -> None:
    bad = patched(disks[name], tmp_path, edit)
    with open_source(str(bad)) as source:
        assert source.read(MIB - 4096, 4096) == IMAGE[MIB - 4096 : MIB]  # other grains still read
        with pytest.raises(SourceError, match=message):
            source.read(0, MIB)


# -- descriptor parsing ---------------------------------------------------------

HEAD = '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="{}"\n\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HEAD.format("monolithicFlat") + 'RW 10264 FLAT "a-flat.vmdk" 0\n\nddb.adapterType = "lsilogic"\n',
         [(7, "RW", 10264, "FLAT", "a-flat.vmdk", 0)]),
        (HEAD.format("vmfs") + 'RW 2048 VMFS "with space=x-flat.vmdk"\n',
         [(7, "RW", 2048, "VMFS", "with space=x-flat.vmdk", 0)]),
        (HEAD.format("monolithicFlat") + 'RDONLY 16 flat "a" 8\r\nRW 32 ZERO\r\n',
         [(7, "RDONLY", 16, "FLAT", "a", 8), (8, "RW", 32, "ZERO", None, 0)]),
    ],
    ids=["flat", "vmfs", "flat-and-zero"],
)
def test_parse_descriptor(text: str, expected: list[tuple[object, ...]]) -> None:
    extents = parse_descriptor(text, "d.vmdk")
    assert [(e.line, e.access, e.sectors, e.kind, e.filename, e.offset) for e in extents] == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HEAD.format("monolithicFlat"), r"d\.vmdk: descriptor declares no extents"),
        (HEAD.format("monolithicFlat") + "RW ten FLAT \"a\" 0\n", r"d\.vmdk: line 7 is not a valid extent line"),
        (HEAD.format("monolithicFlat") + "this is not a descriptor line\n", r"line 7 is not a valid extent line"),
        (HEAD.format("monolithicFlat") + "RW 10 FLAT\n", r"line 7: FLAT extent names no file"),
        (HEAD.format("monolithicFlat") + 'RW 0 FLAT "a" 0\n', r"line 7 declares an extent of 0 sectors"),
        (HEAD.replace("parentCID=ffffffff", "parentCID=0badf00d") + 'parentFileNameHint="base.vmdk"\n'
         + 'RW 10 SPARSE "d-000001.vmdk"\n', r"d\.vmdk is a delta \(snapshot\) disk of parent 'base\.vmdk'"),
    ],
    ids=["no-extents", "bad-number", "garbage-line", "no-file", "zero-sectors", "delta"],
)
def test_parse_descriptor_refuses(text: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_descriptor(text, "d.vmdk")
