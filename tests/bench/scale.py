#!/usr/bin/env python3
"""Scale benchmark: `serve` over a catalog of 1 TiB of logical restore points.

What is measured, and why:

* The catalog (`tests/bench/scale_catalog.py`): 40 VMs x 25 daily points of a ~1 GiB
  disk by default (1 TiB logical; 4.2M chunk-map entries), mostly zero and deduplicated
  chunks, committed through the real ingest. Its build is timed, then `appliance
  verify` checks the whole store (every pack, index entry and map entry) and `appliance
  stats` reports its size: what is measured is a valid store.
* First serve: the namespace knows none of the points yet. `nfs-ls -R /restore-points`
  makes every point's folder and files (the mirror); the background file indexer then
  visits every point. Timed, and `serve`'s RSS after both.
* Each run (``--runs``) then starts `serve` on the page cache dropped (cold) and
  measures: start to NFS ready (MNT + LOOKUP answered, our own ONC RPC client of
  `tests/bench/stable_writes.py`); RSS (VmRSS of /proc/PID/status) after start, after
  `nfs-ls` of every VM's folder, after `nfs-ls -R` of the whole tree and after READs of
  ``--read-mib`` of the newest disk of ``--read-disks`` VMs, whose bytes must be the
  synthesized disks'; the latency of `appliance points` (all, one VM) and `appliance
  stats` (CLI, wall clock of the process) and of the API's `GET points`, `GET vms`,
  `GET vms/{vm}/points` and the store figures of `GET /metrics` (first scrape: the scan;
  then reused), medians of ``--calls``. Last, a restart: SIGTERM, then a new `serve`,
  until a READ through a handle taken before the restart answers the same bytes (warm
  page cache); every handle taken before, directories too, must still work after.

Targets (from issue #18): serve RSS < 300 MiB (the largest of every RSS figure), restart
to serving NFS with the same handles < 5 s. Latencies have no target there.
Output: one JSON line on stdout (medians over ``--runs``, plus each run); logs on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.bench.fuse import appliance, must_drop_page_cache
from tests.bench.ingest import add_run_arguments, log, medians, run, stop_child, work_directory
from tests.bench.nfs import HOST, free_port, url
from tests.bench.scale_catalog import Shape, SyntheticDisk, build_catalog, vm_name
from tests.bench.stable_writes import CallFailed, RpcConnection, file_handle, lookup, read

START_TIMEOUT = 120.0
INDEX_TIMEOUT = 1800.0
READ_PIECE = 1 << 20
RSS_TARGET_MIB = 300
RESTART_TARGET_SECONDS = 5.0


class Serve:
    """One `appliance serve` child, on its own ports, without the portmapper (other benches may hold 111)."""

    def __init__(self, store: Path, logs: Path) -> None:
        self.store = store
        self.logs = logs
        self.ports = (free_port(), free_port())
        self.api_port, self.metrics_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = logs / "serve-0.log"

    def launch(self) -> float:
        """Start the process (on the same ports every time); when it started."""
        self.log_path = self.logs / f"serve-{len(list(self.logs.iterdir()))}.log"
        cmd = appliance(self.store, "serve", "--nfs-port", str(self.ports[0]), "--mount-port", str(self.ports[1]),
                        "--bind", HOST, "--no-portmap", "--api-port", str(self.api_port),
                        "--metrics-port", str(self.metrics_port))
        started = time.perf_counter()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        return started

    def start(self) -> float:
        """Start it; seconds until NFS answers (MNT and a LOOKUP)."""
        started = self.launch()
        self.until(lambda: bool(self.handle("restore-points")), started)
        return time.perf_counter() - started

    def until(self, answered: Callable[[], bool], started: float) -> None:
        """Poll `answered` (connection refusals and failed calls count as not yet) until it is True."""
        while True:
            try:
                if answered():
                    return
            except (OSError, CallFailed):
                pass
            assert self.proc is not None
            if self.proc.poll() is not None or time.perf_counter() - started > START_TIMEOUT:
                sys.stderr.write(self.log_path.read_text(errors="replace")[-4000:])
                raise SystemExit(f"bench: serve did not answer (exit code {self.proc.poll()})")
            time.sleep(0.02)

    def handle(self, path: str) -> bytes:
        return file_handle(HOST, self.ports[0], self.ports[1], "/", path)

    def stop(self) -> None:
        assert self.proc is not None
        rc = stop_child("serve", self.proc)
        if rc != 0:
            sys.stderr.write(self.log_path.read_text(errors="replace")[-4000:])
            raise SystemExit(f"bench: serve exited with {rc}")

    def status(self, field: str) -> float:
        """A memory figure of /proc/PID/status, in MiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
        raise SystemExit(f"bench: no {field} in /proc/{self.proc.pid}/status")

    def memory(self, stage: str) -> dict[str, float]:
        """RSS at a stage, and its anonymous part (the process's own memory: the rest is mapped
        files, mostly the LMDB index's pages, which the kernel may take back at any time)."""
        return {f"rss_{stage}_mib": self.status("VmRSS"), f"anon_{stage}_mib": self.status("RssAnon")}

    def events(self, name: str) -> int:
        return self.log_path.read_text(errors="replace").count(f"event={name} ")

    def seconds_between(self, first: str, last: str) -> float:
        """Seconds from the first event `first` to the last event `last` in the log (its own timestamps)."""
        stamps: dict[str, list[float]] = {first: [], last: []}
        for line in self.log_path.read_text(errors="replace").splitlines():
            for name, found in stamps.items():
                if f" event={name} " in line:
                    day, clock = line.split()[:2]
                    found.append(time.mktime(time.strptime(f"{day} {clock[:8]}", "%Y-%m-%d %H:%M:%S"))
                                 + int(clock[9:12]) / 1000)
        return round(stamps[last][-1] - stamps[first][0], 2)

    def api(self, path: str) -> bytes:
        token = (self.store / "api.token").read_text().strip()
        request = urllib.request.Request(f"http://{HOST}:{self.api_port}{path}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return bytes(response.read())

    def metrics(self) -> bytes:
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=120) as response:
            return bytes(response.read())


