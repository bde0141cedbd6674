#!/usr/bin/env python3
"""Boot-storm benchmark: guests booting at once from sessions of three VMs' newest points, against nfs-ganesha.

What is measured, and why:

* The VMs: three of one template, as a datastore holds them. The guest of ``tests/bench/boot.py``
  (``appliance/demo/guest_image.py``: it boots from its own bootloader and reads ``--payload-mib``
  of real files before printing its boot marker) is built once; each VM's disk is a copy with
  UNIQUE_MIB of its own random bytes written into its root file system (``debugfs -w``, a file
  the guest reads too), so the three share most chunks and differ in a few. Each is backed up as
  its own VM into a local store and into an S3 store (packs in SeaweedFS, ``tests/seaweed.py``,
  started here on loopback and stopped at the end), and its files indexed (``files index``, what
  a serving appliance does after a backup); not timed. The appliance's modules are byte-compiled
  once, as an installed package's are.
* A storm: ``--guests`` guests (two per VM at six) released together by a barrier; guest i boots
  VM i mod 3. Its time (``storm_s``, which the targets apply to) is from the release to the last
  guest's boot marker; ``boots_s`` is from the first ``boot_guest`` call to the last marker (for
  ours, after the first session was made); each guest's own time (release to its marker) is
  reported as median and max. Ours: every guest first makes its own
  session of its VM's newest point (``session create``, a CLI process, through the serving
  appliance's API, as an instant boot does), then boots the session's flat extent over
  ``nfs://``; the session's time counts. ganesha: ``--guests`` raw copies of the VM disks (two
  per VM at six), fresh for every storm so no storm sees another's writes, exported by
  nfs-ganesha (VFS FSAL), each guest booting its own copy. Every guest reports its disk reads
  (QMP ``query-blockstats``) at its marker and is then powered off.
* Variants, each storm from a fresh server process, released once the server has settled (its
  API up, its CPU use below a tenth of a core, as on an appliance that ran before the storm) and
  the page cache is dropped (the store, the S3 engine's volume files and ganesha's copies are
  read from disk):
  ganesha; ours on the local store; ours on the S3 store (SeaweedFS restarted before the storm,
  so its caches are cold too); ours on the S3 store with the hydrated tier (``--hydrated-dir``)
  holding the three points, filled once before the runs by a ``serve`` that hydrates each VM's
  newest point (``tests/bench/boot.py``'s ``hydrate``) and reopened warm by every storm's serve.
  In each run the variants go one after the other in that order, rotated by one per run.
* Bounds: ``cpu_busy`` is the share of the machine's CPU time (all cores, /proc/stat) not idle
  during the storm; of it, ``qemu_cpu_s`` the guests' QEMUs used, ``server_cpu_s`` serve or
  ganesha, ``engine_cpu_s`` SeaweedFS, ``commands_cpu_s`` the session commands, and ``other_cpu_s``
  the rest (the kernel, and other work on this shared machine). With several TCG guests on two cores the storm
  is CPU-bound: what the servers spend is taken from the guests. ``store_loads`` counts the chunks
  serve read from the store (packs or S3) rather than from memory or the hydrated tier.
* Namespaces: everything runs in a private network namespace (``appliance/hypervisor/netns.py``),
  where QEMU's ``nfs://`` driver asks the portmapper on port 111: our serve answers as the
  portmapper itself; for ganesha an rpcbind is started there, and ganesha and rpcbind run in a
  private mount namespace whose /run is a tmpfs, so rpcbind's /run/rpcbind.sock (through which
  ganesha registers) is not the machine's. The two servers' storms run one after the other.

Targets (issue #18): the whole storm hydrated <= 1.2x ganesha's; on the S3 store not hydrated
<= 2x. The local store's ratio is reported without a target.
Output: one JSON line on stdout (medians over ``--runs``, plus each run); logs on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from appliance.api.access import read_runtime
from appliance.demo.guest_image import ROOT_OFFSET, build_guest
from appliance.hypervisor import session_disk_url
from appliance.hypervisor.accel import ACCELERATORS, choose_accelerator
from appliance.hypervisor.netns import private_network
from tests.bench.boot import (
    GUEST_SECONDS,
    HOST,
    MEMORY_MIB,
    boot_seconds,
    hydrate,
    metric_samples,
    process_cpu_seconds,
    serving,
)
from tests.bench.fuse import PYTHON, appliance, must_drop_page_cache
from tests.bench.ingest import add_run_arguments, log, medians, run, stage_files, work_directory
from tests.bench.nfs import GANESHA_CONF, free_port, portmapper, server, url
from tests.s3_engines import BUCKET
from tests.seaweed import SeaweedS3

VMS = 3
UNIQUE_MIB = 4
VARIANTS = ("ganesha", "local", "s3", "hydrated")
TARGETS = {"hydrated": 1.2, "s3": 2.0}
SETTLE_INTERVAL = 0.5
SETTLED_SHARE = 0.1
SETTLE_TIMEOUT = 120.0
CLONE_NEWNS = 0x00020000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class GuestRun:
    """One guest of a storm: when it was released, its session's and its boot's seconds, what it read."""

    released: float
    session_s: float
    boot_s: float
    read_bytes: int
    read_ops: int
    qemu_cpu_s: float

    @property
    def seconds(self) -> float:
        return self.session_s + self.boot_s


def vm_name(index: int) -> str:
    return f"vm{index % VMS + 1}"


def vm_disks(work: Path, payload_mib: int) -> list[Path]:
    """The three VMs' disks: the guest with UNIQUE_MIB of each VM's own bytes in /payload."""
    guest = build_guest(payload_mib=payload_mib, stage_payload=stage_files)
    disks = []
    for index in range(VMS):
        disk = guest.copy_disk(work / f"{vm_name(index)}.img", GUEST_SECONDS)
        unique = work / f"{vm_name(index)}.bin"
        unique.write_bytes(random.Random(index).randbytes(UNIQUE_MIB << 20))
        run(["debugfs", "-w", "-R", f"write {unique} payload/{unique.name}", f"{disk}?offset={ROOT_OFFSET}"])
        unique.unlink()
        disks.append(disk)
    return disks


def installed_bytecode(work: Path) -> None:
    """Byte-compile the appliance's modules once, for every process the bench starts, as an install has them.

    `deploy/install.sh` installs a package, which pip byte-compiles; a checkout run with
    PYTHONDONTWRITEBYTECODE (as this machine's environment sets it) compiles every module from
    source in every process, which would add compile time to each session command of a storm.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    run([PYTHON, "-m", "compileall", "-q", "appliance", "overlay", "nfs_export"], cwd=REPO)


def backup_vms(store: Path, disks: list[Path], *init: str) -> None:
    """A new store (`init` flags) holding each disk as the one point of its own VM, its files indexed.

    The index is what a serving appliance makes after each backup; made here, no storm's serve
    spends the storm parsing the points' file systems for it.
    """
    run(appliance(store, "init", *init), cwd=REPO)
    for index, disk in enumerate(disks):
        started = time.perf_counter()
        run(appliance(store, "backup", "--vm", vm_name(index), str(disk)), cwd=REPO)
        run(appliance(store, "files", "index", "--vm", vm_name(index)), cwd=REPO)
        log(f"backup and file index of {vm_name(index)} into {store.name} in {time.perf_counter() - started:.1f}s")


def busy_cpu_seconds() -> float:
    """CPU time all CPUs of the machine spent not idle since boot, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of this process's children that ended (and were waited for) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def processes_cpu_seconds(pattern: str) -> float:
    """CPU time so far of the processes whose command line matches `pattern` (pgrep -f)."""
    return sum(process_cpu_seconds(int(pid)) for pid in run(["pgrep", "-f", pattern], ok=(0, 1)).split())


def settle(pattern: str) -> None:
    """Wait until the processes matching `pattern` use under SETTLED_SHARE of a core: a server's start-up
    work (imports, opening the store) is over, as it is on an appliance that was running before the storm."""
    deadline = time.perf_counter() + SETTLE_TIMEOUT
    used = processes_cpu_seconds(pattern)
    while time.perf_counter() < deadline:
        time.sleep(SETTLE_INTERVAL)
        used, before = processes_cpu_seconds(pattern), used
        if used - before < SETTLED_SHARE * SETTLE_INTERVAL:
            return
    raise SystemExit(f"bench: {pattern!r} stayed busy for {SETTLE_TIMEOUT:.0f}s")


def storm(guests: int, guest: Callable[[int], GuestRun], servers: dict[str, str]) -> dict[str, float]:
    """Once the servers settled and the page cache is dropped, release `guest(0)` .. `guest(guests - 1)`
    together; the storm's figures once every guest is done.

    `servers` names figures of the CPU time the processes matching a pattern used meanwhile;
    `commands_cpu_s` is that of the commands the guests ran (the session commands, QEMU before it
    daemonizes), and `other_cpu_s` what the machine's CPUs did beyond all those (the kernel, and
    anyone else's work on this shared machine).
    """
    barrier = threading.Barrier(guests)

    def released(index: int) -> GuestRun:
        barrier.wait()
        return guest(index)

    for pattern in servers.values():
        settle(pattern)
    must_drop_page_cache()
    cpu = {name: processes_cpu_seconds(pattern) for name, pattern in servers.items()}
    busy, commands = busy_cpu_seconds(), children_cpu_seconds()
    with ThreadPoolExecutor(guests) as pool:
        done = [future.result() for future in [pool.submit(released, index) for index in range(guests)]]
    busy, commands = busy_cpu_seconds() - busy, children_cpu_seconds() - commands
    cpu = {name: processes_cpu_seconds(pattern) - cpu[name] for name, pattern in servers.items()}
    cpu["commands_cpu_s"] = commands
    seconds = [one.seconds for one in done]
    last_marker = max(one.released + one.seconds for one in done)
    storm_s = last_marker - min(one.released for one in done)
    qemu = sum(one.qemu_cpu_s for one in done)
    return {"storm_s": storm_s, "boots_s": last_marker - min(one.released + one.session_s for one in done),
            "guest_median_s": statistics.median(seconds), "guest_max_s": max(seconds),
            "session_median_s": statistics.median(one.session_s for one in done),
            "read_MB": sum(one.read_bytes for one in done) / 1e6, "read_ops": sum(one.read_ops for one in done),
            "cpu_busy": busy / (storm_s * (os.cpu_count() or 1)), "qemu_cpu_s": qemu, **cpu,
            "other_cpu_s": busy - qemu - sum(cpu.values())}


def boot_one(run_dir: Path, disk: str, accel: str, used: set[str], released: float, session_s: float) -> GuestRun:
    return GuestRun(released, session_s, *boot_seconds(run_dir, disk, accel, used))


def ipv4_beyond_loopback() -> None:
    """Give the namespace's lo a second IPv4 address (TEST-NET-1).

    ganesha resolves its Bind_addr with getaddrinfo's AI_ADDRCONFIG, which counts IPv4 as
    configured only when an address other than 127.0.0.1 exists: in a fresh namespace it refuses
    even "127.0.0.1".
    """
    run(["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"])


def private_run_directory() -> None:
    """Move this thread into a new mount namespace whose /run is an empty tmpfs.

    rpcbind makes /run/rpcbind.sock and ganesha registers through it before trying port 111: on
    the machine's /run that would take the socket from (or hand ganesha's registration to) a
    portmapper of the machine's network namespace, which QEMU here never asks.
    """
    if _libc.unshare(CLONE_NEWNS) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWNS): {os.strerror(errno)}")
    run(["mount", "--make-rprivate", "/"])
    run(["mount", "-t", "tmpfs", "storm-run", "/run"])


def ganesha_storm(work: Path, number: int, disks: list[Path], guests: int, accel: str,
                  used: set[str]) -> dict[str, float]:
    """Fresh raw copies, a fresh rpcbind and ganesha in a private /run, the page cache dropped, then the storm."""
    export = work / "export"
    shutil.rmtree(export, ignore_errors=True)
    export.mkdir()
    for index in range(guests):
        shutil.copyfile(disks[index % VMS], export / f"guest{index}.img")

    def in_private_run() -> dict[str, float]:
        private_run_directory()
        ports = (free_port(), free_port())
        conf = work / "ganesha.conf"
        conf.write_text(GANESHA_CONF.format(nfs=ports[0], mnt=ports[1], host=HOST, export=export,
                                            recovery=work / "ganesha-recovery"))
        cmd = ["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(work / "logs" / f"ganesha-nfsd-{number}.log"),
               "-p", str(work / "ganesha.pid")]
        with portmapper(work / "logs"), server("ganesha", cmd, url(str(export), ports), work / "logs"):

            def guest(index: int) -> GuestRun:
                released = time.perf_counter()
                return boot_one(work / "guests" / f"ganesha-{number}-{index}",
                                f"nfs://{HOST}{export}/guest{index}.img", accel, used, released, 0.0)

            return storm(guests, guest, {"server_cpu_s": f"ganesha.nfsd -F -f {conf} "})

    with ThreadPoolExecutor(1) as thread:  # a thread of its own: it never leaves the mount namespace
        return thread.submit(in_private_run).result()


def our_storm(work: Path, variant: str, number: int, store: Path, guests: int, accel: str, used: set[str],
              engine: SeaweedS3 | None, *serve_flags: str) -> dict[str, float]:
    """A fresh serve with its API up, then the storm: each guest makes its session and boots it."""
    with serving(work, store, *serve_flags) as metrics_port:
        while read_runtime(store) is None:  # else the session commands would work on the store offline
            time.sleep(0.05)

        def guest(index: int) -> GuestRun:
            name, vm = f"{variant}{number}-{index}", vm_name(index)
            released = time.perf_counter()
            run(appliance(store, "session", "create", "--vm", vm, "--point", "latest", "--name", name), cwd=REPO)
            session_s = time.perf_counter() - released
            return boot_one(work / "guests" / name, session_disk_url(HOST, name, vm), accel, used, released,
                            session_s)

        servers = {"server_cpu_s": f"serve .*--metrics-port {metrics_port} "}
        if engine is not None:
            servers["engine_cpu_s"] = f"weed server -dir={engine.root / 'data'} "
        fig = storm(guests, guest, servers)
        fig["store_loads"] = sum(sample.value for sample in metric_samples(metrics_port, "appliance_chunk_loads")
                                 if sample.name.endswith("_total"))
    return fig


def measure(work: Path, number: int, variants: list[str], disks: list[Path], engine: SeaweedS3,
            tier: tuple[str, ...], args: argparse.Namespace, used: set[str]) -> dict[str, float]:
    """One storm of each variant, in VARIANTS' order rotated by the run's number, so that load from outside
    the bench (the machine is shared) does not always fall on the same variant."""
    fig: dict[str, float] = {}
    for variant in variants[number % len(variants):] + variants[:number % len(variants)]:
        if variant == "ganesha":
            figures = ganesha_storm(work, number, disks, args.guests, args.accel, used)
        else:
            s3 = None if variant == "local" else engine
            if s3 is not None:
                s3.restart()
            figures = our_storm(work, variant, number, work / ("store-local" if s3 is None else "store-s3"),
                                args.guests, args.accel, used, s3, *(tier if variant == "hydrated" else ()))
        log(f"{variant}: storm {figures['storm_s']:.2f}s (guests: median {figures['guest_median_s']:.2f}s, "
            f"max {figures['guest_max_s']:.2f}s; sessions median {figures['session_median_s']:.2f}s); "
            f"{figures['read_MB']:.0f} MB in {figures['read_ops']:.0f} reads; CPU {figures['cpu_busy']:.0%} busy: "
            + ", ".join(f"{key[:-len('_cpu_s')]} {value:.1f}s" for key, value in figures.items()
                        if key.endswith("_cpu_s")))
        fig.update({f"{variant}_{key}": value for key, value in figures.items()})
    return fig


def summary(figures: dict[str, float], variants: list[str]) -> dict[str, Any]:
    """Each of our variants' storm against ganesha's, and the issue's targets."""
    ratios = {f"ratio_{variant}{suffix}": round(figures[f"{variant}_{key}"] / figures[f"ganesha_{key}"], 3)
              for variant in variants if variant != "ganesha"
              for key, suffix in (("storm_s", ""), ("boots_s", "_boots"))}
    met = {f"{variant}_le_{target}x_ganesha": ratios[f"ratio_{variant}"] <= target
           for variant, target in TARGETS.items() if variant in variants}
    return {**ratios, "targets_met": met, "all_targets_met": all(met.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, runs=3, kept="disks, stores, tier, consoles, logs")
    parser.add_argument("--guests", type=int, default=6, help="guests per storm (guest i boots VM i mod 3)")
    parser.add_argument("--payload-mib", type=int, default=32, help="real files each guest reads while it boots")
    parser.add_argument("--accel", choices=ACCELERATORS, default="auto", help="QEMU accelerator (default auto)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"which of {','.join(VARIANTS)} to run (ganesha always runs: ratios are to it)")
    args = parser.parse_args()
    variants = [variant for variant in VARIANTS if variant == "ganesha" or variant in args.variants.split(",")]
    if os.geteuid() != 0:
        parser.error("needs root: it drops the page cache and makes network and mount namespaces")
    for tool in ("ganesha.nfsd", "rpcbind", "debugfs", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the servers and guests
    work = work_directory(parser, args.work, "storm-bench-")
    engine = SeaweedS3(work / "seaweedfs")
    runs: list[dict[str, float]] = []
    used: set[str] = set()
    try:
        for name in ("logs", "guests", "ganesha-recovery"):
            (work / name).mkdir()
        installed_bytecode(work)
        disks = vm_disks(work, args.payload_mib)
        disk_bytes = disks[0].stat().st_size
        tier = ("--hydrated-dir", str(work / "hydrated"), "--hydrated-gib", "4")
        with private_network():
            ipv4_beyond_loopback()
            engine.start()
            backup_vms(work / "store-local", disks)
            backup_vms(work / "store-s3", disks, "--s3-endpoint", engine.endpoint, "--s3-bucket", BUCKET,
                       "--s3-prefix", "storm/", "--s3-credentials-file", str(engine.credentials_file))
            hydrate_s = hydrate(work, work / "store-s3", tier) if "hydrated" in variants else None
            log(f"accelerator: {choose_accelerator(args.accel)} (asked for {args.accel})")  # probed before timing
            for number in range(args.runs):
                log(f"run {number + 1} of {args.runs}")
                runs.append(measure(work, number, variants, disks, engine, tier, args, used))
    finally:
        engine.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = medians(runs, 3)
    result: dict[str, Any] = {
        "bench": "storm", "runs": args.runs, "guests": args.guests, "vms": VMS, "accel": ",".join(sorted(used)),
        "memory_mib": MEMORY_MIB, "payload_mib": args.payload_mib, "unique_mib": UNIQUE_MIB,
        "disk_bytes": disk_bytes, "hydrate_s": None if hydrate_s is None else round(hydrate_s, 2),
        **figures, **summary(figures, variants), "per_run": runs if args.runs > 1 else [],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
