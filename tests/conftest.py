"""Shared fixtures: throwaway stores and disk images in tmp_path, and CLI runners."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from appliance.store import Store, init_store, open_store

BLOCK = 64 << 10
SMALL_CHUNK = 64 << 10  # small chunks make small test images exercise many chunks


def write_image(path: Path, size: int, seed: int = 0) -> Path:
    """A disk-like image: zeros, text, random and repeated 64 KiB blocks."""
    rng = random.Random(seed)
    repeated = rng.randbytes(BLOCK)
    with open(path, "wb") as image:
        image.truncate(size)
        for offset in range(0, size, BLOCK):
            kind = rng.random()
            length = min(BLOCK, size - offset)
            if kind < 0.25:
                continue
            if kind < 0.5:
                block = (b"line %d of a text file\n" % offset) * (BLOCK // 20)
            elif kind < 0.8:
                block = rng.randbytes(BLOCK)
            else:
                block = repeated
            image.seek(offset)
            image.write(block[:length])
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def store_factory(tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """Builds initialised stores under tmp_path; closes them at teardown."""
    opened: list[Store] = []

    def make(name: str = "store", chunk_size: int = SMALL_CHUNK) -> Store:
        path = tmp_path / name
        init_store(path, chunk_size=chunk_size)
        store = open_store(path)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: Callable[..., Store]) -> Store:
    return store_factory()


def run_cli(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real `appliance` entry point in a child process."""
    result = subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result
