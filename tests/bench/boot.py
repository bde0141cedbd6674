#!/usr/bin/env python3
"""Boot benchmark: a guest booted from a local raw file against an instant boot from the store.

What is measured, and why:

* The guest: the demo's and the QEMU tests' guest (``appliance/demo/guest_image.py``: an MBR disk that boots
  by itself, syslinux loading Debian's kernel and a busybox initramfs from a FAT
  partition, then an ext4 root partition), built with ``--payload-mib`` of real files
  of this machine on its root that it reads before printing its boot marker: a real OS
  reads its binaries and libraries (a few hundred MB) while it boots, and without them
  the disk would be a negligible part of the boot. Both sides boot from the disk's own
  bootloader, as a hypervisor boots a VM (and as ``instant-boot --qemu`` does), so the
  firmware's reads of the kernel and initramfs count too. The disk is backed up once
  into our store; the local boot uses a fresh copy of the same disk.
  Same QEMU settings for both (``appliance.hypervisor.boot_guest``, accelerator chosen
  once before timing, ``--accel``: auto probes, and falls back to TCG as a boot does),
  same memory, one vCPU; ``accel`` in the output names what the guests really ran under.
* local: ``boot_guest`` on the raw file -> the guest's boot marker on the serial console.
* instant: what an instant boot does from the moment it is asked: ``session create``
  of the point (a CLI process), then ``boot_guest`` on the session's flat extent over
  ``nfs://`` from a running ``appliance serve`` (QEMU's libnfs driver, through the
  portmapper) -> the same marker. ``nfs_boot`` is the boot part alone.
* Cold, both: the kernel page cache is dropped before each boot and serve is a fresh
  process per run (empty chunk cache), so the instant boot reads packs from disk, as
  the first boot after a failure does. Local and instant boots alternate within a run.
* The bytes and read requests the guest issued to its disk until the marker (QMP
  ``query-blockstats``) are reported for both: they say how much of the boot was disk
  I/O at all, and ``nfs_extra_ms_per_read`` = (nfs_boot - local_boot) / nfs_read_ops
  is what each read cost over NFS beyond a local read: the guest reads mostly one
  request at a time, so that latency, not bandwidth, decides the ratio. ``*_qemu_cpu_s`` is
  the CPU time the guest's QEMU used until the marker (under TCG, the guest's own work).
* serve and QEMU run in a private network namespace (``appliance/hypervisor/netns.py``) where serve
  answers as the portmapper on port 111, so no other NFS server on the machine can
  take QEMU's requests.

* ``--hydrated`` adds a third boot per run: the same instant boot from a fresh ``serve`` whose
  hydrated tier (``--hydrated-dir``) already holds the point's decompressed chunks. The tier is
  filled once before the runs by a ``serve`` that hydrates the newest point in the background
  (waited for through its ``appliance_hydration_chunks`` metric) and is then stopped, so every
  hydrated boot also shows the tier surviving a restart warm. The page cache is dropped before
  it as before the others, so the guest's reads come from the tier's file on disk.

Targets (from the issues): instant boot <= 1.3x the local boot time; hydrated <= 1.15x.
Output: one JSON line on stdout (medians over ``--runs``, plus each run); logs on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from appliance.hypervisor import boot_guest, session_disk_url
from appliance.hypervisor.accel import ACCELERATORS, choose_accelerator
from tests.bench.fuse import VM, appliance, backup_image, must_drop_page_cache
from tests.bench.ingest import add_run_arguments, log, medians, run, stage_files, work_directory
from tests.bench.nfs import free_port, listening, server, url
from appliance.demo.guest_image import BOOTED_MARKER, build_guest
from appliance.hypervisor.netns import private_network

HOST = "127.0.0.1"
PORTMAP_PORT = 111
MEMORY_MIB = 256
BOOT_TIMEOUT = 300.0
TARGET_RATIO = 1.3
TARGET_HYDRATED_RATIO = 1.15
GUEST_SECONDS = 600  # the guest keeps running after its marker until the bench powers it off


def boot_seconds(run_dir: Path, disk: str, accel: str, used: set[str]) -> tuple[float, int, int, float]:
    """Seconds from boot_guest to the boot marker; the bytes and requests the guest read from its disk by then,
    and the CPU time its QEMU used (under TCG the guest's own work, which competes with the server's).

    The accelerator the guest ran under is added to `used`.
    """
    started = time.perf_counter()
    guest = boot_guest(run_dir, [disk], MEMORY_MIB, accel=accel, timeout=BOOT_TIMEOUT)
    used.add(guest.record.accel)
    try:
        guest.wait_for_console(BOOTED_MARKER, BOOT_TIMEOUT)
        seconds = time.perf_counter() - started
        cpu = process_cpu_seconds(guest.record.pid)
        with guest.qmp() as qmp:
            stats = [device["stats"] for device in qmp.execute("query-blockstats")]
    finally:
        guest.power_off(timeout=0)
    return seconds, sum(s["rd_bytes"] for s in stats), sum(s["rd_operations"] for s in stats), cpu


@contextlib.contextmanager
def serving(work: Path, store: Path, *extra: str) -> Iterator[int]:
    """A fresh `appliance serve` answering as the portmapper; yields its metrics port."""
    ports, metrics_port = (free_port(), free_port()), free_port()
    command = appliance(store, "serve", "--nfs-port", str(ports[0]), "--mount-port", str(ports[1]),
                        "--metrics-port", str(metrics_port), "--bind", HOST, *extra)
    with server("ours", command, url("/", ports), work / "logs", cwd=REPO):
        while not listening(PORTMAP_PORT):
            time.sleep(0.02)
        yield metrics_port


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_cpu_seconds(metrics_port: int) -> float:
    """CPU time of the serve process listening for metrics on `metrics_port`."""
    return process_cpu_seconds(int(run(["pgrep", "-o", "-f", f"serve .*--metrics-port {metrics_port} "]).split()[0]))


def metric_samples(metrics_port: int, family: str) -> list[Sample]:
    """The samples of the metric family `family` that serve exposes now."""
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return [sample for found in text_string_to_metric_families(text) if found.name == family
            for sample in found.samples]


def hydration_left(metrics_port: int) -> tuple[float, float]:
    """(done, pending) chunks of the hydrated point, from serve's metrics."""
    figures = {"done": 0.0, "pending": 0.0}
    for sample in metric_samples(metrics_port, "appliance_hydration_chunks"):
        figures[sample.labels["state"]] += sample.value
    return figures["done"], figures["pending"]


