"""The copy-on-write overlay against a bytearray model, across reopen, truncate and crash."""

from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from overlay import BaseImage, Overlay, OverlayClosed, OverlayCorrupt, OverlayError, export_disk
from overlay import disk, mapfile, stalls

BLOCK = 4096


class BytesBase:
    """A base image over bytes; counts reads so tests can see how reads coalesce."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.reads = 0

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return self.data[offset : offset + length]


class FileBase:
    """A base image over a file, as a restored disk would be."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)


class ZeroBase:
    """A large all-zero base that costs no memory."""

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(max(0, min(length, self.size - offset)))


def make_overlay(tmp_path: Path, base: BaseImage, block_size: int = BLOCK) -> tuple[Path, Overlay]:
    directory = tmp_path / "overlay"
    directory.mkdir()
    return directory, Overlay.create(directory, base, block_size)


def blocks_of(data: bytes | bytearray, size: int) -> list[bytes]:
    return [bytes(data[at : min(at + BLOCK, size)]) for at in range(0, size, BLOCK)]


def assert_changed_ranges_cover(overlay: Overlay, model: bytearray, base: bytes) -> None:
    """Every byte outside changed_ranges must still read as the base."""
    covered = bytearray(len(model))
    for start, length in overlay.changed_ranges():
        assert length > 0 and start + length <= overlay.size
        covered[start : start + length] = b"\x01" * length
    for offset in range(0, len(model), BLOCK):
        end = min(offset + BLOCK, len(model))
        if not any(covered[offset:end]):
            assert end <= len(base) and model[offset:end] == base[offset:end], offset


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_match_model(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    base_path = tmp_path / "base.img"
    base_bytes = rng.randbytes(40 * BLOCK + 1234)
    base_path.write_bytes(base_bytes)
    base = FileBase(base_path)
    directory, overlay = make_overlay(tmp_path, base)
    model = bytearray(base_bytes)
    abandoned: list[Overlay] = []

    for _ in range(2000):
        op = rng.random()
        size = len(model)
        if op < 0.45:
            offset = rng.randrange(0, size + 2 * BLOCK)
            length = rng.choice([1, 7, 511, BLOCK, BLOCK + 3, 3 * BLOCK - 1])
            length = rng.randrange(1, 5 * BLOCK) if rng.random() < 0.3 else length
            if rng.random() < 0.2:
                offset -= offset % BLOCK
            data = rng.randbytes(length)
            assert overlay.write(offset, data) == length
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + length] = data
        elif op < 0.8:
            offset = rng.randrange(0, size + BLOCK)
            length = rng.randrange(0, 6 * BLOCK)
            assert overlay.read(offset, length) == bytes(model[offset : offset + length])
        elif op < 0.88:
            new_size = rng.randrange(0, size + 3 * BLOCK)
            overlay.truncate(new_size)
            del model[new_size:]
            model.extend(bytes(new_size - len(model)))
        elif op < 0.94:
            overlay.flush()
        elif op < 0.97:
            overlay.close()
            overlay = Overlay.open(directory, base)
        else:  # a crash right after a flush loses nothing
            overlay.flush()
            abandoned.append(overlay)
            overlay = Overlay.open(directory, base)
        assert overlay.size == len(model)

    assert overlay.read(0, len(model) + BLOCK) == bytes(model)
    assert_changed_ranges_cover(overlay, model, base_bytes)
    overlay.close()
    for old in abandoned:
        old.close()  # flushed before being abandoned, so closing writes nothing
    reopened = Overlay.open(directory, base)
    assert reopened.read(0, len(model) + 1) == bytes(model)
    reopened.close()
    assert hashlib.sha256(base_path.read_bytes()).digest() == hashlib.sha256(base_bytes).digest()


