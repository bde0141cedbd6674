"""Replication between two real appliances on loopback: `serve --api-tls` at one site, the CLI at the other."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.api.tls import trusting
from appliance.demo.guest_image import BOOTED_MARKER, GuestImage, build_guest
from appliance.hypervisor import QemuGuest
from appliance.hypervisor.netns import private_network
from appliance.store import formats
from tests.conftest import run_cli
from tests.test_instant_boot_qemu import BOOT_ARGS, RUNS_UNTIL_STOPPED, VM
from tests.test_nfs_serve import Serve
from tests.test_qemu_boot import BOOT_TIMEOUT, backed_up

pytestmark = pytest.mark.slow

CHUNK = 256 << 10
DISK_CHUNKS = 192  # 48 MiB: random, so every chunk is stored as it is (incompressible)
API = "/api/v1/replication"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_disk(path: Path, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with path.open("wb") as disk:
        for index in range(DISK_CHUNKS):
            disk.write(bytes(CHUNK) if index % 8 == 0 else rng.randbytes(CHUNK))
    return path


def change_chunks(path: Path, indexes: list[int], seed: int) -> None:
    rng = random.Random(seed)
    with path.open("r+b") as disk:
        for index in indexes:
            disk.seek(index * CHUNK)
            disk.write(rng.randbytes(CHUNK))


class Site:
    """A store with `serve --api-tls` running on it, and the bits another site needs to trust it."""

    def __init__(self, root: Path, name: str, portmap: bool = False) -> None:
        self.store = root / name
        run_cli("--store", str(self.store), "init", check=True)
        self.server = Serve(self.store, "--api-tls", portmap=portmap)
        self.server.start()
        self.fingerprint = run_cli("--store", str(self.store), "api-certificate", check=True).stdout.strip()
        self.url = f"https://127.0.0.1:{self.server.api_port}"
        self.token_file = self.store / "api.token"
        self.client = httpx.Client(base_url=self.url + API, timeout=60,
                                   verify=trusting((self.store / "api-tls.crt").read_text()),
                                   headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"})

    def points(self, vm: str = "vm1") -> list[dict[str, object]]:
        answer = self.client.get("/points", params={"vm": vm})
        assert answer.status_code == 200, answer.text
        return list(answer.json())

    def stop(self) -> None:
        self.client.close()
        if self.server.process is not None:
            self.server.stop()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path, "target")
    yield site
    site.stop()


def remote_config(path: Path, store: Path, site: Site, *, fingerprint: str | None = None,
                  token_file: Path | None = None, extra: str = "") -> Path:
    path.write_text(f'[store]\npath = "{store}"\n\n[[remotes]]\nname = "dr"\nurl = "{site.url}"\n'
                    f'token_file = "{token_file or site.token_file}"\n'
                    f'fingerprint = "{fingerprint or site.fingerprint}"\n{extra}')
    return path


def replicate(config: Path, direction: str = "push", *extra: str) -> dict[str, object]:
    result = run_cli("replicate", direction, "--config", str(config), "--remote", "dr", "--json", *extra)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def backup(store: Path, disk: Path) -> str:
    result = run_cli("--store", str(store), "backup", "--vm", "vm1", str(disk), check=True)
    return result.stdout.strip().splitlines()[-1]


def restored(store: Path, point: str, output: Path) -> str:
    run_cli("--store", str(store), "restore", "--vm", "vm1", "--point", point, "--output", str(output), check=True)
    return sha256(output)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    store = tmp_path / "source"
    run_cli("--store", str(store), "init", check=True)
    return store


def test_push_copies_points_exactly_and_a_second_run_sends_nothing(tmp_path: Path, source: Path, target: Site) -> None:
    disk = make_disk(tmp_path / "disk.img")
    first = backup(source, disk)
    config = remote_config(tmp_path / "push.toml", source, target)
    report = replicate(config)
    assert report["points_sent"] == [first]
    assert report["chunks_sent"] == DISK_CHUNKS - DISK_CHUNKS // 8
    assert restored(target.store, first, tmp_path / "at-target.img") == sha256(disk)

    again = replicate(config)
    assert again["points_sent"] == [] and again["chunks_sent"] == 0
    assert again["wire_bytes_sent"] == 0


def test_an_incremental_sends_about_the_changed_bytes(tmp_path: Path, source: Path, target: Site) -> None:
    disk = make_disk(tmp_path / "disk.img")
    backup(source, disk)
    config = remote_config(tmp_path / "push.toml", source, target)
    replicate(config)
    changed = [3, 50, 77, 140]  # 4 of 192 chunks: about 2 %
    change_chunks(disk, changed, seed=9)
    second = backup(source, disk)

    report = replicate(config)
    assert report["points_sent"] == [second]
    assert report["chunks_sent"] == len(changed)
    changed_bytes = len(changed) * CHUNK
    manifest_bytes = DISK_CHUNKS * formats.CHUNK_ID_SIZE + 4096
    assert int(report["wire_bytes_sent"]) <= 1.2 * changed_bytes + manifest_bytes, report
    assert restored(target.store, second, tmp_path / "second.img") == sha256(disk)


def test_small_changes_travel_as_deltas_against_the_targets_chunks(tmp_path: Path, source: Path,
                                                                   target: Site) -> None:
    disk = make_disk(tmp_path / "disk.img")
    backup(source, disk)
    config = remote_config(tmp_path / "push.toml", source, target)
    replicate(config)
    rng = random.Random(11)
    with disk.open("r+b") as image:
        for index in (1, 9, 30, 100, 150):  # one 4 KiB block in each of five chunks
            image.seek(index * CHUNK + 8192)
            image.write(rng.randbytes(4096))
    second = backup(source, disk)

    report = replicate(config)
    assert report["chunks_sent"] == 5
    assert int(report["wire_bytes_sent"]) < 5 * 4096 * 2 + DISK_CHUNKS * formats.CHUNK_ID_SIZE + 8192, report
    assert restored(target.store, second, tmp_path / "second.img") == sha256(disk)


def test_a_delta_that_does_not_decode_to_its_chunk_is_refused(tmp_path: Path, source: Path, target: Site) -> None:
    from appliance.replication.delta import encode_delta

    disk = make_disk(tmp_path / "disk.img")
    backup(source, disk)
    replicate(remote_config(tmp_path / "push.toml", source, target))
    base = disk.read_bytes()[CHUNK : 2 * CHUNK]
    changed = base[:100] + b"x" + base[101:]
    claimed = formats.chunk_id(changed[:-1] + b"y")
    delta = encode_delta(base, changed)
    forged = formats.chunk_id(base) + formats.encode_record(claimed, formats.COMPRESSION_ZSTD, delta, CHUNK)
    answer = target.client.post("/chunks", content=forged)
    assert answer.status_code == 422 and "do not hash to its ID" in answer.json()["message"], answer.text

    unknown_base = bytes(range(32)) + formats.encode_record(formats.chunk_id(changed), formats.COMPRESSION_ZSTD,
                                                            delta, CHUNK)
    answer = target.client.post("/chunks", content=unknown_base)
    assert answer.status_code == 409 and answer.json()["error"] == "ChunksMissing", answer.text


def test_pull_fetches_the_other_sites_points(tmp_path: Path, target: Site) -> None:
    """Here `target` is the site pulled from: it backs up, another store pulls."""
    disk = make_disk(tmp_path / "disk.img", seed=4)
    point = backup(target.store, disk)
    local = tmp_path / "pulling"
    run_cli("--store", str(local), "init", check=True)
    report = replicate(remote_config(tmp_path / "pull.toml", local, target), "pull")
    assert report["points_sent"] == [point]
    assert restored(local, point, tmp_path / "pulled.img") == sha256(disk)


def test_a_killed_run_leaves_nothing_visible_and_the_rerun_completes(tmp_path: Path, source: Path,
                                                                     target: Site) -> None:
    disk = make_disk(tmp_path / "disk.img")
    point = backup(source, disk)
    config = remote_config(tmp_path / "push.toml", source, target, extra="rate_limit_mib = 8\nstreams = 1\n")
    child = subprocess.Popen([sys.executable, "-m", "appliance", "replicate", "push", "--config", str(config),
                              "--remote", "dr"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.5)  # about half of the 42 MiB at 8 MiB/s
    assert child.poll() is None, "the rate-limited push ended too early to be killed mid-transfer"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert target.points() == []

    report = replicate(config, "push", "--rate-limit-mib", "1000")
    assert report["points_sent"] == [point]
    assert 0 < int(report["chunks_sent"]) < DISK_CHUNKS - DISK_CHUNKS // 8, "the rerun sent chunks sent before"
    assert restored(target.store, point, tmp_path / "at-target.img") == sha256(disk)


def test_a_chunk_that_does_not_match_its_id_is_refused(target: Site) -> None:
    data = random.Random(5).randbytes(4096)
    honest = formats.chunk_id(data)
    forged = formats.ZERO_CHUNK_ID + formats.encode_record(honest, formats.COMPRESSION_NONE, data[:-1] + b"\x00",
                                                           len(data))
    answer = target.client.post("/chunks", content=forged)
    assert answer.status_code == 422 and answer.json()["error"] == "ChunkRefused", answer.text
    assert "do not hash to its ID" in answer.json()["message"]
    missing = target.client.post("/missing", content=honest)
    assert missing.content == honest, "a refused chunk was kept"

    garbage = target.client.post("/chunks", content=b"\x01" * 100)
    assert garbage.status_code == 422 and garbage.json()["error"] == "ChunkRefused"


def test_a_point_whose_chunks_are_absent_is_not_committed(tmp_path: Path, source: Path, target: Site) -> None:
    from appliance.replication.local import LocalSource
    from appliance.store.manifests import encode_manifest
    from appliance.store import open_store

    point = backup(source, make_disk(tmp_path / "disk.img"))
    with open_store(source) as store:
        manifest = LocalSource(store).manifest(point)
    answer = target.client.post("/points", content=encode_manifest(manifest))
    assert answer.status_code == 409 and answer.json()["error"] == "ChunksMissing", answer.text
    assert target.points() == []


def test_a_wrong_fingerprint_or_token_is_refused(tmp_path: Path, source: Path, target: Site) -> None:
    backup(source, make_disk(tmp_path / "disk.img"))
    impostor = "sha256:" + ":".join(["ab"] * 32)
    result = run_cli("replicate", "push", "--config",
                     str(remote_config(tmp_path / "fp.toml", source, target, fingerprint=impostor)), "--remote", "dr")
    assert result.returncode != 0
    assert "not the pinned" in result.stderr and "refusing to send it the token" in result.stderr

    wrong = tmp_path / "wrong.token"
    wrong.write_text("x" * 40 + "\n")
    wrong.chmod(0o600)
    result = run_cli("replicate", "push", "--config",
                     str(remote_config(tmp_path / "tok.toml", source, target, token_file=wrong)), "--remote", "dr")
    assert result.returncode != 0 and "bearer token" in result.stderr, result.stderr
    assert target.points() == []


def test_stores_with_other_chunk_sizes_are_refused(tmp_path: Path, target: Site) -> None:
    other = tmp_path / "other"
    run_cli("--store", str(other), "init", "--chunk-size", str(1 << 20), check=True)
    result = run_cli("replicate", "push", "--config", str(remote_config(tmp_path / "c.toml", other, target)),
                     "--remote", "dr")
    assert result.returncode != 0 and "same --chunk-size" in result.stderr, result.stderr


def test_the_targets_own_retention_is_not_undone(tmp_path: Path, source: Path, target: Site) -> None:
    disk = make_disk(tmp_path / "disk.img")
    first = backup(source, disk)
    config = remote_config(tmp_path / "push.toml", source, target)
    replicate(config)
    change_chunks(disk, [10], seed=2)
    second = backup(source, disk)
    replicate(config)
    assert [point["id"] for point in target.points()] == [first, second]
    target.server.stop()
    run_cli("--store", str(target.store), "prune", "--vm", "vm1", "--keep-last", "1", check=True)
    target.server.start()

    report = replicate(config)
    assert report["points_sent"] == [] and report["points_skipped"] == 2
    assert [point["id"] for point in target.points()] == [second]


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return build_guest()


def test_the_target_boots_a_replicated_point_with_the_source_gone(tmp_path: Path, guest_image: GuestImage) -> None:
    """Failover: the source store is deleted after the push; QEMU boots the guest from the target's copy."""
    disk = guest_image.copy_disk(tmp_path / "guest.img", RUNS_UNTIL_STOPPED)
    source = backed_up(tmp_path, disk, (VM,))
    with private_network():
        site = Site(tmp_path, "target", portmap=True)
        try:
            report = replicate(remote_config(tmp_path / "push.toml", source, site))
            assert len(report["points_sent"]) == 1
            shutil.rmtree(source)
            booted = run_cli("--store", str(site.store), "instant-boot", "--vm", VM, "--session", "dr1", *BOOT_ARGS,
                             "--verify", f"console:{BOOTED_MARKER}", "--timeout", "120", timeout=BOOT_TIMEOUT)
            assert booted.returncode == 0, booted.stderr
            job = json.loads(booted.stdout)
            assert job["state"] == "succeeded", job
            stopped = run_cli("--store", str(site.store), "stop", "dr1", "--json")
            assert stopped.returncode == 0, stopped.stderr
        finally:
            for run_dir in (site.store / "guests").glob("*"):
                with contextlib.suppress(Exception):
                    QemuGuest.load(run_dir).power_off(timeout=1)
            site.stop()


