#!/usr/bin/env python3
"""FUSE benchmark: our synthesized flat extent against borg mount, restic mount and bindfs.

What is measured, and why:

* The image: an ext4 image (``mkfs.ext4 -d``) filled to ~60% with real files of this
  machine (``tests.bench.ingest.stage_files``), so chunks compress and dedup the way a
  guest disk does. It is backed up once into our store, a borg repository (``-e none``,
  default lz4) and a restic repository (v2, default compression); ingest is not timed here.
* Read paths, all of the same bytes: ours = ``MNT/restore-points/<vm>/<point>/<vm>-flat.vmdk``
  of ``appliance mount`` (chunks fetched, checked and decompressed on demand); ``borg mount``
  and ``restic mount`` of their repositories; ``bindfs`` of the raw image (a passthrough
  FUSE file system: the cost of FUSE itself, the ceiling for any FUSE front).
* Sequential: ``dd bs=1M`` of the whole file, three times per fresh mount process.
  cold = new process (empty in-process caches) and the kernel page cache dropped;
  warm = again right after (ours asks the kernel to keep restore-point pages, so this
  may be page-cache speed); warm_chunk_cache = page cache dropped again but the mount
  process's own caches as the first pass left them (for ours: what the chunk cache buys).
* Random: ``fio`` randread 4 KiB and 64 KiB, psync, ``--seconds`` each, page cache dropped
  before each and ``--invalidate=1``, in the same mount process right after the
  sequential passes (so every tool's in-process cache is in the same state).
* Writes: ``fio`` randwrite 4 KiB and 64 KiB, psync, buffered, into a fresh session's
  ``MNT/sessions/<S>/<vm>-flat.vmdk`` (copy-on-write over the restore point), against the
  same into a copy of the raw image through bindfs.
* Correctness: after the timed reads, ``cmp`` of our flat extent against the image
  (untimed), so no figure is of wrong data; the peers' files must have the image's size.

Targets (from the issue): sequential warm >= 1 GB/s and >= 0.8x bindfs; random reads
(4 KiB and 64 KiB IOPS) >= 5x borg mount and restic mount.
Output: one JSON line on stdout (medians over ``--runs``, plus each run); logs on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.bench.ingest import (
    GIB,
    add_run_arguments,
    drop_page_cache,
    image_bytes,
    log,
    make_ext4_image,
    mbps,
    medians,
    run,
    running_child,
    stop_child,
    work_directory,
)

VM = "bench"
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
MOUNT_TIMEOUT = 120.0


def appliance(store: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "appliance", "--store", str(store), *args]


def mounted_paths(under: Path) -> list[str]:
    """Mount points at or below `under` (from mountinfo; also sees dead FUSE mounts)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(under) or point.startswith(f"{under}/"):
                found.append(point)
    return found


def force_unmount(path: Path) -> None:
    for point in reversed(mounted_paths(path)):
        log(f"warning: {point} still mounted; fusermount3 -u -z")
        subprocess.run(["fusermount3", "-u", "-z", point], check=False, capture_output=True)


@contextlib.contextmanager
def mounted(name: str, cmd: list[str], mnt: Path, logs: Path, ok: tuple[int, ...] = (0,),
            stop: int | list[str] = signal.SIGTERM, **kwargs: Any) -> Iterator[None]:
    """Run a foreground FUSE server as a child; yield once `mnt` is mounted; then stop it by PID with
    signal `stop` (or run the command `stop`) and wait for it. borg 1.2 and restic 0.14 exit on
    SIGTERM but leave their mounts behind: borg is stopped with `borg umount`, restic with SIGINT."""
    mnt.mkdir(parents=True, exist_ok=True)

    def unmount(proc: subprocess.Popen[bytes]) -> str | None:
        rc = stop_child(name, proc, stop, **kwargs)
        left = mounted_paths(mnt)
        force_unmount(mnt)
        if rc in ok and not left:
            return None
        return f"mount exited with {rc}" + (f", leaving {left} mounted" if left else "")

    with running_child(name, cmd, logs, lambda: os.path.ismount(mnt), MOUNT_TIMEOUT, 0.02, unmount, **kwargs):
        yield


def must_drop_page_cache() -> None:
    if not drop_page_cache():
        raise SystemExit("bench: cannot drop the page cache (needs root): cold figures would be wrong")


def dd_seconds(path: Path) -> float:
    started = time.perf_counter()
    run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
    return time.perf_counter() - started