def hydrate(work: Path, store: Path, tier: tuple[str, ...]) -> float:
    """Fill the hydrated tier with the newest point by running serve until it is done; its seconds."""
    started = time.perf_counter()
    with serving(work, store, *tier) as metrics_port:
        while (left := hydration_left(metrics_port))[0] == 0 or left[1] > 0:
            time.sleep(0.2)
    log(f"hydrated {left[0]:.0f} chunks in {time.perf_counter() - started:.1f}s")
    return time.perf_counter() - started


def instant_boot(work: Path, name: str, store: Path, accel: str, used: set[str], query: str,
                 *extra: str) -> dict[str, float]:
    """Session create + boot over NFS from a fresh serve (with `extra` flags), page cache dropped first."""
    fig: dict[str, float] = {}
    with serving(work, store, *extra) as metrics_port:
        must_drop_page_cache()
        cpu = serve_cpu_seconds(metrics_port)
        started = time.perf_counter()
        run(appliance(store, "session", "create", "--vm", VM, "--point", "latest", "--name", name), cwd=REPO)
        fig["session_create_s"] = time.perf_counter() - started
        fig["nfs_boot_s"], fig["nfs_read_bytes"], fig["nfs_read_ops"], fig["nfs_qemu_cpu_s"] = boot_seconds(
            work / f"nfs-{name}", session_disk_url(HOST, name, VM) + (f"?{query}" if query else ""), accel, used)
        fig["serve_cpu_s"] = serve_cpu_seconds(metrics_port) - cpu
    fig["instant_boot_s"] = fig["session_create_s"] + fig["nfs_boot_s"]
    log(f"instant{' ' + ' '.join(extra[:1]) if extra else ''}: session in {fig['session_create_s']:.2f}s, "
        f"marker {fig['nfs_boot_s']:.2f}s later ({fig['nfs_read_bytes'] / 1e6:.1f} MB read over NFS in "
        f"{fig['nfs_read_ops']} requests; serve used {fig['serve_cpu_s']:.2f}s of CPU)")
    return fig