def test_truncate_shrink_then_grow_reads_zeros_not_base(tmp_path: Path) -> None:
    base_bytes = random.Random(5).randbytes(10 * BLOCK)
    base = BytesBase(base_bytes)
    directory, overlay = make_overlay(tmp_path, base)
    overlay.write(2 * BLOCK + 100, b"x" * 1000)  # overlay block 2, cut in the middle below
    overlay.truncate(2 * BLOCK + 500)
    assert overlay.read(0, 10 * BLOCK) == base_bytes[: 2 * BLOCK + 100] + b"x" * 400
    overlay.truncate(10 * BLOCK)
    expected = base_bytes[: 2 * BLOCK + 100] + b"x" * 400 + bytes(8 * BLOCK - 500)
    assert overlay.read(0, 10 * BLOCK) == expected
    overlay.truncate(5 * BLOCK + 7)  # cuts a block that was never in the overlay
    overlay.write(7 * BLOCK, b"y")  # grows past the cut by writing
    expected = expected[: 5 * BLOCK + 7] + bytes(2 * BLOCK - 7) + b"y"
    assert overlay.read(0, 20 * BLOCK) == expected
    overlay.close()
    reopened = Overlay.open(directory, base)
    assert reopened.read(0, 20 * BLOCK) == expected
    reopened.close()
    assert base.data == base_bytes


def test_blocks_cut_by_shrink_stay_zero_even_if_their_data_survived(tmp_path: Path) -> None:
    """Power loss after a shrink's header is durable but before its data trim is."""
    base = BytesBase(random.Random(8).randbytes(8 * BLOCK))
    directory, overlay = make_overlay(tmp_path, base)
    overlay.write(5 * BLOCK, b"s" * BLOCK)
    overlay.flush()
    overlay.truncate(2 * BLOCK)
    with open(directory / "data", "r+b") as data:  # the trim "did not reach the disk"
        data.seek(5 * BLOCK)
        data.write(b"s" * BLOCK)
    overlay.truncate(8 * BLOCK)
    overlay.close()
    reopened = Overlay.open(directory, base)
    assert reopened.read(2 * BLOCK, 6 * BLOCK) == bytes(6 * BLOCK)
    reopened.close()


def test_truncate_racing_a_sub_block_write_cuts_its_fill(tmp_path: Path) -> None:
    """The base part of a fill is read without the lock; a shrink in between must win."""
    base_bytes = random.Random(10).randbytes(4 * BLOCK)

    class RacingBase(BytesBase):
        def read(self, offset: int, length: int) -> bytes:
            data = super().read(offset, length)
            if self.reads == 1:  # the fill read of the write below
                overlay.truncate(BLOCK + 5)
                overlay.truncate(4 * BLOCK)
            return data

    base = RacingBase(base_bytes)
    _, overlay = make_overlay(tmp_path, base)
    overlay.write(BLOCK + 10, b"late")
    expected = base_bytes[: BLOCK + 5] + bytes(5) + b"late" + bytes(3 * BLOCK - 14)
    assert overlay.read(0, 4 * BLOCK) == expected
    overlay.close()


def test_damaged_data_file_is_an_error_not_zeros(tmp_path: Path) -> None:
    base = BytesBase(bytes(4 * BLOCK))
    directory, overlay = make_overlay(tmp_path, base)
    overlay.write(3 * BLOCK, b"q" * BLOCK)
    overlay.close()
    os.truncate(directory / "data", 3 * BLOCK + 100)
    reopened = Overlay.open(directory, base)
    assert reopened.read(3 * BLOCK, 100) == b"q" * 100
    message = f"{directory}: data file ends at offset {3 * BLOCK + 100},"
    with pytest.raises(OverlayError, match=message):
        reopened.read(0, 4 * BLOCK)
    reopened.close()


def test_reopen_after_flush_keeps_data(tmp_path: Path) -> None:
    base = BytesBase(bytes(range(256)) * 64)
    directory, overlay = make_overlay(tmp_path, base)
    overlay.write(10, b"hello")
    overlay.write(base.size + 50, b"past the end")
    overlay.flush()
    expected = overlay.read(0, overlay.size)
    reopened = Overlay.open(directory, base)  # without closing the first
    assert reopened.size == base.size + 62
    assert reopened.read(0, reopened.size) == expected
    assert reopened.read(base.size, 50) == bytes(50)
    reopened.close()
    overlay.close()


