#!/usr/bin/env python3
"""vSphere backup benchmark: our VADP-style backup job against curl reading the same bytes.

What is measured, and why:

* The VM: one 1 GiB disk (``--size-gib``) on govmomi's vcsim with our additions
  (tests/vcsim: real disk files, snapshots, CBT, ESXi-style `/folder`), its content
  written once by the guest through the simulator's control endpoint: mostly random
  (incompressible) 1 MiB blocks with some zero and some repeated ones, as a used
  system disk holds. A local copy of the image is kept (and follows every guest write).
* Full backup: `back_up_vm` with the default options (4 streams) into a fresh store,
  wall clock from the check to the snapshot's removal, and MiB/s of the bytes it read
  (every allocated byte: CBT says what is allocated, and the guest wrote it all). The
  peer is one ``curl --parallel --parallel-max 4`` fetching exactly the byte ranges the
  backup fetched (read from the simulator's `/folder` log), from the same URLs with the
  session's cookie, to /dev/null: what the link and the server give when nothing is
  hashed, compressed or stored. Our transport alone (`FolderTransport`, 4 threads,
  nothing stored) fetches the same ranges too, so the gap to curl splits into the HTTP
  client's share and the store's; and the store's own ceiling is a local ingest of the
  raw copy (`appliance.ingest.backup.backup`) into another fresh store.
* Incremental: the guest rewrites ``--change-fraction`` of the disk in scattered
  64 KiB-1 MiB extents (fixed seed per run), then `back_up_vm` takes the next point
  (CBT's changed areas since the full). MiB/s over the changed bytes, against curl
  fetching the same ranges the backup fetched.
* Every run starts from fresh stores (its own full first); each figure is the median
  of ``--runs``. The simulator serves the disk files from the page cache for both ours
  and curl (the file was just written or read). An untimed check compares each
  incremental point with the local copy byte for byte, so no figure is of wrong data.

Targets: ours >= 0.8x curl's throughput, full and incremental. The local ingest is
context: how much of the gap is the store's own work (BLAKE3 and zstd on 2 cores, which
the HTTP readers and the simulator need as well).
Output: one JSON line per comparison on stdout (medians, plus each run); logs on stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from appliance.ingest.backup import backup  # noqa: E402
from appliance.jobs import Job  # noqa: E402
from appliance.protection.intents import Intents  # noqa: E402
from appliance.protection.job import BackupOptions, BackupResult, back_up_vm  # noqa: E402
from appliance.store.reader import ReadPath  # noqa: E402
from appliance.store.repository import Store, init_store, open_store  # noqa: E402
from appliance.vsphere.client import Session  # noqa: E402
from appliance.vsphere.endpoints import endpoint_for  # noqa: E402
from appliance.vsphere.transfer import DatastoreFile, FolderTransport, folder_target  # noqa: E402
from tests.bench.ingest import add_run_arguments, image_bytes, log, medians, work_directory  # noqa: E402
from tests.vcsim import FolderRequest, Vcsim, running_vcsim  # noqa: E402

MIB = 1 << 20
VM = "bench"
HOST = "DC0_H0"  # make_vm's host: the transport reads there, as the backup does
SEED = 20240614
STREAMS = BackupOptions().streams
#: Shares of the image's 1 MiB blocks that are zeros and copies of one block (the rest is random).
ZERO_SHARE, REPEATED_SHARE = 0.10, 0.10
EXTENT_ALIGN = 4096
SMALLEST_EXTENT, LARGEST_EXTENT = 64 * 1024, MIB
CHECK_PIECE = 64 * MIB


def write_image(path: Path, size: int, seed: int) -> None:
    """The disk's first content, 1 MiB at a time: random, zero or one repeated block."""
    rng = random.Random(seed)
    repeated = rng.randbytes(MIB)
    with open(path, "wb") as image:
        for offset in range(0, size, MIB):
            roll = rng.random()
            length = min(MIB, size - offset)
            if roll < ZERO_SHARE:
                image.write(bytes(length))
            elif roll < ZERO_SHARE + REPEATED_SHARE:
                image.write(repeated[:length])
            else:
                image.write(rng.randbytes(length))


def scattered_extents(size: int, fraction: float, rng: random.Random) -> list[tuple[int, int]]:
    """Disjoint (offset, length) extents of 64 KiB-1 MiB (4 KiB aligned) covering ~`fraction` of the disk."""
    budget, taken = int(size * fraction), 0
    extents: list[tuple[int, int]] = []
    while taken < budget:
        length = rng.randrange(SMALLEST_EXTENT, LARGEST_EXTENT + 1, EXTENT_ALIGN)
        offset = rng.randrange(0, size - length + 1, EXTENT_ALIGN)
        if any(offset < start + used and start < offset + length for start, used in extents):
            continue
        extents.append((offset, length))
        taken += length
    return sorted(extents)