def fio(prefix: str, path: Path, rw: str, bs: str, seconds: int, cwd: Path, *extra: str) -> dict[str, float]:
    """IOPS and MB/s of one time-based fio job (psync, one thread)."""
    out = run(["fio", "--name=r", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--ioengine=psync",
               f"--runtime={seconds}", "--time_based", "--output-format=json", *extra], cwd=cwd)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"bench: fio {rw} {bs} on {path} failed with error {job['error']}")
    side = job["write" if "write" in rw else "read"]
    log(f"{prefix}: {side['iops']:.0f} IOPS, {side['bw_bytes'] / 1e6:.1f} MB/s")
    return {f"{prefix}_iops": round(side["iops"], 1), f"{prefix}_MBps": round(side["bw_bytes"] / 1e6, 1)}


def read_suite(tool: str, path: Path, size: int, args: argparse.Namespace, cwd: Path) -> dict[str, float]:
    """Sequential cold / warm / warm_chunk_cache, then random 4k and 64k, in a fresh mount process."""
    actual = path.stat().st_size
    if actual != size:
        raise SystemExit(f"bench: {tool}'s {path} is {actual} bytes, the image {size}")
    must_drop_page_cache()
    cold = dd_seconds(path)
    warm = dd_seconds(path)
    must_drop_page_cache()
    warm_chunk = dd_seconds(path)
    fig = {f"{tool}_seq_cold_MBps": mbps(size, cold), f"{tool}_seq_warm_MBps": mbps(size, warm),
           f"{tool}_seq_warm_chunk_cache_MBps": mbps(size, warm_chunk)}
    log(f"{tool} seq: " + ", ".join(f"{k.split('_seq_')[1]} {v}" for k, v in fig.items()))
    for bs in ("4k", "64k"):
        must_drop_page_cache()
        fig.update(fio(f"{tool}_rand{bs}", path, "randread", bs, args.seconds, cwd, "--readonly", "--invalidate=1"))
    return fig


def write_suite(tool: str, path: Path, size: int, args: argparse.Namespace, cwd: Path) -> dict[str, float]:
    fig: dict[str, float] = {}
    for bs in ("4k", "64k"):
        fig.update(fio(f"{tool}_write{bs}", path, "randwrite", bs, args.seconds, cwd, f"--size={size}"))
    return fig


def backup_image(store: Path, image: Path) -> str:
    """A new store holding `image` as one restore point of VM; returns the point id."""
    run(appliance(store, "init"), cwd=REPO)
    started = time.perf_counter()
    point = run(appliance(store, "backup", "--vm", VM, str(image)), cwd=REPO).strip().splitlines()[-1].strip()
    seconds = time.perf_counter() - started
    log(f"ours: backup of {image.stat().st_size / GIB:.2f} GiB as point {point} in {seconds:.1f}s")
    return point


def setup(work: Path, size: int, skip_peers: bool) -> dict[str, Any]:
    """The image, our store (with one point) and the peers' repositories; nothing here is timed for the result."""
    src = work / "src"
    src.mkdir()
    image = src / "disk.img"
    make_ext4_image(image, size, work / "staging")
    store = work / "store"
    point = backup_image(store, image)
    env: dict[str, Any] = {"image": image, "store": store, "point": point}
    if not skip_peers:
        env["borg_env"] = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                               BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_BASE_DIR=str(work / "borg-base"))
        env["restic_env"] = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(work / "restic-cache"),
                                 RESTIC_REPOSITORY=str(work / "restic"))
        started = time.perf_counter()
        run(["borg", "init", "-e", "none", str(work / "borg")], env=env["borg_env"])
        run(["borg", "create", f"{work / 'borg'}::a", image.name], ok=(0, 1), env=env["borg_env"], cwd=src)
        log(f"borg: create in {time.perf_counter() - started:.1f}s")
        started = time.perf_counter()
        run(["restic", "init"], env=env["restic_env"])
        run(["restic", "backup", "-q", image.name], env=env["restic_env"], cwd=src)
        log(f"restic: backup in {time.perf_counter() - started:.1f}s")
    return env