def test_changes_are_refused_once_close_has_begun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that lands after close's last flush would be acknowledged and never made durable."""
    base = BytesBase(bytes(range(256)) * 64)
    directory, overlay = make_overlay(tmp_path, base)
    overlay.write(0, b"kept")
    flushing, release = threading.Event(), threading.Event()
    real_flush = overlay._flush_locked

    def held_flush() -> None:
        flushing.set()
        release.wait(10)
        real_flush()

    monkeypatch.setattr(overlay, "_flush_locked", held_flush)
    closer = threading.Thread(target=overlay.close)
    closer.start()
    assert flushing.wait(10)
    with pytest.raises(OverlayClosed):
        overlay.write(BLOCK, b"too late")
    with pytest.raises(OverlayClosed):
        overlay.truncate(1)
    assert overlay.write_nowait(BLOCK, bytes(BLOCK)) is None
    release.set()
    closer.join(10)
    with pytest.raises(OverlayClosed):
        overlay.write(0, b"after")
    reopened = Overlay.open(directory, base)
    assert reopened.read(0, 4) == b"kept"
    assert reopened.read(BLOCK, 8) == base.read(BLOCK, 8)
    reopened.close()


def test_crash_keeps_flushed_data_and_unflushed_blocks_whole(tmp_path: Path) -> None:
    rng = random.Random(9)
    base_bytes = rng.randbytes(64 * BLOCK)
    base = BytesBase(base_bytes)
    directory, overlay = make_overlay(tmp_path, base)
    model = bytearray(base_bytes)
    for _ in range(40):
        offset = rng.randrange(0, len(model) - 2 * BLOCK)
        data = rng.randbytes(rng.randrange(1, 2 * BLOCK))
        overlay.write(offset, data)
        model[offset : offset + len(data)] = data
    overlay.flush()
    flushed = bytes(model)
    for _ in range(60):  # overwrites of overlay blocks, new blocks, sub-block writes
        offset = rng.randrange(0, len(model) - 2 * BLOCK)
        data = rng.randbytes(rng.randrange(1, 2 * BLOCK))
        overlay.write(offset, data)
        model[offset : offset + len(data)] = data
    overlay.write(len(model) + 10, b"unflushed growth")
    unflushed = bytes(model)

    crashed = Overlay.open(directory, base)  # from disk, the first one never closed
    assert crashed.size == len(flushed)
    after = crashed.read(0, crashed.size)
    changed = 0
    size = len(flushed)
    for index, (got, old, new) in enumerate(
        zip(blocks_of(after, size), blocks_of(flushed, size), blocks_of(unflushed, size))
    ):
        assert got in (old, new), f"block {index} is neither its flushed nor its new content"
        changed += got != old
    assert changed  # in-place overwrites of flushed overlay blocks are already in `data`
    crashed.close()
    overlay.close()


CHILD = """
import sys
from pathlib import Path
from overlay import Overlay

class Base:
    size = 256 * 4096
    def read(self, offset, length):
        end = min(offset + length, self.size)
        return b"".join(
            bytes([block % 251]) * (min(end, (block + 1) * 4096) - max(offset, block * 4096))
            for block in range(offset // 4096, -(-end // 4096))
        )

overlay = Overlay.open(Path(sys.argv[1]), Base())
overlay.write(3 * 4096 + 5, b"flushed" * 1000)
overlay.flush()
print("flushed", flush=True)
for index in range(0, 200, 3):
    overlay.write(index * 4096 + 17, b"pending" * 700)
sys.stdin.readline()
"""


def test_kill_9_after_flush(tmp_path: Path) -> None:
    class Base:  # the same pattern as the child's: block i is filled with i % 251
        size = 256 * 4096

        def read(self, offset: int, length: int) -> bytes:
            end = min(offset + length, self.size)
            return b"".join(
                bytes([block % 251]) * (min(end, (block + 1) * 4096) - max(offset, block * 4096))
                for block in range(offset // 4096, -(-end // 4096))
            )

    directory, overlay = make_overlay(tmp_path, Base())
    overlay.close()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)], cwd=Path(__file__).parents[1],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "flushed\n"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    reopened = Overlay.open(directory, Base())
    old = bytearray(Base().read(0, Base.size))
    old[3 * 4096 + 5 : 3 * 4096 + 7005] = b"flushed" * 1000
    new = bytearray(old)
    for index in range(0, 200, 3):
        new[index * 4096 + 17 : index * 4096 + 4917] = b"pending" * 700
    got = reopened.read(0, Base.size)
    for index, (block, before, after) in enumerate(
        zip(blocks_of(got, Base.size), blocks_of(old, Base.size), blocks_of(new, Base.size))
    ):
        assert block in (before, after), f"block {index}"
    assert got[3 * 4096 + 5 : 3 * 4096 + 12] == b"flushed"
    reopened.close()