def measure(work: Path, number: int, disk: Path, store: Path, accel: str, used: set[str],
            tier: tuple[str, ...], query: str) -> dict[str, float]:
    """One local boot of a copy of `disk`, then one instant boot from a fresh serve process and a fresh session,
    then (with a `tier`) one more from a fresh serve over the hydrated tier."""
    fig: dict[str, float] = {}
    local = work / "local.img"
    shutil.copyfile(disk, local)
    must_drop_page_cache()
    fig["local_boot_s"], fig["local_read_bytes"], fig["local_read_ops"], fig["local_qemu_cpu_s"] = boot_seconds(
        work / f"local-{number}", str(local), accel, used)
    log(f"local: marker after {fig['local_boot_s']:.2f}s ({fig['local_read_bytes'] / 1e6:.1f} MB read "
        f"in {fig['local_read_ops']} requests)")
    fig.update(instant_boot(work, f"boot{number}", store, accel, used, query))
    if tier:
        hydrated = instant_boot(work, f"hydrated{number}", store, accel, used, query, *tier)
        fig.update({f"hydrated_{key}": value for key, value in hydrated.items()})
    local.unlink()
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, runs=5, kept="store, consoles, logs")
    parser.add_argument("--payload-mib", type=int, default=256, help="real files the guest reads while it boots")
    parser.add_argument("--accel", choices=ACCELERATORS, default="auto", help="QEMU accelerator (default auto)")
    parser.add_argument("--hydrated", action="store_true", help="also boot from a hydrated tier (see above)")
    parser.add_argument("--nfs-query", default="", metavar="OPTIONS",
                        help="options of QEMU's nfs:// driver for the instant boots, e.g. readahead-size=1048576")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it drops the kernel page cache and enters a network namespace")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop serve and QEMU
    work = work_directory(parser, args.work, "boot-bench-")
    try:
        disk = build_guest(payload_mib=args.payload_mib, stage_payload=stage_files).copy_disk(
            work / "guest.img", GUEST_SECONDS)
        disk_bytes = disk.stat().st_size
        (work / "logs").mkdir()
        store = work / "store"
        backup_image(store, disk)
        log(f"accelerator: {choose_accelerator(args.accel)} (asked for {args.accel})")  # probed before timing
        runs: list[dict[str, float]] = []
        used: set[str] = set()
        tier = ("--hydrated-dir", str(work / "hydrated"), "--hydrated-gib", "4") if args.hydrated else ()
        with private_network():
            hydrate_s = hydrate(work, store, tier) if tier else None
            for number in range(args.runs):
                log(f"run {number + 1} of {args.runs}")
                runs.append(measure(work, number, disk, store, args.accel, used, tier, args.nfs_query))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = medians(runs, 3)
    ratio = round(figures["instant_boot_s"] / figures["local_boot_s"], 3)
    result: dict[str, Any] = {
        "bench": "boot", "runs": args.runs, "accel": ",".join(sorted(used)), "memory_mib": MEMORY_MIB,
        "payload_mib": args.payload_mib, "nfs_query": args.nfs_query, "disk_bytes": disk_bytes,
        "boot": "disk bootloader", **figures,
        "nfs_extra_ms_per_read": round(1000 * (figures["nfs_boot_s"] - figures["local_boot_s"])
                                       / max(figures["nfs_read_ops"], 1), 3),
        "ratio_instant_boot": ratio, "ratio_nfs_boot": round(figures["nfs_boot_s"] / figures["local_boot_s"], 3),
        "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO,
        **(_hydrated_figures(figures, hydrate_s) if hydrate_s is not None else {}),
        "per_run": runs if args.runs > 1 else [],
    }
    print(json.dumps(result))
    return 0


def _hydrated_figures(figures: dict[str, Any], hydrate_s: float) -> dict[str, Any]:
    ratio = round(figures["hydrated_instant_boot_s"] / figures["local_boot_s"], 3)
    return {"hydrate_s": round(hydrate_s, 2), "ratio_hydrated_boot": ratio,
            "ratio_hydrated_nfs_boot": round(figures["hydrated_nfs_boot_s"] / figures["local_boot_s"], 3),
            "hydrated_extra_ms_per_read": round(1000 * (figures["hydrated_nfs_boot_s"] - figures["local_boot_s"])
                                                / max(figures["hydrated_nfs_read_ops"], 1), 3),
            "target_hydrated_ratio": TARGET_HYDRATED_RATIO, "target_hydrated_met": ratio <= TARGET_HYDRATED_RATIO}


if __name__ == "__main__":
    sys.exit(main())