def cache_bytes(exposition: bytes) -> float:
    for line in exposition.decode().splitlines():
        if line.startswith("appliance_chunk_cache_bytes "):
            return float(line.split()[1])
    raise SystemExit("bench: /metrics has no appliance_chunk_cache_bytes")


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def median_of(calls: int, call: Callable[[], object]) -> float:
    return round(statistics.median(timed(call) for _ in range(calls)), 4)


def nfs_ls(serve: Serve, path: str, recursive: bool = False) -> None:
    run(["nfs-ls", *(["-R"] if recursive else []), url(path, serve.ports)])


def read_disk(connection: RpcConnection, handle: bytes, length: int) -> bytes:
    return b"".join(read(connection, handle, offset, READ_PIECE) for offset in range(0, length, READ_PIECE))


def flat_paths(newest: dict[str, tuple[str, SyntheticDisk]], count: int) -> list[tuple[str, SyntheticDisk]]:
    """The newest flat extents of `count` VMs spread over the catalog."""
    vms = sorted(newest)
    step = max(1, len(vms) // count)
    return [(f"restore-points/{vm}/{newest[vm][0]}/{vm}-flat.vmdk", newest[vm][1]) for vm in vms[::step][:count]]


def first_serve(store: Path, logs: Path, points: int) -> dict[str, float]:
    """The first start after the build: the mirror makes every point's folder, the indexer visits every point."""
    serve = Serve(store, logs)
    fig = {"first_start_s": round(serve.start(), 3)}
    fig["first_list_all_s"] = round(timed(lambda: nfs_ls(serve, "/restore-points", recursive=True)), 3)
    started = time.perf_counter()
    while serve.events("files.indexed") + serve.events("files.index_failed") < points:
        if time.perf_counter() - started > INDEX_TIMEOUT or "event=files.index_off" in serve.log_path.read_text():
            raise SystemExit(f"bench: the indexer did not visit all {points} points")
        time.sleep(0.5)
    fig["first_index_all_s"] = serve.seconds_between("nfs.serving", "files.indexed")
    fig.update(serve.memory("first"), first_rss_peak_mib=serve.status("VmHWM"))
    serve.stop()
    log(f"first serve: {fig}")
    return fig


def measure(store: Path, logs: Path, newest: dict[str, tuple[str, SyntheticDisk]],
            args: argparse.Namespace) -> dict[str, float]:
    serve = Serve(store, logs)
    must_drop_page_cache()
    fig = {"start_cold_s": round(serve.start(), 3)}
    serve.until(lambda: bool(serve.api("/api/v1/status")), time.perf_counter())
    fig.update(serve.memory("start"))
    fig["list_vms_s"] = round(timed(lambda: [nfs_ls(serve, f"/restore-points/{vm}") for vm in sorted(newest)]), 3)
    fig.update(serve.memory("listed_vms"))
    fig["list_all_s"] = round(timed(lambda: nfs_ls(serve, "/restore-points", recursive=True)), 3)
    fig.update(serve.memory("listed_all"))

    disks = flat_paths(newest, args.read_disks)
    handles = {path: serve.handle(path) for path, _ in disks}
    length = args.read_mib << 20
    connection = RpcConnection(HOST, serve.ports[0])
    try:
        before = {path: read_disk(connection, handles[path], length) for path, _ in disks}
    finally:
        connection.close()
    for path, disk in disks:
        if before[path] != disk.read(0, length):
            raise SystemExit(f"bench: {path} served other bytes than the synthesized disk")
    fig.update(serve.memory("read"))

    vm = vm_name(0)
    cli = {"points": ["points"], "points_vm": ["points", "--vm", vm], "stats": ["stats"]}
    for name, words in cli.items():
        fig[f"cli_{name}_s"] = median_of(args.calls, lambda: run(appliance(store, *words), cwd=REPO))
    fig["cli_help_s"] = median_of(args.calls, lambda: run(appliance(store, "--help"), cwd=REPO))
    api = {"points": "/api/v1/points", "vms": "/api/v1/vms", "points_vm": f"/api/v1/vms/{vm}/points"}
    for name, path in api.items():
        fig[f"api_{name}_s"] = median_of(args.calls, lambda: serve.api(path))
    fig["api_metrics_first_s"] = round(timed(serve.metrics), 4)
    fig["api_metrics_s"] = median_of(args.calls, serve.metrics)
    fig.update(serve.memory("calls"))
    fig["rss_peak_mib"] = serve.status("VmHWM")
    fig["chunk_cache_mib"] = round(cache_bytes(serve.metrics()) / (1 << 20), 1)

    point_dir, name = disks[0][0].rsplit("/", 1)
    directory = serve.handle(point_dir)
    fig["stop_s"] = round(timed(serve.stop), 3)
    restarted = restart(serve, handles[disks[0][0]], before[disks[0][0]][:READ_PIECE])
    fig["restart_start_s"] = round(restarted, 3)
    fig["restart_s"] = round(fig["stop_s"] + restarted, 3)
    connection = RpcConnection(HOST, serve.ports[0])
    try:
        for path, _ in disks:
            if read_disk(connection, handles[path], length) != before[path]:
                raise SystemExit(f"bench: after the restart, the handle of {path} reads other bytes")
        if lookup(connection, directory, name) != handles[disks[0][0]]:
            raise SystemExit("bench: after the restart, LOOKUP in a folder's old handle gives another handle")
    finally:
        connection.close()
    fig.update(serve.memory("restarted"))
    serve.stop()
    fig["rss_max_mib"] = max(value for key, value in fig.items() if key.startswith("rss_"))
    log(f"run: {fig}")
    return fig


def restart(serve: Serve, handle: bytes, expected: bytes) -> float:
    """Start `serve` again; seconds until a READ through `handle`, taken before, answers `expected`."""
    connection: RpcConnection | None = None

    def answers_as_before() -> bool:
        nonlocal connection
        connection = connection or RpcConnection(HOST, serve.ports[0])
        try:
            return read(connection, handle, 0, len(expected)) == expected
        except (OSError, CallFailed):
            connection.close()
            connection = None
            raise

    started = serve.launch()
    try:
        serve.until(answers_as_before, started)
    finally:
        if connection is not None:
            connection.close()
    return time.perf_counter() - started


def build(store: Path, shape: Shape) -> tuple[dict[str, Any], dict[str, tuple[str, SyntheticDisk]]]:
    log(f"building {shape.vms} VMs x {shape.points} points of {shape.disk_bytes} bytes")
    started = time.perf_counter()
    newest = build_catalog(store, shape)
    fig: dict[str, Any] = {"build_s": round(time.perf_counter() - started, 1)}
    log(f"built in {fig['build_s']} s; verifying")
    fig["verify_s"] = round(timed(lambda: run(appliance(store, "verify"), cwd=REPO)), 1)
    stats = json.loads(run(appliance(store, "stats", "--json"), cwd=REPO))
    fig.update({f"store_{key}": stats[key] for key in ("points", "logical_bytes", "stored_bytes", "chunks", "packs")})
    fig["index_bytes"] = (store / "index" / "data.mdb").stat().st_size
    if stats["points"] != shape.vms * shape.points:
        raise SystemExit(f"bench: the store holds {stats['points']} points, not {shape.vms * shape.points}")
    log(f"store: {fig}")
    return fig, newest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Shape()
    parser.add_argument("--vms", type=int, default=defaults.vms)
    parser.add_argument("--points", type=int, default=defaults.points, help="restore points per VM")
    parser.add_argument("--logical-tib", type=float, default=defaults.logical_tib,
                        help="logical bytes of every point together (sets each disk's size)")
    parser.add_argument("--read-disks", type=int, default=8, help="disks read over NFS before the restart")
    parser.add_argument("--read-mib", type=int, default=4, help="MiB read from the start of each")
    parser.add_argument("--calls", type=int, default=5, help="calls per CLI/API latency figure (median)")
    add_run_arguments(parser, runs=3, kept="store, logs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it drops the kernel page cache")
    if shutil.which("nfs-ls") is None:
        parser.error("nfs-ls (libnfs-utils) is not installed")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shape = Shape(vms=args.vms, points=args.points, logical_tib=args.logical_tib)
    work = work_directory(parser, args.work, "scale-bench-")
    logs = work / "logs"
    logs.mkdir()
    try:
        result: dict[str, Any] = {"bench": "scale", "vms": shape.vms, "points_per_vm": shape.points,
                                  "disk_bytes": shape.disk_bytes, "runs": args.runs}
        built, newest = build(work / "store", shape)
        result.update(built)
        result.update(first_serve(work / "store", logs, shape.vms * shape.points))
        runs = [measure(work / "store", logs, newest, args) for _ in range(args.runs)]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result.update(medians(runs, 4))
    met = {f"rss_under_{RSS_TARGET_MIB}MiB": max(result["rss_max_mib"], result["first_rss_peak_mib"]) < RSS_TARGET_MIB,
           f"restart_under_{RESTART_TARGET_SECONDS:g}s": result["restart_s"] < RESTART_TARGET_SECONDS}
    result.update(targets_met=met, all_targets_met=all(met.values()), per_run=runs if args.runs > 1 else [])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