def test_corrupt_map_is_reported(tmp_path: Path) -> None:
    base = BytesBase(bytes(8 * BLOCK))
    directory, overlay = make_overlay(tmp_path, base)
    overlay.write(0, b"data")
    overlay.close()
    map_path = directory / "map"
    good = map_path.read_bytes()

    def corrupted(data: bytes) -> str:
        map_path.write_bytes(data)
        with pytest.raises(OverlayCorrupt) as caught:
            Overlay.open(directory, base)
        assert str(directory) in str(caught.value)
        return str(caught.value)

    assert "checksum" in corrupted(good[:20] + bytes([good[20] ^ 1]) + good[21:])
    assert "magic" in corrupted(b"X" + good[1:])
    assert "truncated" in corrupted(good[:30])
    fields = bytearray(good[:40])
    struct.pack_into("<I", fields, 8, 2)
    assert "version" in corrupted(bytes(fields) + xxhash.xxh3_64_digest(bytes(fields)) + good[48:])
    entries = bytearray(good)
    entries[mapfile.ENTRIES_OFFSET + 1] = 7
    assert "block 1" in corrupted(bytes(entries))
    map_path.write_bytes(good)
    Overlay.open(directory, base).close()


def test_changed_ranges_are_written_blocks_and_regions_past_base(tmp_path: Path) -> None:
    base = BytesBase(random.Random(3).randbytes(10 * BLOCK + 100))
    _, overlay = make_overlay(tmp_path, base)
    assert overlay.changed_ranges() == []
    overlay.write(BLOCK + 10, b"a")
    overlay.write(3 * BLOCK + 4000, b"b" * 200)  # spans blocks 3 and 4
    overlay.write(5 * BLOCK, b"c" * BLOCK)
    overlay.write(8 * BLOCK, b"d" * BLOCK)
    assert overlay.changed_ranges() == [(BLOCK, BLOCK), (3 * BLOCK, 3 * BLOCK), (8 * BLOCK, BLOCK)]
    overlay.write(10 * BLOCK, b"e")  # the partial last block: clipped at size
    assert overlay.changed_ranges()[-1] == (10 * BLOCK, 100)
    overlay.truncate(12 * BLOCK)
    assert overlay.changed_ranges()[-1] == (10 * BLOCK, 2 * BLOCK)
    overlay.truncate(6 * BLOCK + 5)
    overlay.truncate(7 * BLOCK)
    assert overlay.changed_ranges() == [
        (BLOCK, BLOCK), (3 * BLOCK, 3 * BLOCK), (6 * BLOCK + 5, BLOCK - 5),
    ]
    overlay.truncate(2 * BLOCK + 1)
    overlay.truncate(20 * BLOCK)
    assert overlay.changed_ranges() == [(BLOCK, BLOCK), (2 * BLOCK + 1, 18 * BLOCK - 1)]
    overlay.truncate(2 * BLOCK)
    overlay.truncate(3 * BLOCK)
    assert overlay.changed_ranges() == [(BLOCK, 2 * BLOCK)]
    overlay.close()


def test_export_equals_model_and_is_sparse(tmp_path: Path) -> None:
    rng = random.Random(4)
    base_bytes = rng.randbytes(16 * BLOCK) + bytes(2000 * BLOCK)
    base = BytesBase(base_bytes)
    _, overlay = make_overlay(tmp_path, base)
    model = bytearray(base_bytes)
    for offset in (5, 3 * BLOCK + 1, 700 * BLOCK - 3, len(model) - 10):
        data = rng.randbytes(3 * BLOCK)
        overlay.write(offset, data)
        model[offset : offset + len(data)] = data
    overlay.write(20 * BLOCK, bytes(BLOCK))  # an overlay block of zeros is a hole too
    target = tmp_path / "export" / "disk.img"
    target.parent.mkdir()
    export_disk(overlay, target)
    assert target.read_bytes() == bytes(model)
    assert target.stat().st_blocks * 512 <= 40 * BLOCK < len(model)
    assert os.listdir(target.parent) == ["disk.img"]
    overlay.close()


