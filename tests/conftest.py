"""Shared fixtures: throwaway stores and disk images in tmp_path, and CLI runners."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from appliance.demo import make_demo_image, sha256_file
from appliance.hypervisor import QemuGuest
from appliance.store import Store, init_store, open_store

BLOCK = 64 << 10
sha256_of = sha256_file  # the tests' name for it
SMALL_CHUNK = 64 << 10  # small chunks make small test images exercise many chunks


def write_image(path: Path, size: int, seed: int = 0) -> Path:
    """A disk-like image: zero, text, random and repeated 64 KiB blocks (the demo's)."""
    make_demo_image(path, size, seed)
    return path


MIB = 1 << 20
#: Layout of the disk that the source-reader tests convert with qemu-img: a sector
#: multiple, not a multiple of 1 MiB nor of the 64 KiB VMDK grain.
MIXED_IMAGE_SIZE = 5 * MIB + 12 * 1024
MIXED_ZERO_REGION = (MIB, 3 * MIB)
READ_PIECE_SIZES = [[MIB], [1, 511, 65537, 777777, 12293]]


def mixed_image(seed: int) -> bytes:
    """Random, zero and repeated regions, with data running into the partial last grain."""
    rng = random.Random(seed)
    image = bytearray(MIXED_IMAGE_SIZE)
    image[0:MIB] = rng.randbytes(MIB)
    pattern = b"instant-recovery" * (300_000 // 16)
    image[3 * MIB : 3 * MIB + len(pattern)] = pattern
    image[4 * MIB + 5000 :] = rng.randbytes(MIXED_IMAGE_SIZE - 4 * MIB - 5000)
    return bytes(image)


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


def run_cli(*args: str | bytes, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real `appliance` entry point in a child process (bytes arguments go as they are)."""
    result = subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(map(os.fsdecode, args))} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.fixture
def guests() -> Iterator[list[QemuGuest]]:
    """Guests a test boots; any still running at teardown are powered off."""
    booted: list[QemuGuest] = []
    yield booted
    for guest in booted:
        guest.power_off(timeout=1)
