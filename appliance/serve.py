"""Running the datastore: one process, one trio loop, one shared datastore object.

Today the loop serves FUSE; the NFS server and HTTP API join it as tasks of the same
nursery. The process holds the store's reader lock (GC will not delete packs under
it) and the datastore lock (sessions are not committed or deleted under it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from appliance.datastore.datastore import Datastore
from appliance.datastore.sessions import datastore_lock
from appliance.fuse_adapter import serve_fuse
from appliance.store import ReadPath, open_store
from appliance.store.cache import MemoryChunkCache

#: A serving appliance keeps whole booted disks' working sets decompressed; a one-shot
#: restore needs far less (`reader.DEFAULT_CACHE_BYTES`).
DEFAULT_SERVE_CACHE_BYTES = 1 << 30


def mount_datastore(store_path: Path, mountpoint: Path, cache_bytes: int = DEFAULT_SERVE_CACHE_BYTES) -> None:
    """Serve the datastore at `mountpoint` in the foreground; returns after a clean unmount."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with (
        open_store(store_path) as store,
        store.reader_lock(),
        datastore_lock(store),
        ReadPath(store, cache=MemoryChunkCache(cache_bytes)) as read_path,
    ):
        datastore = Datastore(store, read_path)
        try:
            trio.run(serve_fuse, datastore, mountpoint)
        finally:
            datastore.close()
