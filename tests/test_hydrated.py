"""The hydrated tier (`appliance.store.hydrated`) and background hydration (`appliance.hydration`).

The tier's own files are real files in tmp_path; the store runs on both pack backends
(local packs and a real SeaweedFS), and "unreachable" means its packs are deleted
from the backend, so any read that still needed the store would fail.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.hydration import RESCAN_SECONDS, Hydrator, VmHydration, hydrated_tier
from appliance.ingest.backup import backup
from appliance.store import ReadPath, Store
from appliance.store.cache import MemoryChunkCache
from appliance.store.catalog import RestorePoint, referenced_chunks
from appliance.store.hydrated import INDEX_NAME, RECORD_SIZE, SLAB_NAME, HydratedTier, TierStatistics
from tests.conftest import replace_pack, run_cli, write_image
from tests.test_api import start_api
from tests.test_instant_boot_vsphere import cli, config_for
from tests.test_metrics import Scrape, scrape
from tests.test_nfs_serve import Serve
from tests.test_nfs_server import run
from tests.test_vsphere_backup import Disks
from tests.test_vsphere_backup_serve import wait_for
from tests.vcsim import Vcsim, vcsim  # noqa: F401

CHUNK = 4096
STORE_ID = "5f0c3e7e-0000-4000-8000-000000000001"


def chunk(number: int, length: int = CHUNK) -> tuple[bytes, bytes]:
    """A chunk id and bytes, distinct per number."""
    data = (number.to_bytes(4, "big") * (length // 4 + 1))[:length]
    return number.to_bytes(32, "big"), data


def filled(tier: HydratedTier, cid: bytes) -> bool:
    """Wait for a fill queued with `put` to be written."""
    return bool(wait_for("the fill", lambda: tier.contains(cid), 10))


# ----- the tier alone ---------------------------------------------------------------------


def test_a_reopened_tier_serves_what_it_held(tmp_path: Path) -> None:
    chunks = [chunk(n, CHUNK if n % 3 else 1000) for n in range(10)]
    with HydratedTier(tmp_path, 16 * CHUNK, CHUNK, STORE_ID) as tier:
        for cid, data in chunks:
            assert tier.store(cid, data)
    assert (tmp_path / SLAB_NAME).stat().st_size == 16 * CHUNK
    with HydratedTier(tmp_path, 16 * CHUNK, CHUNK, STORE_ID) as tier:
        assert [tier.get(cid) for cid, _ in chunks] == [data for _, data in chunks]
        held = tier.statistics()
        assert (held.entries, held.bytes, held.hits, held.misses) == (10, sum(len(d) for _, d in chunks), 10, 0)
    with HydratedTier(tmp_path, 16 * CHUNK, CHUNK, "another-store") as tier:  # never another store's chunks
        assert tier.statistics().entries == 0 and tier.get(chunks[0][0]) is None


def test_eviction_keeps_the_limit_and_the_pinned_chunks(tmp_path: Path) -> None:
    with HydratedTier(tmp_path, 4 * CHUNK, CHUNK, STORE_ID) as tier:
        (a, a_data), (b, b_data), (c, c_data), (d, d_data), (e, e_data), (f, f_data) = map(chunk, range(6))
        tier.pin({a, b})
        assert tier.store(a, a_data) and tier.store(b, b_data)
        for cid, data in ((c, c_data), (d, d_data)):  # fills from reads, written by the tier's own thread
            tier.put(cid, data)
            filled(tier, cid)
        assert tier.get(c) == c_data  # c was used last: d goes first
        tier.put(e, e_data)
        filled(tier, e)
        assert not tier.contains(d) and all(map(tier.contains, (a, b, c, e)))
        held = tier.statistics()
        assert (held.entries, held.bytes, held.capacity, held.pinned) == (4, 4 * CHUNK, 4 * CHUNK, 2)
        tier.pin({a, b, c, e})  # the policy now wants all four: nothing may be evicted for a read, nor for f
        assert not tier.store(f, f_data)
        tier.put(f, f_data)
        wait_for("the skipped fill", lambda: tier.statistics().fills_skipped == 1, 10)
        tier.pin({c, e, f})  # a and b are only an older point's now: they go first, f takes a slot
        assert tier.store(f, f_data) and tier.contains(a) != tier.contains(b)
        assert tier.statistics().bytes <= 4 * CHUNK
    with HydratedTier(tmp_path, 2 * CHUNK, CHUNK, STORE_ID) as smaller:  # a smaller limit drops the slots past it
        assert smaller.statistics().entries <= 2 and (tmp_path / SLAB_NAME).stat().st_size == 2 * CHUNK


def test_damaged_slots_and_records_are_dropped_never_served(tmp_path: Path) -> None:
    chunks = [chunk(n) for n in range(4)]
    with HydratedTier(tmp_path, 4 * CHUNK, CHUNK, STORE_ID) as tier:
        for cid, data in chunks:
            tier.store(cid, data)
    slab, index = tmp_path / SLAB_NAME, tmp_path / INDEX_NAME
    with slab.open("r+b") as handle:  # slot 0 (the first chunk) flipped; the slab cut inside slot 3
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
        handle.truncate(3 * CHUNK + 10)
    with index.open("r+b") as handle:  # slot 1's record torn
        handle.seek(64 + RECORD_SIZE + 40)
        handle.write(b"\xff")
    with HydratedTier(tmp_path, 4 * CHUNK, CHUNK, STORE_ID) as tier:
        assert tier.statistics().entries == 3  # the torn record is an empty slot
        assert [tier.get(cid) for cid, _ in chunks] == [None, None, chunks[2][1], None]
        held = tier.statistics()
        assert (held.dropped_corrupt, held.entries, held.hits) == (2, 1, 1)
    with HydratedTier(tmp_path, 4 * CHUNK, CHUNK, STORE_ID) as tier:  # the drops reached the index
        assert tier.statistics().entries == 1


# ----- with a store: hydration and the read path ------------------------------------------------


@pytest.fixture
def hydrated_store(store: Store, tmp_path: Path) -> Iterator[tuple[Store, Path, RestorePoint]]:
    image = write_image(tmp_path / "disk.img", (2 << 20) + 4096, seed=41)
    yield store, image, backup(store, "vm1", [image])


def hydrate(store: Store, directory: Path, mode: str = "newest",
            marked: tuple[str, ...] = ()) -> tuple[dict[str, VmHydration], TierStatistics]:
    """Run a hydrator until it has nothing pending; its progress and the tier's figures then."""
    with hydrated_tier(store, directory, 64 << 20) as tier, ReadPath(store, tier=tier) as read_path:
        assert tier is not None
        hydrator = Hydrator(store, read_path, tier, mode, marked)
        hydrator.start()
        try:
            progress = wait_for("hydration", lambda: (found := hydrator.progress()) and all(
                step.pending == 0 for step in found.values()) and found)
            return progress, tier.statistics()
        finally:
            hydrator.close()


