"""A synthesized catalog of many VMs and restore points, committed through the real ingest.

What `tests/bench/scale.py` measures against: a store as a site with many VMs backed up
daily for weeks holds it, built in a minute instead of a month. Every point goes through
`appliance.ingest.backup.ingest`, the function a backup calls, with disks that are made
up as they are read:

* A VM's first point is a full backup. A fraction `allocated` of its disk's chunk slots
  hold data, all of it from a pool of `pool_chunks` chunks every VM shares (the guest OS
  and applications: these dedup across VMs), except `new_per_point` chunks no other
  point has; the other slots were never written and read as unallocated, so ingest skips
  them as it skips a thin disk's holes.
* Each later point is an incremental of the one before, with changed areas (as CBT
  gives them): a fraction `changed` of the slots, rewritten with pool chunks (dedup) and
  `new_per_point` new chunks.

A chunk's bytes are its number expanded by BLAKE3's XOF into half a chunk, then zeros,
so zstd stores it at about half its size and no two numbers share bytes. Points are
committed one VM after another, day by day (every VM's first point, then every VM's
second...), as a nightly schedule would. Logical bytes = VMs x points x disk size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import blake3

from appliance.ingest.backup import ingest
from appliance.store import init_store, open_store
from appliance.store.repository import DEFAULT_CHUNK_SIZE

ZERO = 0  # a slot never written
VMX = 'config.version = "8"\nvirtualHW.version = "19"\ndisplayName = "{vm}"\nguestOS = "other-64"\n'


@dataclass(frozen=True)
class Shape:
    """How many of what: the bench's parameters."""

    vms: int = 40
    points: int = 25
    logical_tib: float = 1.0
    allocated: float = 0.3
    changed: float = 0.005
    pool_chunks: int = 256
    new_per_point: int = 2
    chunk_size: int = DEFAULT_CHUNK_SIZE
    seed: int = 18

    @property
    def disk_bytes(self) -> int:
        """Each VM's disk: the logical total spread over every point, rounded up to whole chunks."""
        share = int(self.logical_tib * (1 << 40)) // (self.vms * self.points)
        return -(-share // self.chunk_size) * self.chunk_size

    @property
    def slots(self) -> int:
        return self.disk_bytes // self.chunk_size

    @property
    def logical_bytes(self) -> int:
        return self.disk_bytes * self.vms * self.points


def vm_name(number: int) -> str:
    return f"vm-{number:03d}"


class SyntheticDisk:
    """An `IngestSource` whose slots are chunk numbers: ZERO reads as unallocated."""

    format = "raw"

    def __init__(self, name: str, keys: list[int], chunk_size: int) -> None:
        self.path = f"synthetic:{name}"
        self.size = len(keys) * chunk_size
        self._keys = keys
        self._chunk_size = chunk_size

    def read(self, offset: int, length: int) -> bytes:
        """The bytes at `offset` (ingest reads one slot at a time; the bench checks longer runs)."""
        end = min(offset + length, self.size)
        first, last = offset // self._chunk_size, -(-end // self._chunk_size)
        data = b"".join(chunk_bytes(key, self._chunk_size) if key != ZERO else bytes(self._chunk_size)
                        for key in self._keys[first:last])
        start = offset - first * self._chunk_size
        return data[start : start + end - offset]

    def is_unallocated(self, offset: int, length: int) -> bool:
        return self._keys[offset // self._chunk_size] == ZERO


@lru_cache(maxsize=512)
def chunk_bytes(key: int, chunk_size: int) -> bytes:
    """Chunk number `key`'s bytes: half pseudo-random, half zeros (zstd halves it)."""
    half = chunk_size // 2
    return blake3.blake3(key.to_bytes(8, "little")).digest(length=half) + bytes(chunk_size - half)


class _Numbers:
    """Chunk numbers: 1..pool for the shared pool, then one new number per unique chunk."""

    def __init__(self, shape: Shape) -> None:
        self._shape = shape
        self._next = shape.pool_chunks + 1

    def pooled(self, rng: random.Random) -> int:
        return rng.randint(1, self._shape.pool_chunks)

    def new(self) -> int:
        self._next += 1
        return self._next - 1


def _first_keys(shape: Shape, rng: random.Random, numbers: _Numbers) -> list[int]:
    """A full backup's slots: the allocated ones in runs from the start (an OS install), then holes."""
    keys = [ZERO] * shape.slots
    for slot in range(int(shape.slots * shape.allocated)):
        keys[slot] = numbers.pooled(rng)
    for slot in rng.sample(range(shape.slots), min(shape.new_per_point, shape.slots)):
        keys[slot] = numbers.new()
    return keys


def _change(shape: Shape, keys: list[int], rng: random.Random, numbers: _Numbers) -> list[int]:
    """Rewrite a fraction of the slots in place; the slots changed, in order."""
    count = max(shape.new_per_point, int(shape.slots * shape.changed))
    slots = sorted(rng.sample(range(shape.slots), min(count, shape.slots)))
    for position, slot in enumerate(slots):
        keys[slot] = numbers.new() if position < shape.new_per_point else numbers.pooled(rng)
    return slots


def build_catalog(path: Path, shape: Shape) -> dict[str, tuple[str, SyntheticDisk]]:
    """Initialise a store at `path` and commit every point of `shape`.

    Returns each VM's newest point id and its disk, whose `read` gives the bytes the
    store must serve for that point (the bench checks what NFS returns against it).
    """
    init_store(path, chunk_size=shape.chunk_size)
    rng = random.Random(shape.seed)
    numbers = _Numbers(shape)
    disks: list[list[int]] = []
    newest: list[str] = []
    with open_store(path) as store:
        for day in range(shape.points):
            for number in range(shape.vms):
                vm = vm_name(number)
                if day == 0:
                    disks.append(_first_keys(shape, rng, numbers))
                    point = ingest(store, vm, [SyntheticDisk(vm, disks[number], shape.chunk_size)],
                                   {f"{vm}.vmx": VMX.format(vm=vm).encode()})
                    newest.append(point.id)
                else:
                    slots = _change(shape, disks[number], rng, numbers)
                    areas = [(slot * shape.chunk_size, shape.chunk_size) for slot in slots]
                    point = ingest(store, vm, [SyntheticDisk(vm, disks[number], shape.chunk_size)], {},
                                   parent_ref=newest[number], changed=[areas])
                    newest[number] = point.id
    return {vm_name(n): (newest[n], SyntheticDisk(vm_name(n), disks[n], shape.chunk_size))
            for n in range(shape.vms)}
