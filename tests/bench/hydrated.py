#!/usr/bin/env python3
"""Hydrated tier layout benchmark: our slab file + index against one file per chunk.

What is measured, and why:

* Ours: `appliance.store.hydrated.HydratedTier`, one sparse slab file of fixed slots and one
  index file of 64-byte records, read whole at start.
* The peer: the obvious alternative, one file per chunk fanned out as ``XX/YY/<chunk id>`` (65,536
  directories at most), each a 16-byte header (magic, xxh3-64 of the bytes) and the bytes, its
  index rebuilt at start by walking the tree (the names are the keys, one ``stat`` per file for
  its size, as eviction needs the bytes held). A hit opens, reads and closes the file and checks
  the xxh3, as ours preads and checks.
* Figures for ``--chunks`` chunks of ``--chunk-kib``: filling the tier (written, then ``sync``),
  opening it again (what a restart costs before serving warm), with the page cache dropped
  before it as after a reboot, and the mean time of a random hit, cold (page cache dropped) and
  warm. Both run in the same process on the same disk, one after the other, ``--runs`` times.

Output: one JSON line on stdout (medians over ``--runs``); logs on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import xxhash

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from appliance.store.hydrated import HydratedTier
from tests.bench.fuse import must_drop_page_cache
from tests.bench.ingest import add_run_arguments, log, medians, work_directory

STORE_ID = "00000000-0000-4000-8000-0000000bench"
MAGIC = b"IRHF"
HITS = 2000


def chunks(count: int, size: int) -> list[tuple[bytes, bytes]]:
    """Distinct chunk ids (BLAKE3-sized) and incompressible-enough bytes."""
    block = os.urandom(size)
    return [(xxhash.xxh3_128_digest(n.to_bytes(8, "big")) * 2, n.to_bytes(8, "big") + block[8:])
            for n in range(count)]


class FilePerChunk:
    """The peer layout: one file per chunk under a two-level fan-out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.index: dict[bytes, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        for top in os.scandir(root):
            for middle in os.scandir(top.path):
                for entry in os.scandir(middle.path):
                    self.index[bytes.fromhex(entry.name)] = entry.stat().st_size - 12

    def path(self, cid: bytes) -> str:
        name = cid.hex()
        return os.path.join(self.root, name[:2], name[2:4], name)

    def store(self, cid: bytes, data: bytes) -> None:
        path = self.path(cid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(MAGIC + xxhash.xxh3_64_digest(data) + data)
        self.index[cid] = len(data)

    def get(self, cid: bytes) -> bytes | None:
        if cid not in self.index:
            return None
        with open(self.path(cid), "rb") as handle:
            raw = handle.read()
        data = raw[12:]
        return data if raw[:4] == MAGIC and xxhash.xxh3_64_digest(data) == raw[4:12] else None

    def close(self) -> None:
        pass


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def one_layout(name: str, directory: Path, opener: Callable[[], Any], data: list[tuple[bytes, bytes]],
               rng: random.Random) -> dict[str, float]:
    tier = opener()

    def fill() -> None:
        for cid, payload in data:
            tier.store(cid, payload)
        tier.close()
        os.sync()

    fig: dict[str, float] = {}
    fig[f"{name}_fill_s"], _ = timed(fill)
    must_drop_page_cache()
    fig[f"{name}_open_s"], tier = timed(opener)
    picks = [rng.choice(data) for _ in range(HITS)]
    for state in ("cold", "warm"):
        if state == "cold":
            must_drop_page_cache()
        seconds, found = timed(lambda: [tier.get(cid) == payload for cid, payload in picks])
        assert all(found), f"{name}: a hit returned other bytes"
        fig[f"{name}_hit_{state}_us"] = 1e6 * seconds / HITS
    tier.close()
    fig[f"{name}_disk_bytes"] = float(sum(f.stat().st_blocks * 512 for f in directory.rglob("*") if f.is_file()))
    shutil.rmtree(directory)
    log(f"{name}: " + ", ".join(f"{key.removeprefix(name + '_')} {value:.4g}" for key, value in fig.items()))
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, runs=3, kept="nothing of interest")
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--chunk-kib", type=int, default=64, help="chunk size (the store's default is 256)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it drops the kernel page cache")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = work_directory(parser, args.work, "hydrated-bench-")
    size = args.chunk_kib << 10
    data = chunks(args.chunks, size)
    runs = []
    try:
        for number in range(args.runs):
            log(f"run {number + 1} of {args.runs}")
            fig = one_layout("slab", work / "slab", lambda: HydratedTier(work / "slab", (args.chunks + 16) * size,
                                                                        size, STORE_ID), data, random.Random(number))
            fig.update(one_layout("files", work / "files", lambda: FilePerChunk(work / "files"), data,
                                  random.Random(number)))
            runs.append(fig)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = medians(runs, 4)
    result = {"bench": "hydrated", "runs": args.runs, "chunks": args.chunks, "chunk_bytes": size, **figures,
              **{f"ratio_{what}": round(figures[f"slab_{what}"] / figures[f"files_{what}"], 3)
                 for what in ("fill_s", "open_s", "hit_cold_us", "hit_warm_us")}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