def test_discard_removes_files(tmp_path: Path) -> None:
    base = BytesBase(bytes(4 * BLOCK))
    directory, overlay = make_overlay(tmp_path, base)
    overlay.write(0, b"gone")
    overlay.discard()
    assert list(directory.iterdir()) == []
    with pytest.raises(OverlayError, match="closed"):
        overlay.read(0, 1)
    with pytest.raises(OverlayError, match=str(directory)):
        Overlay.open(directory, base)


def test_reads_coalesce_runs_from_the_same_side(tmp_path: Path) -> None:
    block = 64 << 10
    base = BytesBase(random.Random(6).randbytes(64 * block))
    _, overlay = make_overlay(tmp_path, base, block)
    base.reads = 0
    assert overlay.read(0, 1 << 20) == base.data[: 1 << 20]
    assert base.reads == 1
    for index in (2, 3, 9):
        overlay.write(index * block + 1, b"w")  # fills from the base: one read each
    base.reads = 0
    overlay.read(0, 16 * block)
    assert base.reads == 3  # blocks 0-1, 4-8, 10-15
    overlay.read(2 * block + 5, 4096)
    assert base.reads == 3
    overlay.close()


def test_flush_of_one_block_writes_little_of_a_large_map(tmp_path: Path) -> None:
    block = 64 << 10
    base = ZeroBase(64 << 30)  # a million map entries
    directory, overlay = make_overlay(tmp_path, base, block)
    overlay.write(base.size - block, b"z" * block)
    overlay.flush()
    map_stat = (directory / "map").stat()
    assert map_stat.st_size > 1_000_000 and map_stat.st_blocks * 512 <= 64 << 10
    assert overlay.allocated_bytes() <= block + (64 << 10)
    # Blocks whose entries fall in consecutive map pages, flushed together.
    written = [4095, 4096, 8192, 12287, 12288, 500_000]
    for index in written:
        overlay.write(index * block + 1, b"p")
    overlay.close()
    reopened = Overlay.open(directory, base)
    assert reopened.changed_ranges() == [
        (4095 * block, 2 * block), (8192 * block, block), (12287 * block, 2 * block),
        (500_000 * block, block), (base.size - block, block),
    ]
    reopened.close()


