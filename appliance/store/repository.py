"""Opening, initialising and locking a store directory.

Layout::

    STORE/config          magic + version header, then JSON settings (chunk size, ...)
    STORE/index/          LMDB environment: chunks, packs, vms, points, maps, files, meta
    STORE/packs/XX/*.pack sealed packs;  STORE/packs/tmp/ packs being written
                          (with an S3 backend, sealed packs are objects <prefix>packs/XX/*.pack
                          in the bucket the config names; packs/tmp/ stays local)
    STORE/manifests/      each restore point's manifest (`manifests`); in S3: <prefix>manifests/, and
                          <prefix>store.json, gateways/, gc/ for the gateways sharing the bucket (`gateways`)
    STORE/write.lock      flock: one writer (backup, prune, gc) at a time
    STORE/gc.lock         flock: readers shared, GC exclusive while it deletes packs
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import lmdb

from appliance.durable import write_durably
from appliance.errors import StoreBusy, StoreError
from appliance.store import formats
from appliance.store.catalog import Catalog
from appliance.store.gateways import (
    DEFAULT_GRACE_SECONDS,
    hold_name,
    holders_elsewhere,
    pack_id_base,
    register_gateway,
)
from appliance.store.index import ChunkIndex
from appliance.store.manifests import ManifestShelf
from appliance.store.packs import LocalPackDirectory, PackBackend
from appliance.store.s3 import S3Location, S3PackBackend, read_credentials

_CONFIG_HEADER = struct.Struct("<8sII")  # magic, format version, JSON length
#: In a bucket, the settings every gateway of the store shares (what `init --join` copies).
_SHARED_CONFIG = "store.json"
_SHARED_KEYS = ("store_id", "chunk_size", "chunk_id", "compression", "compression_level", "created",
                "gc_grace_seconds")
_NEXT_PACK_KEY = b"next-pack-id"
LMDB_MAP_SIZE = 1 << 40  # address space only; the file grows with its contents
DEFAULT_CHUNK_SIZE = 256 << 10  # chosen by measurement: see README "Chunk size"
DEFAULT_COMPRESSION_LEVEL = -1  # zstd's first fast level: see README "Compression level"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    store_id: str
    chunk_size: int
    chunk_id: str
    compression: str
    compression_level: int
    created: float
    #: Where sealed packs live: "local" (STORE/packs) or "s3" (`s3` says where; stores made before S3 lack both).
    backend: str = "local"
    s3: S3Location | None = None
    #: This appliance's number among the gateways sharing the bucket: the top bits of the pack ids it makes.
    gateway: int = 0
    #: How long packs GC condemned in a shared bucket stay readable: longer than any gateway's refresh
    #: interval and any ingest's commit (`appliance.store.gateways`).
    gc_grace_seconds: float = DEFAULT_GRACE_SECONDS


def read_store_config(path: Path) -> StoreConfig:
    try:
        raw = (path / "config").read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path} is not an initialised store (run `appliance --store {path} init`)") from None
    except OSError as exc:
        raise StoreError(f"cannot read store config {path / 'config'}: {exc.strerror}") from None
    if len(raw) < _CONFIG_HEADER.size:
        raise StoreError(f"store config {path / 'config'} is truncated")
    magic, version, length = _CONFIG_HEADER.unpack_from(raw)
    if magic != formats.STORE_MAGIC:
        raise StoreError(f"{path} is not an appliance store (bad config magic)")
    if version != formats.STORE_FORMAT_VERSION:
        raise StoreError(f"store {path} has format version {version}; this build reads {formats.STORE_FORMAT_VERSION}")
    try:
        doc = json.loads(raw[_CONFIG_HEADER.size : _CONFIG_HEADER.size + length])
        config = StoreConfig(**doc)
        return replace(config, s3=S3Location(**doc["s3"])) if config.backend == "s3" else config
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"store config {path / 'config'} is damaged: {exc}") from None


def init_store(
    path: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    s3: S3Location | None = None,
    join: bool = False,
    gc_grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> StoreConfig:
    """Create an empty store; refuses a directory that already holds one.

    With `s3`, packs go to that bucket and prefix: it must be reachable with the
    credentials now (a typo fails here, not at the first backup). A new store needs a
    prefix that holds none yet; with `join`, this appliance becomes one more gateway of
    the store already there (its settings come from the bucket; `appliance.store.refresh`
    then fills the local index).
    """
    if chunk_size < 4096 or chunk_size & (chunk_size - 1) or chunk_size > 1 << 26:
        raise StoreError(f"chunk size {chunk_size} must be a power of two between 4 KiB and 64 MiB")
    if not -7 <= compression_level <= 19:
        raise StoreError(f"compression level {compression_level} must be between -7 (fastest) and 19")
    path.mkdir(parents=True, exist_ok=True)
    if (path / "config").exists():
        raise StoreError(f"{path} already holds a store")
    config = StoreConfig(
        store_id=str(uuid.uuid4()),
        chunk_size=chunk_size,
        chunk_id=formats.CHUNK_ID_SCHEME,
        compression="zstd",
        compression_level=compression_level,
        created=time.time(),
        backend="local" if s3 is None else "s3",
        s3=s3,
        gc_grace_seconds=gc_grace_seconds,
    )
    if gc_grace_seconds < 0:
        raise StoreError(f"the GC grace period {gc_grace_seconds} s must not be negative")
    if join and s3 is None:
        raise StoreError("only a store in S3 can be joined: give its --s3-endpoint and --s3-bucket")
    if s3 is not None:
        packs = _s3_packs(path, s3)
        shared = packs.get_object(_SHARED_CONFIG)
        if join:
            if shared is None:
                raise StoreError(f"{s3.url(s3.prefix)} holds no store to join")
            doc = json.loads(shared)
            config = replace(config, **{key: doc[key] for key in _SHARED_KEYS})
        elif shared is not None or next(packs.list_packs(), None) is not None:
            raise StoreError(f"{s3.url(s3.prefix)} already holds a store: give another prefix, or --join it")
        else:
            packs.put_object(_SHARED_CONFIG, json.dumps({key: getattr(config, key) for key in _SHARED_KEYS}).encode(),
                             create_only=True)
        config = replace(config, gateway=register_gateway(packs, config.store_id))
    (path / "packs").mkdir(exist_ok=True)
    body = json.dumps(asdict(config)).encode()
    write_durably(
        path / "config",
        _CONFIG_HEADER.pack(formats.STORE_MAGIC, formats.STORE_FORMAT_VERSION, len(body)) + body,
    )
    return config


class Store:
    """An open store: config, LMDB environment, chunk index, catalog and packs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = read_store_config(path)
        if self.config.chunk_id != formats.CHUNK_ID_SCHEME:
            raise StoreError(f"store {path} uses chunk ids {self.config.chunk_id!r}, unknown to this build")
        # Before LMDB: a store whose credentials are missing fails with nothing left open.
        self.packs: PackBackend = (
            LocalPackDirectory(path / "packs") if self.config.s3 is None else _s3_packs(path, self.config.s3)
        )
        try:
            self.env = lmdb.open(
                str(path / "index"), map_size=LMDB_MAP_SIZE, max_dbs=16, subdir=True, max_readers=1024
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open index of store {path}: {exc}") from None
        self.env.reader_check()
        self._meta = self.env.open_db(b"meta")
        self.index = ChunkIndex(self.env)
        self.catalog = Catalog(self.env)
        self.manifests = ManifestShelf(self.packs)

    def close(self) -> None:
        self.packs.close()
        self.env.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def allocate_pack_id(self) -> int:
        """A pack id never used before, committed at once so a crash cannot reuse it."""
        with self.env.begin(write=True, db=self._meta) as txn:
            raw = txn.get(_NEXT_PACK_KEY)
            pack_id = pack_id_base(self.config.gateway) if raw is None else struct.unpack("<Q", raw)[0]
            txn.put(_NEXT_PACK_KEY, struct.pack("<Q", pack_id + 1))
        return pack_id

    def skip_pack_ids_through(self, pack_id: int) -> None:
        """Never hand out `pack_id` or a lower id of this gateway (its packs found in the bucket, after a rebuild)."""
        with self.env.begin(write=True, db=self._meta) as txn:
            raw = txn.get(_NEXT_PACK_KEY)
            current = pack_id_base(self.config.gateway) if raw is None else struct.unpack("<Q", raw)[0]
            txn.put(_NEXT_PACK_KEY, struct.pack("<Q", max(current, pack_id + 1)))

    def share_hold(self, point_id: str, holder: str) -> None:
        """Tell the other gateways of a shared bucket that `holder` here needs the point (before holding it)."""
        if self.config.backend == "s3":
            self.packs.put_object(hold_name(point_id, self.config.gateway, holder), b"")

    def unshare_hold(self, point_id: str, holder: str) -> None:
        if self.config.backend == "s3":
            self.packs.delete_object(hold_name(point_id, self.config.gateway, holder))

    def held_elsewhere(self, point_id: str) -> list[str]:
        """The holders of a point on other gateways of a shared bucket."""
        if self.config.backend != "s3":
            return []
        return holders_elsewhere(self.packs, point_id, self.config.gateway)

    def writer_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held by backup, prune and gc: one writer at a time."""
        return writer_lock(self.path)

    def reader_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held by anything that reads packs, so GC never deletes a pack under it."""
        return _flock(self.path, "gc.lock", fcntl.LOCK_SH, "garbage collection is deleting packs")

    def gc_lock(self) -> contextlib.AbstractContextManager[None]:
        return gc_lock(self.path)


@contextlib.contextmanager
def _flock(path: Path, name: str, mode: int, what: str) -> Iterator[None]:
    fd = os.open(path / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusy(f"store {path} is busy: {what}") from None
        yield
    finally:
        os.close(fd)


def writer_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """The store's writer lock, which needs no open index (a rebuild takes it before there is one)."""
    return _flock(path, "write.lock", fcntl.LOCK_EX, "another backup, prune or gc is running")


def gc_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Exclusive against every reader of packs: GC deleting them, or the index being replaced."""
    return _flock(path, "gc.lock", fcntl.LOCK_EX, "readers (restore, verify, serve) are using it")


def _s3_packs(path: Path, location: S3Location) -> S3PackBackend:
    return S3PackBackend(location, read_credentials(location, f"store {path}"), path / "packs" / "tmp")


def open_store(path: Path) -> Store:
    if not path.is_dir():
        raise StoreError(f"store directory {path} does not exist (run `appliance --store {path} init`)")
    return Store(path)