def guest_rewrites(vcsim: Vcsim, image: Path, fraction: float, seed: int) -> int:
    """The guest rewrites ~`fraction` of its disk with random bytes; the local copy follows. Bytes written."""
    rng = random.Random(seed)
    written = 0
    with open(image, "r+b") as local:
        for offset, length in scattered_extents(image.stat().st_size, fraction, rng):
            data = rng.randbytes(length)
            vcsim.guest_write(VM, 0, offset, data)
            local.seek(offset)
            local.write(data)
            written += length
    return written


@dataclass(frozen=True)
class RangeRead:
    file: DatastoreFile
    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1


def disk_reads(requests: list[FolderRequest]) -> list[RangeRead]:
    """The ranged GETs among a backup's /folder requests (its disk reads; the .vmx and descriptor go whole)."""
    reads = []
    for request in requests:
        if request.method == "GET" and request.range.startswith("bytes=") and request.status == 206:
            query = parse_qs(request.query)
            file = DatastoreFile(query["dcPath"][0], query["dsName"][0], request.path.removeprefix("/folder/"))
            first, _, last = request.range.removeprefix("bytes=").partition("-")
            reads.append(RangeRead(file, int(first), int(last)))
    return reads


def curl_replay(vcsim: Vcsim, cookie: str, reads: list[RangeRead], config: Path) -> float:
    """Seconds for one curl process, 4 transfers at once, to fetch `reads` to /dev/null; every answer checked."""
    parts = urlsplit(vcsim.url)
    origin = f"{parts.scheme}://{parts.netloc}"
    blocks = [f'url = "{origin}{folder_target(read.file)}"\nrange = "{read.first}-{read.last}"\n'
              f'output = "/dev/null"\nheader = "Cookie: {cookie}"\ninsecure\nsilent\nshow-error\n'
              'write-out = "%{http_code} %{size_download}\\n"\n' for read in reads]
    config.write_text("next\n".join(blocks))
    started = time.perf_counter()
    proc = subprocess.run(["curl", "--parallel", "--parallel-max", str(STREAMS), "--config", str(config)],
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    answers = sorted(proc.stdout.split("\n")[:-1])
    expected = sorted(f"206 {read.length}" for read in reads)
    if proc.returncode != 0 or answers != expected:
        raise SystemExit(f"bench: curl exited with {proc.returncode} ({proc.stderr.strip()[:500]}); "
                         f"{len(answers)} answers for {len(reads)} ranges, first {answers[:3]}")
    return seconds


def transport_replay(session: Session, reads: list[RangeRead]) -> float:
    """Seconds for our transport alone (4 threads, as the backup's readers) to fetch `reads`, nothing stored:
    which part of the gap to curl is the HTTP client and which the store's work."""
    transport = FolderTransport(session, endpoint_for(session, HOST))
    try:
        with ThreadPoolExecutor(max_workers=STREAMS) as pool:
            started = time.perf_counter()
            got = sum(pool.map(lambda read: len(transport.read_range(read.file, read.first, read.length)), reads))
            seconds = time.perf_counter() - started
    finally:
        transport.close()
    if got != sum(read.length for read in reads):
        raise SystemExit(f"bench: our transport read {got} bytes of {sum(read.length for read in reads)}")
    return seconds


def fresh_store(path: Path) -> Store:
    init_store(path)
    return open_store(path)


def timed_backup(store: Store, session: Session, vcsim: Vcsim, name: str) -> tuple[BackupResult, float, float,
                                                                                 list[RangeRead]]:
    """One `back_up_vm`: its result, wall seconds, its ingest step's seconds and the ranges it read."""
    job = Job(id=f"bench-{name}-{random.randrange(1 << 32):08x}", kind="backup", params={}, created=time.time())
    logged = len(vcsim.folder_requests())
    started = time.perf_counter()
    result = back_up_vm(store, session, "vc", VM, BackupOptions(), job, Intents(store.path / "backup-intents"))
    seconds = time.perf_counter() - started
    ingest_seconds = next(step.seconds for step in job.steps if step.name == "ingest") or 0.0
    reads = disk_reads(vcsim.folder_requests()[logged:])
    if sum(read.length for read in reads) != result.bytes_read:
        raise SystemExit(f"bench: the /folder log holds {len(reads)} ranges that do not add up to the "
                         f"{result.bytes_read} bytes the backup read")
    log(f"ours {name}: {seconds:.2f}s ({ingest_seconds:.2f}s ingesting), {result.bytes_read / MIB:.0f} MiB "
        f"in {len(reads)} ranges")
    return result, seconds, ingest_seconds, reads


def check_point(store: Store, result: BackupResult, image: Path) -> None:
    """The point holds exactly the local copy's bytes."""
    with ReadPath(store) as read_path, open(image, "rb") as local:
        disk = read_path.disk(result.point, 0)
        for offset in range(0, disk.size, CHECK_PIECE):
            length = min(CHECK_PIECE, disk.size - offset)
            if disk.read(offset, length) != local.read(length):
                raise SystemExit(f"bench: point {result.point.id} differs from the image near byte {offset}")


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds


def measure(run_dir: Path, vcsim: Vcsim, session: Session, image: Path, fraction: float,
            seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run: full (ours, curl, local ingest), then the guest's rewrites and the incremental (ours, curl)."""
    run_dir.mkdir()
    cookie = session.cookie()
    with fresh_store(run_dir / "store") as store:
        result, seconds, ingest_seconds, reads = timed_backup(store, session, vcsim, "full")
        curl_seconds = curl_replay(vcsim, cookie, reads, run_dir / "curl-full.conf")
        transport_seconds = transport_replay(session, reads)
        log(f"curl full: {curl_seconds:.2f}s; our transport alone: {transport_seconds:.2f}s")
        with fresh_store(run_dir / "local") as local_store:
            started = time.perf_counter()
            backup(local_store, VM, [image])
            local_seconds = time.perf_counter() - started
        shutil.rmtree(run_dir / "local")
        log(f"local ingest: {local_seconds:.2f}s")
        allocated = result.bytes_read
        full = {"ours_s": seconds, "ours_mib_s": mib_s(allocated, seconds), "ours_ingest_step_s": ingest_seconds,
                "curl_s": curl_seconds, "curl_mib_s": mib_s(allocated, curl_seconds),
                "ratio": curl_seconds / seconds, "transport_only_s": transport_seconds,
                "transport_only_mib_s": mib_s(allocated, transport_seconds),
                "ratio_transport_only": curl_seconds / transport_seconds, "local_ingest_s": local_seconds,
                "local_ingest_mib_s": mib_s(allocated, local_seconds), "ratio_local": local_seconds / seconds,
                "allocated_bytes": allocated, "requests": len(reads)}

        written = guest_rewrites(vcsim, image, fraction, seed)
        result, seconds, ingest_seconds, reads = timed_backup(store, session, vcsim, "incremental")
        if [plan.mode for plan in result.disks] != ["incremental"]:
            raise SystemExit(f"bench: the second backup was {[plan.mode for plan in result.disks]}, not incremental")
        curl_seconds = curl_replay(vcsim, cookie, reads, run_dir / "curl-incremental.conf")
        log(f"curl incremental: {curl_seconds:.2f}s")
        check_point(store, result, image)
        changed = sum(plan.changed_bytes for plan in result.disks)
        incremental = {"ours_s": seconds, "ours_mib_s": mib_s(changed, seconds), "ours_ingest_step_s": ingest_seconds,
                       "curl_s": curl_seconds, "curl_mib_s": mib_s(changed, curl_seconds),
                       "ratio": curl_seconds / seconds, "guest_written_bytes": written, "changed_bytes": changed,
                       "read_bytes": result.bytes_read, "requests": len(reads)}
    shutil.rmtree(run_dir)
    return full, incremental


def report(case: str, runs: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    figures = {key: round(value, 3) if isinstance(value, float) else value for key, value in medians(runs).items()}
    line = {"bench": "vsphere_backup", "case": case, **extra, **figures, "target_met": figures["ratio"] >= 0.8}
    line["per_run"] = [{key: round(value, 3) for key, value in run.items()} for run in runs] if len(runs) > 1 else []
    print(json.dumps(line), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="the VM's disk size")
    parser.add_argument("--change-fraction", type=float, default=0.05, help="share of the disk the guest rewrites")
    add_run_arguments(parser, runs=3, kept="the image and the simulator's files")
    args = parser.parse_args()
    size = image_bytes(args.size_gib)
    work = work_directory(parser, args.work, "vsphere-backup-bench-")
    try:
        image = work / "disk.img"
        write_image(image, size, SEED)
        (work / "vcsim").mkdir()
        with running_vcsim(work / "vcsim") as vcsim:
            vcsim.make_vm(VM, [size])
            with open(image, "rb") as content:
                vcsim.guest_write(VM, 0, 0, content)
            log(f"VM {VM}: {size / MIB:.0f} MiB written by its guest")
            session = Session(vcsim.settings())
            try:
                fulls, incrementals = [], []
                for number in range(args.runs):
                    log(f"run {number + 1} of {args.runs}")
                    full, incremental = measure(work / f"run-{number}", vcsim, session, image,
                                                args.change_fraction, SEED + 1 + number)
                    fulls.append(full)
                    incrementals.append(incremental)
            finally:
                session.close()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    common = {"disk_bytes": size, "streams": STREAMS, "runs": args.runs}
    report("full", fulls, common)
    report("incremental", incrementals, {**common, "change_fraction": args.change_fraction})
    return 0


if __name__ == "__main__":
    sys.exit(main())