def measure(work: Path, number: int, size: int, env: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    image, store, point = env["image"], env["store"], env["point"]
    logs, mnt = work / "logs", work / "mnt"
    logs.mkdir(exist_ok=True)
    fig: dict[str, float] = {}
    session = f"s{number}"  # a fresh session per run: every run writes into an empty overlay
    run(appliance(store, "session", "create", "--vm", VM, "--point", "latest", "--name", session), cwd=REPO)
    with mounted("ours", appliance(store, "mount", str(mnt / "ours")), mnt / "ours", logs, cwd=REPO):
        flat = mnt / "ours" / "restore-points" / VM / point / f"{VM}-flat.vmdk"
        fig.update(read_suite("ours", flat, size, args, work))
        run(["cmp", str(flat), str(image)])
        log("ours: flat extent equals the image")
        fig.update(write_suite("ours", mnt / "ours" / "sessions" / session / f"{VM}-flat.vmdk", size, args, work))
    copy = image.with_name("copy.img")  # the bindfs write target; a fresh copy each run
    run(["cp", "--reflink=auto", str(image), str(copy)])
    with mounted("bindfs", ["bindfs", "-f", str(image.parent), str(mnt / "bindfs")], mnt / "bindfs", logs):
        fig.update(read_suite("bindfs", mnt / "bindfs" / image.name, size, args, work))
        fig.update(write_suite("bindfs", mnt / "bindfs" / copy.name, size, args, work))
    copy.unlink()
    if not args.skip_peers:
        with mounted("borg", ["borg", "mount", "-f", f"{work / 'borg'}::a", str(mnt / "borg")], mnt / "borg", logs,
                     stop=["borg", "umount", str(mnt / "borg")], env=env["borg_env"]):
            fig.update(read_suite("borg", mnt / "borg" / image.name, size, args, work))
        with mounted("restic", ["restic", "mount", str(mnt / "restic")], mnt / "restic", logs,
                     ok=(0, 130), stop=signal.SIGINT, env=env["restic_env"]):
            latest = mnt / "restic" / "snapshots" / "latest"
            path = next((p for p in (latest / image.name, latest / str(image).lstrip("/")) if p.exists()), latest)
            fig.update(read_suite("restic", path, size, args, work))
    return fig


def ratios(fig: dict[str, float], skip_peers: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("warm", "cold", "warm_chunk_cache"):
        out[f"ratio_seq_{kind}_vs_bindfs"] = round(fig[f"ours_seq_{kind}_MBps"] / fig[f"bindfs_seq_{kind}_MBps"], 3)
    met = {"seq_warm_ge_1GBps": fig["ours_seq_warm_MBps"] >= 1000,
           "seq_warm_ge_0_8x_bindfs": out["ratio_seq_warm_vs_bindfs"] >= 0.8}
    for peer in () if skip_peers else ("borg", "restic"):
        for bs in ("4k", "64k"):
            ratio = round(fig[f"ours_rand{bs}_iops"] / fig[f"{peer}_rand{bs}_iops"], 3)
            out[f"ratio_rand{bs}_vs_{peer}"] = ratio
            met[f"rand{bs}_ge_5x_{peer}"] = ratio >= 5
    out["ratio_write4k_vs_bindfs"] = round(fig["ours_write4k_iops"] / fig["bindfs_write4k_iops"], 3)
    out["ratio_write64k_vs_bindfs"] = round(fig["ours_write64k_iops"] / fig["bindfs_write64k_iops"], 3)
    out["targets_met"] = met
    out["all_targets_met"] = all(met.values())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="image size")
    parser.add_argument("--seconds", type=int, default=20, help="runtime of each fio job")
    add_run_arguments(parser, runs=1, kept="image, store, repositories")
    parser.add_argument("--skip-peers", action="store_true", help="skip borg and restic (bindfs, the baseline, stays)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it drops the kernel page cache")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks unmount
    size = image_bytes(args.size_gib)
    work = work_directory(parser, args.work, "fuse-bench-")
    try:
        env = setup(work, size, args.skip_peers)
        runs = []
        for number in range(args.runs):
            log(f"run {number + 1} of {args.runs}")
            runs.append(measure(work, number, size, env, args))
    finally:
        force_unmount(work)
        if mounted_paths(work):
            log(f"warning: mounts left under {work}; not deleting it")
        elif not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = medians(runs, 1)
    result: dict[str, Any] = {"bench": "fuse", "image_bytes": size, "seconds": args.seconds, "runs": args.runs}
    result.update(figures, **ratios(figures, args.skip_peers))
    result["per_run"] = runs if args.runs > 1 else []
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
