#!/usr/bin/env python3
"""S3 store benchmark against a real SeaweedFS on loopback (started here, stopped at the end).

What is measured, and why:

* Client: 256 KiB ranged GETs (the store's default chunk size, so one chunk read) of
  random offsets in one 64 MiB object (a full pack), by obstore and by boto3, each from
  ``--threads`` threads (the read path's workers), ``--gets`` GETs per run. Throughput
  in GETs/s; the figure that chose the client (README "Dependencies and why").
* Store: a backup, then a full restore, of a ``--size-mib`` image (the demo image:
  zero, text, random and repeated blocks) into a fresh store with packs in a local
  directory and with packs in the bucket. Seconds, medians of ``--runs``.

Both sides run on this machine's 2 cores, so the engine competes with the client for
CPU: the figures bound what a remote engine would give from above for the client's
cost and from below for the engine's.
Output: one JSON line on stdout (medians, plus each run); logs on stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import boto3  # noqa: E402
import obstore  # noqa: E402
from botocore.config import Config  # noqa: E402

from appliance.demo import make_demo_image  # noqa: E402
from appliance.ingest.backup import backup  # noqa: E402
from appliance.restore import restore_disk  # noqa: E402
from appliance.store import init_store, open_store  # noqa: E402
from tests.s3_engines import ACCESS_KEY, BUCKET, SECRET_KEY, S3Engine  # noqa: E402
from tests.seaweed import SeaweedS3  # noqa: E402

GET_SIZE = 256 << 10
OBJECT_SIZE = 64 << 20


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def gets_per_second(get: Callable[[int], bytes], gets: int, threads: int) -> float:
    offsets = [random.Random(seed).randrange(0, OBJECT_SIZE - GET_SIZE) for seed in range(gets)]
    share = [offsets[i::threads] for i in range(threads)]

    def run(mine: list[int]) -> None:
        for offset in mine:
            assert len(get(offset)) == GET_SIZE

    workers = [threading.Thread(target=run, args=(mine,)) for mine in share]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return gets / (time.perf_counter() - started)


def client_runs(engine: S3Engine, runs: int, gets: int, threads: int) -> dict[str, list[float]]:
    key = f"bench/{uuid.uuid4().hex}.pack"
    store = engine.client()
    obstore.put(store, key, random.randbytes(OBJECT_SIZE), use_multipart=False)
    s3 = boto3.client("s3", endpoint_url=engine.endpoint, aws_access_key_id=ACCESS_KEY,
                      aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                      config=Config(max_pool_connections=threads * 2, s3={"addressing_style": "path"}))

    def by_obstore(offset: int) -> bytes:
        return bytes(obstore.get_range(store, key, start=offset, length=GET_SIZE))

    def by_boto3(offset: int) -> bytes:
        answer = s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={offset}-{offset + GET_SIZE - 1}")
        return bytes(answer["Body"].read())

    results: dict[str, list[float]] = {"obstore": [], "boto3": []}
    for run in range(runs):
        for name, get in (("obstore", by_obstore), ("boto3", by_boto3)):
            results[name].append(gets_per_second(get, gets, threads))
            log(f"run {run + 1}: {name} {results[name][-1]:.0f} GETs/s")
    return results


def store_runs(engine: S3Engine, work: Path, runs: int, size_mib: int) -> dict[str, dict[str, list[float]]]:
    image = work / "disk.img"
    make_demo_image(image, size_mib << 20, 7)
    expected = image.read_bytes()
    results: dict[str, dict[str, list[float]]] = {name: {"backup": [], "restore": []} for name in ("local", "s3")}
    for run in range(runs):
        for name in ("local", "s3"):
            path = work / f"{name}-{run}"
            init_store(path, s3=engine.location(f"bench-{uuid.uuid4().hex[:12]}/") if name == "s3" else None)
            with open_store(path) as store:
                started = time.perf_counter()
                point = backup(store, "vm", [image])
                results[name]["backup"].append(time.perf_counter() - started)
                out = work / f"{name}-{run}.img"
                started = time.perf_counter()
                restore_disk(store, point, 0, out)
                results[name]["restore"].append(time.perf_counter() - started)
            assert out.read_bytes() == expected, f"{name} restore differs"
            out.unlink()
            log(f"run {run + 1}: {name} backup {results[name]['backup'][-1]:.2f} s, "
                f"restore {results[name]['restore'][-1]:.2f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gets", type=int, default=400)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3-bench-") as temp:
        work = Path(temp)
        engine = SeaweedS3(work / "seaweedfs")
        engine.start()
        try:
            clients = client_runs(engine, args.runs, args.gets, args.threads)
            stores = store_runs(engine, work, args.runs, args.size_mib)
        finally:
            engine.stop()
    median: dict[str, Any] = {f"{name}_gets_per_s": round(statistics.median(values))
                              for name, values in clients.items()}
    median["obstore_over_boto3"] = round(median["obstore_gets_per_s"] / median["boto3_gets_per_s"], 2)
    for name, phases in stores.items():
        for phase, values in phases.items():
            median[f"{name}_{phase}_s"] = round(statistics.median(values), 2)
    print(json.dumps({"median": median, "runs": {"clients": clients, "stores": stores},
                      "get_size": GET_SIZE, "threads": args.threads, "image_mib": args.size_mib}))


if __name__ == "__main__":
    main()
