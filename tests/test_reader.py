"""The read path: arbitrary ranges, cache behaviour, read-ahead."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from appliance.flr.index import build_index
from appliance.ingest.backup import backup
from appliance.store import ReadPath, Store
from appliance.store.cache import MemoryChunkCache
from appliance.store.formats import ZERO_CHUNK_ID
from tests.conftest import write_image

pytestmark = pytest.mark.store_backends


@pytest.fixture
def image_point(store: Store, tmp_path: Path):  # type: ignore[no-untyped-def]
    image = write_image(tmp_path / "disk.img", (3 << 20) + 4096 + 512, seed=11)
    return image, backup(store, "vm", [image])


def test_random_ranges_match_the_image(store: Store, image_point) -> None:  # type: ignore[no-untyped-def]
    image, point = image_point
    data = image.read_bytes()
    rng = random.Random(1)
    with ReadPath(store) as read_path:
        for _ in range(300):
            offset = rng.randrange(0, len(data) + 10)
            length = rng.choice([1, 511, 4096, 65536, 65537, 300000, 1 << 20])
            assert read_path.read(point, 0, offset, length) == data[offset : offset + length]


def test_sequential_read_uses_readahead_and_cache(store: Store, image_point) -> None:  # type: ignore[no-untyped-def]
    image, point = image_point
    cache = MemoryChunkCache(64 << 20)
    with ReadPath(store, cache=cache, readahead_bytes=1 << 20) as read_path:
        disk = read_path.disk(point, 0)
        run = 256 << 10
        assert disk.read(0, 128 << 10) + disk.read(128 << 10, 128 << 10) == image.read_bytes()[:run]
        # The second read made a sequential run, which plans the next 1 MiB. Read-ahead runs beside the
        # reader: wait for it (a slow backend answers later), then read on.
        first = run // read_path.chunk_size
        ahead = [disk.chunk_id_at(index) for index in range(first, first + (1 << 20) // read_path.chunk_size)]
        deadline = time.monotonic() + 30
        while not all(cache.contains(cid) for cid in ahead if cid != ZERO_CHUNK_ID):
            assert time.monotonic() < deadline, "read-ahead never loaded the window after a sequential read"
            time.sleep(0.01)
        before = cache.statistics()
        assert disk.read(run, 1 << 20) == image.read_bytes()[run: run + (1 << 20)]
        assert cache.statistics().misses == before.misses  # every chunk of it came from the cache
        parts = [disk.read(offset, 128 << 10) for offset in range(0, disk.size, 128 << 10)]
        assert b"".join(parts) == image.read_bytes()
        first = cache.statistics()
        assert b"".join(disk.read(o, 128 << 10) for o in range(0, disk.size, 128 << 10)) == image.read_bytes()
        assert cache.statistics().misses == first.misses


def test_readahead_plans_only_the_window_s_new_end(store: Store, image_point) -> None:  # type: ignore[no-untyped-def]
    _, point = image_point
    cache = MemoryChunkCache(64 << 20)
    with ReadPath(store, cache=cache, readahead_bytes=1 << 20) as read_path:
        disk = read_path.disk(point, 0)
        window = (1 << 20) // read_path.chunk_size
        assert read_path.prefetch(disk, 1, planned=3) == 1 + window
        deadline = time.monotonic() + 30
        planned = [disk.chunk_id_at(index) for index in range(3, 1 + window)]
        while not all(cache.contains(cid) for cid in planned if cid != ZERO_CHUNK_ID):
            assert time.monotonic() < deadline, "the planned chunks were never loaded"
            time.sleep(0.01)
        assert not any(cache.contains(disk.chunk_id_at(index)) for index in (1, 2))  # planned by earlier reads


def test_cache_is_bounded() -> None:
    cache = MemoryChunkCache(10)
    for n in range(5):
        cache.put(bytes([n]), b"abcd")
    stats = cache.statistics()
    assert stats.bytes <= 10 and stats.entries == 2
    assert cache.get(bytes([4])) == b"abcd" and cache.get(bytes([0])) is None


def test_reads_past_end_are_short(store: Store, image_point) -> None:  # type: ignore[no-untyped-def]
    image, point = image_point
    size = image.stat().st_size
    with ReadPath(store) as read_path:
        assert read_path.read(point, 0, size - 10, 100) == image.read_bytes()[-10:]
        assert read_path.read(point, 0, size, 100) == b""


def test_read_cached_answers_only_from_memory(store: Store, image_point) -> None:  # type: ignore[no-untyped-def]
    image, point = image_point
    data = image.read_bytes()
    with ReadPath(store, readahead_bytes=0) as read_path:
        disk = read_path.disk(point, 0)
        assert disk.read_cached(70_000, 5000) is None  # cold: would need a decompression
        assert disk.read(70_000, 5000) == data[70_000:75_000]
        pieces = disk.read_cached(70_000, 5000)
        assert pieces is not None and b"".join(pieces) == data[70_000:75_000]
        disk.read(read_path.chunk_size - 10, 20)
        spanning = disk.read_cached(read_path.chunk_size - 10, 20)  # two chunks: two views, never joined
        assert spanning is not None and [bytes(piece) for piece in spanning] == [
            data[read_path.chunk_size - 10 : read_path.chunk_size], data[read_path.chunk_size : read_path.chunk_size + 10]]
        assert read_path.opened_disk(point.id, 0) is disk


def test_a_read_from_memory_that_gives_up_counts_nothing(store: Store, image_point) -> None:  # type: ignore[no-untyped-def]
    """A cold read tried from memory first, then the ordinary way, counts its chunks once."""
    image, point = image_point
    cache = MemoryChunkCache(64 << 20)
    with ReadPath(store, cache=cache, readahead_bytes=0) as read_path:
        disk = read_path.disk(point, 0)
        stored = sum(disk.chunk_id_at(index) != ZERO_CHUNK_ID for index in range(2))
        assert stored, "the image's first two chunks are all zeros: pick another seed"
        span = 2 * store.config.chunk_size
        assert disk.read_cached(0, span) is None
        assert (cache.statistics().hits, cache.statistics().misses) == (0, 0)
        assert disk.read(0, span) == image.read_bytes()[:span]
        assert (cache.statistics().hits, cache.statistics().misses) == (0, stored)
        pieces = disk.read_cached(0, span)
        assert pieces is not None and b"".join(pieces) == image.read_bytes()[:span]
        assert (cache.statistics().hits, cache.statistics().misses) == (stored, stored)


def test_one_pass_keeps_no_reader_of_its_own(store: Store, image_point) -> None:  # type: ignore[no-untyped-def]
    image, point = image_point
    with ReadPath(store) as read_path:
        assert read_path.scan_disk(point, 0).read(0, 4096) == image.read_bytes()[:4096]
        build_index(store, read_path, point)  # what a serving appliance does to every new point
        assert read_path.opened_disk(point.id, 0) is None
        served = read_path.disk(point, 0)
        assert read_path.opened_disk(point.id, 0) is served and read_path.scan_disk(point, 0) is served
