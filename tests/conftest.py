"""Shared fixtures: throwaway stores and disk images in tmp_path, and CLI runners."""

from __future__ import annotations

import os
import random
import uuid
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import obstore
import pytest
from _pytest.mark.structures import ParameterSet

from appliance.demo import make_demo_image, sha256_file
from appliance.hypervisor import QemuGuest
from appliance.store import Store, formats, init_store, open_store
from appliance.store.packs import LocalPackDirectory
from appliance.store.s3 import S3PackBackend
from tests.ceph import CephRgw
from tests.s3_engines import S3Engine
from tests.seaweed import SeaweedS3

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


#: The fixture of each S3 engine, by the parameter that names it in test ids: "s3" is SeaweedFS (the
#: normal suite's engine, named before there was a second), "ceph" is Ceph RGW.
ENGINE_FIXTURES = {"s3": "seaweedfs_engine", "ceph": "ceph_engine"}


def engine_params(config: pytest.Config) -> list[ParameterSet]:
    """SeaweedFS always; Ceph only when `-m` names the `ceph` marker (the slower CI job), so the normal
    suite neither starts a Ceph cluster nor lists its tests as deselected."""
    params = [pytest.param("s3")]
    if "ceph" in (config.option.markexpr or ""):
        params.append(pytest.param("ceph", marks=pytest.mark.ceph))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `store_backends` that use a store run once per pack backend, and tests that use an S3
    engine once per engine: the same test, not a copy."""
    if "store_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("store_backends"):
        metafunc.parametrize("store_backend", ["local", *engine_params(metafunc.config)], indirect=True)
    elif "s3_engine" in metafunc.fixturenames:
        metafunc.parametrize("s3_engine", engine_params(metafunc.config), indirect=True)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """Where `store_factory` puts packs: "local" unless a `store_backends` test asks for an S3 engine too."""
    return str(getattr(request, "param", "local"))


def engine_of(request: pytest.FixtureRequest, store_backend: str) -> S3Engine | None:
    """The running engine a `store_backend` value names (None for "local"); an unknown name is a KeyError,
    never a silent fall back to local packs."""
    if store_backend == "local":
        return None
    engine: S3Engine = request.getfixturevalue(ENGINE_FIXTURES[store_backend])
    return engine


@pytest.fixture(scope="session")
def seaweedfs_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Engine]:
    yield from _running(SeaweedS3(tmp_path_factory.mktemp("seaweedfs")))


@pytest.fixture(scope="session")
def ceph_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Engine]:
    yield from _running(CephRgw(tmp_path_factory.mktemp("ceph")))


def _running(engine: S3Engine) -> Iterator[S3Engine]:
    """One engine for the whole session (they take seconds to start), started by the first test that
    needs it; each store takes a fresh prefix."""
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def s3_engine(request: pytest.FixtureRequest) -> S3Engine:
    """The engine this test's parameter names (SeaweedFS when it has none)."""
    engine: S3Engine = request.getfixturevalue(ENGINE_FIXTURES[getattr(request, "param", "s3")])
    return engine


@pytest.fixture
def store_factory(tmp_path: Path, store_backend: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Store]]:
    """Builds initialised stores under tmp_path (packs in the named S3 engine unless "local"); closes them
    at teardown."""
    opened: list[Store] = []

    def make(name: str = "store", chunk_size: int = SMALL_CHUNK) -> Store:
        path = tmp_path / name
        engine = engine_of(request, store_backend)
        s3 = engine.location(f"{uuid.uuid4().hex[:12]}/{name}/") if engine else None
        init_store(path, chunk_size=chunk_size, s3=s3, gc_grace_seconds=0.0)
        store = open_store(path)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def record_holding(data: bytes) -> bytes:
    """A pack record of `data`, uncompressed: what a test appends to a pack of its own."""
    return formats.encode_record(formats.chunk_id(data), formats.COMPRESSION_NONE, data, len(data))


def pack_bytes(store: Store, pack_id: int) -> bytes:
    """A sealed pack's bytes, read past the store (tests damage them)."""
    packs = store.packs
    if isinstance(packs, S3PackBackend):
        return bytes(obstore.get(packs.client, packs.key_of(pack_id)).bytes())
    assert isinstance(packs, LocalPackDirectory)
    return packs.path_of(pack_id).read_bytes()


def replace_pack(store: Store, pack_id: int, data: bytes | None) -> None:
    """Overwrite a sealed pack with `data`, or remove it (None), as damage on disk or in the bucket would."""
    packs = store.packs
    if isinstance(packs, S3PackBackend):
        if data is None:
            obstore.delete(packs.client, packs.key_of(pack_id))
        else:
            obstore.put(packs.client, packs.key_of(pack_id), data)
        return
    assert isinstance(packs, LocalPackDirectory)
    if data is None:
        packs.path_of(pack_id).unlink()
    else:
        packs.path_of(pack_id).write_bytes(data)


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