def distinct_chunks(store: Store, point: RestorePoint) -> int:
    with store.env.begin() as txn:
        return len(referenced_chunks(store.catalog.chunk_map(txn, point, 0)))


@pytest.mark.store_backends
def test_a_hydrated_point_reads_from_the_tier_with_the_packs_gone(hydrated_store: Any, tmp_path: Path) -> None:
    store, image, point = hydrated_store
    directory = tmp_path / "hydrated"
    progress, _ = hydrate(store, directory)
    assert progress["vm1"].point == point.id and progress["vm1"].done == distinct_chunks(store, point) > 0
    for pack_id in store.packs.list_packs():
        replace_pack(store, pack_id, None)
    with hydrated_tier(store, directory, 64 << 20) as tier, ReadPath(store, tier=tier) as read_path:
        disk = read_path.disk(point, 0)
        assert b"".join(disk.read(offset, 100_000) for offset in range(0, disk.size, 100_000)) == image.read_bytes()
        reads = read_path.statistics()
        assert reads.loads.chunks_loaded == 0 and reads.tier is not None
        assert reads.tier.hits == distinct_chunks(store, point) and reads.tier.misses == 0


@pytest.mark.store_backends
def test_a_corrupt_hydrated_chunk_is_loaded_again_from_the_store(hydrated_store: Any, tmp_path: Path) -> None:
    store, image, point = hydrated_store
    directory = tmp_path / "hydrated"
    hydrate(store, directory)
    with (directory / SLAB_NAME).open("r+b") as handle:
        handle.seek(store.config.chunk_size * 2 + 5)  # inside the third slot hydrated
        handle.write(b"\0\1\2")
    with hydrated_tier(store, directory, 64 << 20) as tier, ReadPath(store, tier=tier) as read_path:
        assert read_path.read(point, 0, 0, point.disks[0].size) == image.read_bytes()
        reads = read_path.statistics()
        assert reads.tier is not None and reads.tier.dropped_corrupt == 1 and reads.loads.chunks_loaded == 1
        assert tier is not None
        wait_for("the refill", lambda: tier.statistics().entries == distinct_chunks(store, point))


def test_reads_fill_the_tier_and_a_new_point_unpins_the_old(hydrated_store: Any, tmp_path: Path) -> None:
    store, image, first = hydrated_store
    directory = tmp_path / "hydrated"
    with hydrated_tier(store, directory, 64 << 20) as tier, \
            ReadPath(store, cache=MemoryChunkCache(16 << 20), tier=tier) as read_path:
        assert tier is not None
        read_path.read(first, 0, 0, first.disks[0].size)  # nothing hydrates: reads pass through
        wait_for("the fills", lambda: tier.statistics().entries == distinct_chunks(store, first))
        assert tier.statistics().pinned == 0
    changed = tmp_path / "changed.img"
    data = bytearray(image.read_bytes())
    data[: 1 << 20] = os.urandom(1 << 20)
    changed.write_bytes(bytes(data))
    second = backup(store, "vm1", [changed])
    progress, held = hydrate(store, directory)
    assert progress["vm1"].point == second.id and progress["vm1"].done == distinct_chunks(store, second)
    assert held.entries > held.pinned == distinct_chunks(store, second)  # the first point's own chunks go first


