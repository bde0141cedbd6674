#!/usr/bin/env python3
"""File-level recovery benchmark: browsing and extracting files from a backed-up ext4 disk.

What is measured, and why:

* The disk: an ext4 file system (``mkfs.ext4 -d``) of ``--files`` small files (1-16 KiB,
  100 to a folder) and a few 8 MiB files, backed up ``--points`` times (the same image:
  dedup makes each point cheap, and every point holds the same tree to search).
* First listing: `appliance files ls` of the volume's root, in process, with a fresh read
  path (its chunk cache empty) and the page cache dropped: what an operator waits for
  when they open a point. Target < 1 s.
* Tree listing: every entry of the tree, walked the same way, against ``7z l`` of the raw
  image (7-Zip reads ext4 from a file).
* Extraction: the whole tree streamed as a tar (`write_archive` to /dev/null) against
  ``debugfs -R "rdump / DIR"`` and ``7z x`` of the raw image; and one 8 MiB file alone,
  with the store bytes it needed (chunks read x chunk size) over its size. Target <= 2x.
* Search: `search` for one name across all points, with every point's index built and
  with none (walking each point's file system). Target: well under 1 s with the index.

Every figure is the median of ``--runs`` runs; each run starts cold (fresh read path,
page cache dropped when root). Output: JSON lines on stdout, one per comparison, with
both figures and their ratio; logs on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from appliance.flr.browse import PointFiles, walk  # noqa: E402
from appliance.flr.extract import write_archive  # noqa: E402
from appliance.flr.index import build_index, search  # noqa: E402
from appliance.store import open_store  # noqa: E402
from appliance.store.reader import ReadPath  # noqa: E402

BIG_FILE_BYTES = 8 << 20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: runs are warmer, for ours and the peers alike


def build_tree(root: Path, files: int, seed: int) -> None:
    rng = random.Random(seed)
    for index in range(files):
        folder = root / f"d{index // 100:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file-{index:06d}.txt").write_bytes(rng.randbytes(rng.randint(1, 16) * 1024))
    for index in range(4):
        (root / f"big-{index}.bin").write_bytes(rng.randbytes(BIG_FILE_BYTES))


def timed(function: Callable[[], object]) -> float:
    drop_page_cache()
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def median_of(runs: int, function: Callable[[], object]) -> float:
    return statistics.median(timed(function) for _ in range(runs))


def line(name: str, ours: float, peer_name: str, peer: float, unit: str = "s", **extra: object) -> None:
    print(json.dumps({"figure": name, "ours": round(ours, 4), "peer": peer_name, "peer_value": round(peer, 4),
                      "unit": unit, "ratio": round(ours / peer, 3) if peer else None, **extra}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", help="work directory (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-flr-"))
    image, store_path = work / "ext4.img", work / "store"
    if not image.exists():
        log(f"building {args.files} files into {image}")
        build_tree(work / "tree", args.files, seed=15)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(work / "tree"), str(image), "256M"], check=True)
    if not store_path.exists():
        appliance = [sys.executable, "-m", "appliance", "--store", str(store_path)]
        subprocess.run([*appliance, "init"], check=True, capture_output=True)
        for _ in range(args.points):
            subprocess.run([*appliance, "backup", "--vm", "bench", str(image)], check=True, capture_output=True)
    with open_store(store_path) as store:
        with store.env.begin() as txn:
            points = store.catalog.vm_points(txn, "bench")
        chunk_size = store.config.chunk_size

        def first_listing() -> None:
            with ReadPath(store) as read_path:
                _, filesystem = PointFiles(read_path, points[-1]).filesystem(0, None)
                filesystem.children(filesystem.node("/"))

        def tree_listing() -> int:
            with ReadPath(store) as read_path:
                _, filesystem = PointFiles(read_path, points[-1]).filesystem(0, None)
                return sum(1 for _ in walk(filesystem, filesystem.node("/")))

        def dump_tree() -> None:
            with ReadPath(store) as read_path, open(os.devnull, "wb") as sink:
                _, filesystem = PointFiles(read_path, points[-1]).filesystem(0, None)
                write_archive(filesystem, filesystem.node("/"), sink, "tar")

        read_fraction: list[float] = []

        def extract_one() -> None:
            with ReadPath(store) as read_path, open(os.devnull, "wb") as sink:
                files = PointFiles(read_path, points[-1])
                _, filesystem = files.filesystem(0, None)
                node = filesystem.node("/big-2.bin")
                before = files.chunks_read
                with filesystem.open(node) as source:
                    while block := source.read(1 << 20):
                        sink.write(block)
                read_fraction.append((files.chunks_read - before) * chunk_size / node.size)

        entries = tree_listing()
        line("first listing of the volume root", median_of(args.runs, first_listing), "target", 1.0,
             files=args.files)
        seven_list = median_of(args.runs, lambda: subprocess.run(["7z", "l", str(image)], check=True,
                                                                 capture_output=True))
        line("tree listing", median_of(args.runs, tree_listing), "7z l (raw image)", seven_list, entries=entries)
        out = work / "out"

        def rdump() -> None:
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir()
            subprocess.run(["debugfs", "-R", f"rdump / {out}", str(image)], check=True, capture_output=True)

        def seven_extract() -> None:
            subprocess.run(["rm", "-rf", str(out)], check=True)
            subprocess.run(["7z", "x", "-y", f"-o{out}", str(image)], check=True, capture_output=True)

        ours_dump = median_of(args.runs, dump_tree)
        line("extract the whole tree", ours_dump, "debugfs rdump (raw image)", median_of(args.runs, rdump))
        line("extract the whole tree", ours_dump, "7z x (raw image)", median_of(args.runs, seven_extract))
        line("extract one 8 MiB file", median_of(args.runs, extract_one), "store bytes read / file size target", 2.0,
             read_over_size=round(statistics.median(read_fraction), 3))

        name = "file-004242.txt"
        with ReadPath(store) as read_path:
            walked = median_of(args.runs, lambda: list(search(store, read_path, points, name)))
            log(f"indexing {len(points)} points")
            for point in points:
                build_index(store, read_path, point)
            indexed = median_of(args.runs, lambda: list(search(store, read_path, points, name)))
        with store.env.begin(write=True) as txn:  # the next run of the benchmark measures the walk again
            for point in points:
                store.catalog.drop_file_index(txn, point.id)
        line(f"find across {len(points)} points", indexed, "the same without indexes", walked,
             hits=len(points))


if __name__ == "__main__":
    main()
