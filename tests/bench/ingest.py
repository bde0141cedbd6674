#!/usr/bin/env python3
"""Ingest benchmark: a week of VM disk images through our store, borg and restic.

What is measured, and why:

* The series: an ext4 image (``mkfs.ext4 -d``) filled to ~60% with real files of
  this machine, then ``--days`` copies of it ("day-1.img" ...), each changing
  ~``--change-fraction`` of the 4 KiB blocks the way file churn does: clustered runs of
  1-64 blocks, mostly inside the used part of the file system, with partly compressible
  content (text from real headers, random bytes, halves of each). The changed byte
  ranges of each day are written in the vSphere changed-areas shape (day-N.json).
  A fixed seed makes the series the same in every run; the images are built once and
  every ``--runs`` repetition measures the same files.
* Ingest: wall-clock time of the whole command sequence over day 0..N for
  (a) ours reading every whole image (dedup does the work), (b) ours with changed-areas
  files, (c) ``borg create`` (default lz4), (d) ``restic backup`` (default compression
  "auto", repository v2). Throughput = logical bytes (image size x (days + 1)) / seconds;
  the first full backup (day 0, the compression-heavy case) is also reported alone.
  Every tool starts with all images read once, so the page cache is equally warm for all
  (as far as RAM holds (days + 1) images).
* Space: ``du -sb`` of each store/repository at the end (ours also: packs only, from
  ``stats --json``; borg also: unique compressed bytes from ``borg info --json``).
* Read-back: the latest point of (a) read sequentially in 1 MiB pieces through
  ``ReadPath`` (fresh, so its chunk cache is cold) against reading the raw image file in
  1 MiB pieces. The target ratio compares both with the page cache dropped first (both
  from disk, as a full restore reads); with a warm page cache the raw read is a memory
  copy, so that pair is reported beside `dd bs=1M` of the raw file for context. An
  untimed pass then checks that the latest points of (a) and (b) hold exactly the
  image's bytes, so no figure is of wrong data.

Targets (from the issue): ours (whole images) >= 1.5x the throughput of borg and of
restic, stored bytes <= borg's, read-back >= 50% of raw read speed.
Output: one JSON line on stdout (medians over runs, plus each run); logs on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

BLOCK = 4096
PIECE = 1 << 20
GIB = 1 << 30
# Real files of this machine, copied in this order (file by file, sorted) until the byte budget is used.
SOURCE_DIRS = ["/usr/lib/python3", "/usr/lib/python3.11", "/usr/share/doc", "/usr/include"]
SOURCE_DIRS += ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/share", "/usr/lib", "/usr/sbin", "/opt"]
SEED = 20240607


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], ok: tuple[int, ...] = (0,), **kwargs: Any) -> str:
    """Run a command; fail loudly (with its output) unless its exit code is in `ok`."""
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    if proc.returncode not in ok:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench: {' '.join(cmd)} exited with {proc.returncode}")
    return str(proc.stdout)


def du(path: Path) -> int:
    return int(run(["du", "-sb", str(path)]).split()[0])


def stage_files(staging: Path, budget: int) -> int:
    """Copy real files (symlinks as symlinks) into `staging` until `budget` bytes are used."""
    used = 0
    for root in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            target_dir = staging / dirpath.lstrip("/")
            target_dir.mkdir(parents=True, exist_ok=True)
            for name in sorted(filenames):
                src, dst = os.path.join(dirpath, name), target_dir / name
                if os.path.lexists(dst):
                    continue  # a later root overlapping an earlier one
                try:
                    st = os.lstat(src)
                    if os.path.islink(src):
                        os.symlink(os.readlink(src), dst)
                        continue
                    if not os.path.isfile(src) or not os.access(src, os.R_OK):
                        continue
                    cost = -(-st.st_size // BLOCK) * BLOCK
                    if used + cost > budget:
                        continue
                    shutil.copy2(src, dst)
                    used += cost
                except OSError:
                    continue  # unreadable or vanished files are skipped, as cp -a would report
            if used >= budget - (1 << 20):
                return used
    return used


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges the file system holds data for (the image's used part)."""
    extents, fd = [], os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return extents