def test_policies_mode_hydrates_only_the_marked_vms(hydrated_store: Any, tmp_path: Path) -> None:
    store, image, _ = hydrated_store
    backup(store, "vm2", [image])
    assert set(hydrate(store, tmp_path / "h", "policies", marked=("vm2",))[0]) == {"vm2"}
    assert set(hydrate(store, tmp_path / "h", "newest")[0]) == {"vm1", "vm2"}


def test_discovery_marks_change_which_vms_policies_mode_hydrates(hydrated_store: Any, tmp_path: Path) -> None:
    store, image, _ = hydrated_store
    backup(store, "vm2", [write_image(tmp_path / "other.img", 1 << 20, seed=42)])
    with hydrated_tier(store, tmp_path / "h", 64 << 20) as tier, ReadPath(store, tier=tier) as read_path:
        assert tier is not None
        hydrator = Hydrator(store, read_path, tier, "policies", ("vm2",))
        hydrator.start()
        try:
            def hydrated(vms: set[str]) -> bool:
                progress = hydrator.progress()
                return set(progress) == vms and all(step.pending == 0 for step in progress.values())

            wait_for("vm2 hydrated", lambda: hydrated({"vm2"}))
            hydrator.mark({"vm1": True, "vm2": False})  # as a discovery round finds their policies
            wait_for("only vm1 hydrated", lambda: hydrated({"vm1"}))
            assert tier.statistics().pinned == hydrator.progress()["vm1"].done
        finally:
            hydrator.close()


# ----- through `serve`: NFS reads, metrics, a restart, a backup job ---------------------------------


def scraped(server: Serve) -> Scrape:
    return scrape(server.metrics_port)


def hydrated_metrics(server: Serve, vm: str, timeout: float = 60) -> Scrape:
    """The first scrape that shows `vm`'s newest point hydrated."""
    def done() -> Scrape | None:
        found = scraped(server)
        chunks = "appliance_hydration_chunks"
        return found if found(chunks, vm=vm, state="done") > 0 and found(chunks, vm=vm, state="pending") == 0 else None
    found: Scrape = wait_for(f"{vm} hydrated", done, timeout)
    return found


def test_serve_hydrates_then_answers_nfs_from_the_tier_after_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cli("--store", str(store), "init", check=True)
    image = write_image(tmp_path / "disk.img", 3 << 20, seed=43)
    run_cli("--store", str(store), "backup", "--vm", "vm1", str(image), check=True)
    point = json.loads(run_cli("--store", str(store), "points", "--json", check=True).stdout)[0]["id"]
    tier = ("--hydrated-dir", str(tmp_path / "hydrated"), "--hydrated-gib", "0.25")
    server = Serve(store, *tier)
    server.start()
    try:
        before = hydrated_metrics(server, "vm1")
        assert before("appliance_hydrated_pinned_chunks") == before("appliance_hydration_chunks", vm="vm1",
                                                                    state="done")
    finally:
        assert server.stop() == 0
    shutil.move(store / "packs", tmp_path / "packs-away")  # the store cannot answer a single read now
    server = Serve(store, *tier)
    server.start()
    try:
        served = run("nfs-cat", server.url(f"/restore-points/vm1/{point}/vm1-flat.vmdk"))
        assert served.returncode == 0 and served.stdout == image.read_bytes(), served.stderr
        after = scraped(server)
        assert after("appliance_chunk_cache_hits_total", tier="disk") >= before("appliance_hydration_chunks",
                                                                                 vm="vm1", state="done")
        assert after("appliance_chunk_cache_misses_total", tier="disk") == 0
        assert after("appliance_chunk_loads_total") == 0 and after("appliance_chunk_cache_entries", tier="disk") > 0
    finally:
        assert server.stop() == 0


def test_a_backup_job_of_the_service_is_hydrated_when_it_commits(tmp_path: Path, vcsim: Vcsim) -> None:  # noqa: F811
    store = tmp_path / "store"
    run_cli("--store", str(store), "init", "--chunk-size", str(1 << 16), check=True)
    vcsim.make_vm("web", (4 << 20,))
    Disks(vcsim, "web", (4 << 20,)).write(0, 1 << 20, 1 << 20)
    config = config_for(vcsim, tmp_path / "a.toml")
    api = start_api(store, "--config", str(config), "--hydrated-dir", str(tmp_path / "hydrated"))
    try:
        done = cli(api, "backup", "--from-vsphere", "web", "--json")
        assert done.returncode == 0, done.stderr
        point = json.loads(done.stdout)["result"]["point"]
        hydrated_metrics(api.server, "web", timeout=RESCAN_SECONDS / 3)  # not the hydrator's periodic look
        assert "event=hydration.done vm=web point=" + point in api.server.log_text()
    finally:
        api.close()
        assert api.server.stop() == 0