def test_serve_runs_scheduled_and_on_demand_jobs_with_metrics(tmp_path: Path, source: Path, target: Site) -> None:
    """The source site serves too: its remote's schedule starts a push at once.

    `replicate` without --config then asks that server for another push, as a job.
    """
    disk = make_disk(tmp_path / "disk.img")
    first = backup(source, disk)
    config = remote_config(tmp_path / "serve.toml", source, target, extra='every_hours = 24\nvms = ["vm1"]\n')
    server = Serve(source, "--config", str(config))
    server.start()
    try:
        deadline = time.monotonic() + 60
        while [point["id"] for point in target.points()] != [first]:
            assert time.monotonic() < deadline, f"the scheduled push did not run: {server.log_text()}"
            time.sleep(0.5)
        change_chunks(disk, [20, 21], seed=3)
        second = backup(source, disk)
        result = run_cli("--store", str(source), "replicate", "push", "--remote", "dr", "--json")
        assert result.returncode == 0, result.stderr
        job = json.loads(result.stdout)
        assert job["kind"] == "replicate" and job["state"] == "succeeded", job
        assert job["result"]["points_sent"] == [second] and job["result"]["chunks_sent"] == 2
        busy = run_cli("--store", str(source), "replicate", "push", "--remote", "nowhere")
        assert busy.returncode != 0 and "no remote named 'nowhere'" in busy.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as answer:
            exposition = answer.read().decode()
        assert 'appliance_replication_points_total{direction="push",remote="dr"} 2.0' in exposition
        assert 'appliance_replication_last_success_timestamp_seconds{direction="push",remote="dr"}' in exposition
        assert 'appliance_jobs{kind="replicate",state="succeeded"} 2.0' in exposition
    finally:
        server.stop()


def test_remove_vanished_deletes_what_the_source_pruned_but_not_what_a_session_holds(
        tmp_path: Path, source: Path, target: Site) -> None:
    disk = make_disk(tmp_path / "disk.img")
    first = backup(source, disk)
    change_chunks(disk, [10], seed=2)
    second = backup(source, disk)
    change_chunks(disk, [11], seed=3)
    third = backup(source, disk)
    config = remote_config(tmp_path / "push.toml", source, target)
    replicate(config)
    run_cli("--store", str(target.store), "session", "create", "--vm", "vm1", "--point", first, "--name", "held",
            check=True)
    run_cli("--store", str(source), "prune", "--vm", "vm1", "--keep-last", "1", check=True)

    kept = replicate(config)
    assert kept["points_removed"] == [] and len(target.points()) == 3, "removed without --remove-vanished"
    report = replicate(config, "push", "--remove-vanished")
    assert report["points_removed"] == [second]
    assert [point["id"] for point in target.points()] == [first, third]