def text_corpus(limit: int = 8 << 20) -> bytes:
    """Real text (C headers) for the compressible part of the churn."""
    corpus = bytearray()
    for path in sorted(Path("/usr/include").rglob("*.h")):
        if len(corpus) >= limit:
            break
        with contextlib.suppress(OSError):
            corpus += path.read_bytes()
    return bytes(corpus) if len(corpus) > 1 << 20 else b"lorem ipsum dolor sit amet " * 50000


def churn(
    image: Path, rng: random.Random, extents: list[tuple[int, int]], fraction: float, corpus: bytes
) -> list[dict[str, int]]:
    """Rewrite ~`fraction` of the image's blocks in clustered runs; the merged changed areas."""
    nblocks = image.stat().st_size // BLOCK
    used = [(s // BLOCK, max(s // BLOCK + 1, e // BLOCK)) for s, e in extents] or [(0, nblocks)]
    weights = [e - s for s, e in used]
    changed: set[int] = set()
    target = int(nblocks * fraction)
    with open(image, "r+b") as f:
        while len(changed) < target:
            if rng.random() < 0.85:  # most churn lands on blocks the file system uses
                s, e = rng.choices(used, weights)[0]
                first = rng.randrange(s, e)
            else:
                first = rng.randrange(nblocks)
            count = min(rng.randint(1, 64), nblocks - first)
            out = bytearray()
            for _ in range(count):
                kind, at = rng.random(), rng.randrange(len(corpus) - BLOCK)
                if kind < 0.45:
                    out += corpus[at : at + BLOCK]
                elif kind < 0.75:
                    out += rng.randbytes(BLOCK)
                else:
                    out += corpus[at : at + BLOCK // 2] + rng.randbytes(BLOCK // 2)
            os.pwrite(f.fileno(), out, first * BLOCK)
            changed.update(range(first, first + count))
    areas: list[dict[str, int]] = []
    for block in sorted(changed):
        if areas and areas[-1]["start"] + areas[-1]["length"] == block * BLOCK:
            areas[-1]["length"] += BLOCK
        else:
            areas.append({"start": block * BLOCK, "length": BLOCK})
    return areas


def make_ext4_image(image: Path, size: int, staging: Path) -> None:
    """An ext4 image of `size` bytes, ~60% filled with real files of this machine."""
    staging.mkdir()
    used = stage_files(staging, int(size * 0.6))
    log(f"staged {used / GIB:.2f} GiB of real files; mkfs.ext4 -d")
    run(["truncate", "-s", str(size), str(image)])
    run(["mkfs.ext4", "-q", "-F", "-d", str(staging), str(image)])
    shutil.rmtree(staging)


def build_series(work: Path, size: int, days: int, fraction: float) -> list[Path]:
    images = work / "images"
    images.mkdir()
    base = images / "day-0.img"
    make_ext4_image(base, size, work / "staging")
    extents = data_extents(base)
    log(f"day-0: {sum(e - s for s, e in extents) / GIB:.2f} GiB allocated in {len(extents)} extents")
    corpus, paths = text_corpus(), [base]
    for day in range(1, days + 1):
        path = images / f"day-{day}.img"
        run(["cp", "--reflink=auto", str(paths[-1]), str(path)])
        areas = churn(path, random.Random(SEED + day), extents, fraction, corpus)
        (images / f"day-{day}.json").write_text(json.dumps({"changedArea": areas}))
        log(f"day-{day}: {sum(a['length'] for a in areas) / (1 << 20):.1f} MiB changed in {len(areas)} areas")
        paths.append(path)
    return paths


def timed_sequence(name: str, cmds: list[list[str]], images: list[Path], **kwargs: Any) -> list[float]:
    """Seconds of each command (one per day), with every image in the page cache first."""
    for path in images:  # so each tool starts with the same warm page cache
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    seconds = []
    for day, cmd in enumerate(cmds):
        started = time.perf_counter()
        run(cmd, **kwargs)
        seconds.append(time.perf_counter() - started)
        log(f"{name} day-{day}: {seconds[-1]:.2f}s")
    return seconds


def bench_ours(store: Path, images: list[Path], cbt: bool, chunk_size: int | None) -> list[float]:
    appliance = [sys.executable, "-m", "appliance", "--store", str(store)]
    run(appliance + ["init"] + (["--chunk-size", str(chunk_size)] if chunk_size else []), cwd=REPO)
    cmds = [appliance + ["backup", "--vm", "bench", str(images[0])]]
    for path in images[1:]:
        extra = ["--parent", "latest", "--changed-areas", str(path.with_suffix(".json"))] if cbt else []
        cmds.append(appliance + ["backup", "--vm", "bench"] + extra + [str(path)])
    return timed_sequence("ours-cbt" if cbt else "ours-whole", cmds, images, cwd=REPO)


def bench_borg(repo: Path, base: Path, images: list[Path]) -> tuple[list[float], int]:
    """Seconds per day, and borg's own count of unique compressed bytes."""
    env = dict(
        os.environ,
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_BASE_DIR=str(base),
    )
    run(["borg", "init", "-e", "none", str(repo)], env=env)
    cmds = [["borg", "create", f"{repo}::{p.stem}", p.name] for p in images]
    seconds = timed_sequence("borg", cmds, images, ok=(0, 1), env=env, cwd=images[0].parent)
    info = json.loads(run(["borg", "info", "--json", str(repo)], ok=(0, 1), env=env))
    return seconds, int(info["cache"]["stats"]["unique_csize"])


def bench_restic(repo: Path, cache: Path, images: list[Path]) -> list[float]:
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(cache))
    run(["restic", "init", "--repo", str(repo)], env=env)
    version = json.loads(run(["restic", "cat", "config", "--repo", str(repo)], env=env))["version"]
    if version < 2:
        log(f"warning: restic made a v{version} repository: no compression")
    cmds = [["restic", "backup", "-q", "--repo", str(repo), p.name] for p in images]
    return timed_sequence("restic", cmds, images, env=env, cwd=images[0].parent)


def drop_page_cache() -> bool:
    """Empty the kernel page cache (root only); False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    run(cmd)
    return time.perf_counter() - started


def raw_read(path: Path) -> float:
    """Seconds to read a file in 1 MiB pieces into one reused buffer."""
    buf = mmap.mmap(-1, PIECE)
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        while os.readv(fd, [buf]):
            pass
        return time.perf_counter() - started
    finally:
        os.close(fd)


def store_read(store_dir: Path, compare: Path | None = None) -> float:
    """Seconds to read the latest point sequentially; with `compare`, check it equals that file."""
    from appliance.store import ReadPath, open_store

    with open_store(store_dir) as store, contextlib.ExitStack() as stack:
        with store.env.begin() as txn:
            point = store.catalog.resolve(txn, "bench", "latest")
        stack.enter_context(store.reader_lock())
        disk = stack.enter_context(ReadPath(store)).disk(point, 0)  # fresh: cold chunk cache
        raw = stack.enter_context(open(compare, "rb", buffering=0)) if compare else None
        if raw is not None and os.fstat(raw.fileno()).st_size != disk.size:
            raise SystemExit(f"bench: latest point of {store_dir} is {disk.size} bytes, {compare} is not")
        started = time.perf_counter()
        for offset in range(0, disk.size, PIECE):
            data = disk.read(offset, PIECE)
            if raw is not None and data != raw.read(PIECE):
                raise SystemExit(f"bench: latest point of {store_dir} differs from {compare} at {offset}")
        return time.perf_counter() - started


def mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def tool_figures(name: str, seconds: list[float], image_bytes: int, repo: Path) -> dict[str, Any]:
    """Throughput of the whole series and of day 0 alone, and the space the repository takes."""
    total = image_bytes * len(seconds)
    return {
        f"{name}_MBps": mbps(total, sum(seconds)),
        f"{name}_seconds": round(sum(seconds), 2),
        f"{name}_day0_MBps": mbps(image_bytes, seconds[0]),
        f"{name}_stored_bytes": du(repo),
    }


def measure(work: Path, images: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    work.mkdir()
    size = images[0].stat().st_size
    fig: dict[str, Any] = {}
    for mode in ("whole", "cbt"):
        store = work / f"ours-{mode}"
        fig.update(tool_figures(f"ours_{mode}", bench_ours(store, images, mode == "cbt", args.chunk_size), size, store))
        stats = json.loads(run([sys.executable, "-m", "appliance", "--store", str(store), "stats", "--json"], cwd=REPO))
        for key in ("stored_bytes", "dedup_ratio", "compression_ratio"):
            fig[f"ours_{mode}_{key.replace('stored', 'pack')}"] = stats[key]
    fig["ours_day0_MBps"] = fig["ours_whole_day0_MBps"]
    log("read-back")
    if drop_page_cache():  # both from disk: what a full restore does
        raw_cold_s = raw_read(images[-1])
        drop_page_cache()
        back_cold_s = store_read(work / "ours-whole")
        fig.update(readback_cold_MBps=mbps(size, back_cold_s), raw_read_cold_MBps=mbps(size, raw_cold_s))
        fig["ratio_readback_vs_raw"] = round(raw_cold_s / back_cold_s, 3)
    raw_read(images[-1])  # both from the page cache (ours: packs cached, chunk cache cold)
    raw_s, back_s = raw_read(images[-1]), store_read(work / "ours-whole")
    dd_s = timed(["dd", f"if={images[-1]}", "of=/dev/null", "bs=1M", "status=none"])
    fig.update(readback_warm_MBps=mbps(size, back_s), raw_read_warm_MBps=mbps(size, raw_s),
               dd_warm_MBps=mbps(size, dd_s), ratio_readback_warm_vs_dd=round(dd_s / back_s, 3))
    for mode in ("whole", "cbt"):
        store_read(work / f"ours-{mode}", compare=images[-1])
    log("read-back check: latest points of both stores equal the last image")
    if not args.skip_peers:
        borg_s, fig["borg_unique_csize"] = bench_borg(work / "borg", work / "borg-base", images)
        fig.update(tool_figures("borg", borg_s, size, work / "borg"))
        restic_s = bench_restic(work / "restic", work / "restic-cache", images)
        fig.update(tool_figures("restic", restic_s, size, work / "restic"))
        for peer in ("borg", "restic"):
            fig[f"ratio_whole_vs_{peer}"] = round(fig["ours_whole_MBps"] / fig[f"{peer}_MBps"], 3)
            fig[f"ratio_cbt_vs_{peer}"] = round(fig["ours_cbt_MBps"] / fig[f"{peer}_MBps"], 3)
            fig[f"ratio_stored_vs_{peer}"] = round(fig["ours_whole_stored_bytes"] / fig[f"{peer}_stored_bytes"], 3)
    if not args.keep:
        shutil.rmtree(work)  # the next run's stores need the space more than the page cache does
    return fig


def image_bytes(size_gib: float) -> int:
    """The image size asked for, rounded down to whole MiB."""
    return int(size_gib * GIB) // (1 << 20) * (1 << 20)


#: How long a peer's process gets to exit after it is told to stop.
STOP_TIMEOUT = 60.0


def stop_child(name: str, proc: subprocess.Popen[bytes], how: int | list[str] = signal.SIGTERM,
               **kwargs: Any) -> int:
    """Stop a child by PID with signal `how` (or by running the command `how`), then SIGKILL
    after STOP_TIMEOUT; its exit code."""
    if proc.poll() is None:
        if isinstance(how, list):
            subprocess.run(how, check=False, capture_output=True, **kwargs)
        else:
            os.kill(proc.pid, how)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"warning: {name} ignored the request to stop for {STOP_TIMEOUT:.0f}s; killing it")
            os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


@contextlib.contextmanager
def running_child(name: str, cmd: list[str], logs: Path, ready: Callable[[], bool], timeout: float,
                  poll: float, stop: Callable[[subprocess.Popen[bytes]], str | None],
                  **kwargs: Any) -> Iterator[None]:
    """A peer (server, mount) as a child logged to LOGS/<name>-N.log: yield once `ready()`, fail
    if it dies meanwhile; `stop(proc)` ends it and says what went wrong, if anything (then the
    log's tail is shown)."""
    log_path = logs / f"{name}-{len(list(logs.iterdir()))}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    started, problem = time.perf_counter(), None
    try:
        while not ready():
            if proc.poll() is not None or time.perf_counter() - started > timeout:
                sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
                raise SystemExit(f"bench: {name} did not come up (exit code {proc.poll()})")
            time.sleep(poll)
        log(f"{name} ready after {time.perf_counter() - started:.2f}s")
        yield
        if proc.poll() is not None:
            raise SystemExit(f"bench: {name} died during the test (exit code {proc.returncode})")
    finally:
        problem = stop(proc)
    if problem is not None:
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
        raise SystemExit(f"bench: {name} {problem}")


def add_run_arguments(parser: argparse.ArgumentParser, runs: int, kept: str) -> None:
    """--runs, --work and --keep, which every benchmark takes; `kept` says what --keep keeps."""
    parser.add_argument("--runs", type=int, default=runs, help="repeat the measurement; report medians")
    parser.add_argument("--work", type=Path, help="work directory (default: a new one under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help=f"keep the work directory ({kept})")


def work_directory(parser: argparse.ArgumentParser, work: Path | None, prefix: str) -> Path:
    """`--work` (which must be empty), or a new directory under /var/tmp."""
    if work is None:
        work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    else:
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            parser.error(f"--work {work} is not empty")
    log(f"work directory {work.resolve()}")
    return work.resolve()


def medians(runs: list[dict[str, Any]], ndigits: int | None = None) -> dict[str, Any]:
    """Each figure's median over the runs (rounded to `ndigits` if given)."""
    figures = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return figures if ndigits is None else {key: round(value, ndigits) for key, value in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="image size (1-4 GiB is the realistic range)")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--change-fraction", type=float, default=0.02, help="share of 4 KiB blocks changed per day")
    parser.add_argument("--chunk-size", type=int, help="store chunk size (default: the store's default)")
    parser.add_argument("--skip-peers", action="store_true", help="skip borg and restic")
    add_run_arguments(parser, runs=1, kept="images")
    args = parser.parse_args()
    size = image_bytes(args.size_gib)
    work = work_directory(parser, args.work, "ingest-bench-")
    try:
        images = build_series(work, size, args.days, args.change_fraction)
        runs = []
        for number in range(args.runs):
            log(f"run {number + 1} of {args.runs}")
            runs.append(measure(work / f"run-{number}", images, args))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = medians(runs)
    met = {"readback_ge_50pct_raw": figures.get("ratio_readback_vs_raw", 0) >= 0.5}
    if not args.skip_peers:
        met.update(
            whole_ge_1_5x_borg=figures["ratio_whole_vs_borg"] >= 1.5,
            whole_ge_1_5x_restic=figures["ratio_whole_vs_restic"] >= 1.5,
            stored_le_borg=figures["ratio_stored_vs_borg"] <= 1.0,
        )
    result = {"bench": "ingest", "image_bytes": size, "days": args.days, "change_fraction": args.change_fraction}
    result.update(runs=args.runs, page_cache="warm for ingest; cold and warm for read-back", **figures, targets_met=met, all_targets_met=all(met.values()))
    result["per_run"] = runs if args.runs > 1 else []
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