class SyncLog:
    """Records which sync call each descriptor got, then does the real call (os.fsync / os.fdatasync)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int]] = []
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)
            monkeypatch.setattr(disk.os, name, self._recording(name, real))

    def _recording(self, name: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            self.calls.append((name, fd))
            real(fd)
        return call

    def of(self, fd: int) -> list[str]:
        return [name for name, got in self.calls if got == fd]


def test_concurrent_flushes_share_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: flushes that find their writes covered by another flush return at once."""
    _, overlay = make_overlay(tmp_path, BytesBase(bytes(64 * BLOCK)))
    for index in range(16):
        overlay.write(index * BLOCK, bytes([index + 1]) * BLOCK)
    syncs = SyncLog(monkeypatch)
    start = threading.Barrier(16)

    def flush() -> None:
        start.wait()
        overlay.flush()

    threads = [threading.Thread(target=flush) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert syncs.of(overlay._data_fd) == ["fsync"]
    assert syncs.of(overlay._map_fd) == ["fdatasync"]  # the map's entries and header, after the data
    overlay.flush()
    assert len(syncs.calls) == 2  # nothing new: nothing to sync
    overlay.close()


def test_data_sync_leaves_the_mtime_to_a_later_file_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, overlay = make_overlay(tmp_path, BytesBase(bytes(8 * BLOCK)))
    overlay.write(0, b"a" * BLOCK)
    overlay.flush()
    syncs = SyncLog(monkeypatch)
    before = overlay.modified_ns
    overlay.write(0, b"b" * BLOCK)  # a rewrite: data only, the map stays
    assert overlay.modified_ns > before
    overlay.flush(metadata=False)
    assert syncs.of(overlay._data_fd) == ["fdatasync"] and syncs.of(overlay._map_fd) == []
    overlay.flush(metadata=False)
    overlay.flush()  # no new write, but the mtime the data sync left behind must become durable
    overlay.flush()
    assert syncs.of(overlay._data_fd) == ["fdatasync", "fsync"]
    modified = overlay.modified_ns
    overlay.close()
    reopened = Overlay.open(directory, BytesBase(bytes(8 * BLOCK)))
    assert reopened.modified_ns == (directory / "data").stat().st_mtime_ns
    assert abs(reopened.modified_ns - modified) < 1_000_000_000  # the disk's mtime, from the data file
    assert reopened.read(0, BLOCK) == b"b" * BLOCK
    reopened.close()


def test_concurrent_writers_sharing_blocks_lose_nothing(tmp_path: Path) -> None:
    region = 8 * BLOCK + 1234  # not block-aligned: neighbours share edge blocks
    base_bytes = random.Random(7).randbytes(8 * region)
    base = BytesBase(base_bytes)
    directory, overlay = make_overlay(tmp_path, base)
    failures: list[BaseException] = []
    models = {w: bytearray(base_bytes[w * region : (w + 1) * region]) for w in range(8)}

    def writer(worker: int) -> None:
        rng, model = random.Random(worker), models[worker]
        try:
            for round_ in range(300):
                at = rng.choice([0, region - 300, rng.randrange(0, region - 300)])
                data = rng.randbytes(rng.randrange(1, 300))
                overlay.write(worker * region + at, data)
                model[at : at + len(data)] = data
                assert overlay.read(worker * region + at, len(data)) == data
                if round_ % 50 == 0:
                    overlay.flush()
        except BaseException as exc:  # reported from the main thread
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    expected = b"".join(bytes(models[worker]) for worker in range(8))
    assert overlay.read(0, overlay.size) == expected
    overlay.close()
    reopened = Overlay.open(directory, base)
    assert reopened.read(0, reopened.size) == expected
    reopened.close()


def test_create_and_open_refuse_what_is_not_theirs(tmp_path: Path) -> None:
    base = BytesBase(bytes(4 * BLOCK))
    directory, overlay = make_overlay(tmp_path, base)
    overlay.close()
    with pytest.raises(OverlayError, match="not empty"):
        Overlay.create(directory, base)
    with pytest.raises(OverlayError, match="block size"):
        Overlay.create(tmp_path, base, 1000)
    with pytest.raises(OverlayError, match="another base"):
        Overlay.open(directory, BytesBase(bytes(BLOCK)))
    reopened = Overlay.open(directory, base)
    with pytest.raises(OverlayError, match="offset -1"):
        reopened.write(-1, b"x")
    reopened.close()


def test_read_nowait_answers_from_memory_only(tmp_path: Path) -> None:
    data = os.urandom(4 * BLOCK)
    _, overlay = make_overlay(tmp_path, BytesBase(data))
    asked: list[tuple[int, int]] = []

    def cached(offset: int, length: int) -> list[bytes] | None:  # in pieces, as the chunk cache answers
        asked.append((offset, length))
        middle = offset + length // 2
        return [data[offset:middle], data[middle : offset + length]]

    assert overlay.read_nowait(100, 5000, cached) == data[100:5100]
    overlay.write(2 * BLOCK + 10, b"xyz")  # the block is the overlay's now, and in the page cache
    merged = data[: 2 * BLOCK + 10] + b"xyz" + data[2 * BLOCK + 13 :]
    assert overlay.read_nowait(BLOCK + 5, 2 * BLOCK, cached) == merged[BLOCK + 5 : 3 * BLOCK + 5]
    assert overlay.read_nowait(3 * BLOCK, BLOCK, lambda offset, length: None) is None  # base not in memory
    assert overlay.read_nowait(4 * BLOCK, 10, cached) is None  # at the end: the ordinary read answers
    with overlay._lock:  # a writer holds the lock: the loop does not wait for it
        assert overlay.read_nowait(0, 10, cached) is None
    overlay.truncate(BLOCK // 2)
    assert overlay.read_nowait(0, BLOCK, cached) == data[: BLOCK // 2]
    assert asked == [(100, 5000), (BLOCK + 5, BLOCK - 5), (3 * BLOCK, 5), (0, BLOCK // 2)]
    overlay.close()
    assert overlay.read_nowait(0, 10, cached) is None


def test_write_nowait_writes_what_write_would(tmp_path: Path) -> None:
    data = os.urandom(6 * BLOCK + 100)
    for name in ("ordinary", "nowait"):
        (tmp_path / name).mkdir()
    _, ordinary = make_overlay(tmp_path / "ordinary", BytesBase(data))
    directory, nowait = make_overlay(tmp_path / "nowait", BytesBase(data))
    writes = [(BLOCK, os.urandom(2 * BLOCK)),  # whole blocks: no fill
              (BLOCK + 10, b"inside a block the overlay holds"),
              (6 * BLOCK, os.urandom(3 * BLOCK + 7))]  # over the base's end and past the disk's: no base bytes wanted
    for offset, chunk in writes:
        assert nowait.write_nowait(offset, memoryview(chunk)) == len(chunk)
        ordinary.write(offset, chunk)
    assert nowait.size == ordinary.size == 9 * BLOCK + 7
    assert nowait.read(0, nowait.size) == ordinary.read(0, ordinary.size)
    assert nowait.changed_ranges() == ordinary.changed_ranges()
    nowait.close()
    reopened = Overlay.open(directory, BytesBase(data))  # what close flushed: the map names the blocks
    assert reopened.read(0, reopened.size) == ordinary.read(0, ordinary.size)
    reopened.close()
    ordinary.close()


def test_write_nowait_declines_what_would_wait(tmp_path: Path) -> None:
    base = BytesBase(os.urandom(4 * BLOCK))
    _, overlay = make_overlay(tmp_path, base)
    assert overlay.write_nowait(BLOCK + 10, b"x") is None  # the block needs a fill from the base
    assert overlay.write_nowait(-1, b"x") is None  # errors are the ordinary write's to report
    assert overlay.read(0, 4 * BLOCK) == base.data
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with overlay._lock:
            holding.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    try:
        assert overlay.write_nowait(0, bytes(BLOCK)) is None
    finally:
        release.set()
        holder.join()
    assert overlay.write_nowait(0, bytes(BLOCK)) == BLOCK
    overlay.close()
    assert overlay.write_nowait(0, bytes(BLOCK)) is None


def test_write_nowait_backs_off_once_stalls_add_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stalls, "STALL_BACKOFF_SECONDS", 0.2)
    _, overlay = make_overlay(tmp_path, BytesBase(bytes(4 * BLOCK)))
    overlay.stalls.seconds = 0  # every write counts as a stall
    for _ in range(3):  # stalls within the budget: the loop keeps writing
        assert overlay.write_nowait(3 * BLOCK, b"d" * BLOCK) == BLOCK
    overlay.stalls.budget = 0  # the next stall exhausts it
    assert overlay.write_nowait(0, b"a" * BLOCK) == BLOCK  # the slow write itself is done
    overlay.stalls.seconds = stalls.STALL_SECONDS
    assert overlay.write_nowait(BLOCK, b"b" * BLOCK) is None  # the disk is slow: worker threads write
    assert overlay.write(BLOCK, b"b" * BLOCK) == BLOCK
    time.sleep(0.3)
    assert overlay.write_nowait(2 * BLOCK, b"c" * BLOCK) == BLOCK
    assert overlay.read(0, 4 * BLOCK) == b"a" * BLOCK + b"b" * BLOCK + b"c" * BLOCK + b"d" * BLOCK
    overlay.close()


def test_a_failed_data_write_is_an_overlay_error_and_loses_nothing(tmp_path: Path) -> None:
    base = BytesBase(os.urandom(8 * BLOCK))
    directory, overlay = make_overlay(tmp_path, base)
    overlay.write(0, b"k" * BLOCK)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * BLOCK, limits[1]))
    try:
        assert overlay.write_nowait(6 * BLOCK, b"z" * BLOCK) is None  # left to `write`, which reports it
        with pytest.raises(OverlayError, match=rf"{directory}: data write at offset {6 * BLOCK} failed: File too large"):
            overlay.write(6 * BLOCK, b"z" * BLOCK)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert overlay.read(0, 8 * BLOCK) == b"k" * BLOCK + base.data[BLOCK:]
    overlay.close()
    reopened = Overlay.open(directory, base)
    assert reopened.read(0, 8 * BLOCK) == b"k" * BLOCK + base.data[BLOCK:]
    reopened.close()
