"""The deduplicated, compressed, checksummed chunk store and its catalog.

Formats (all defined in `formats`): a store directory holds a `config` file (magic,
version, JSON settings), an LMDB environment `index/`, and immutable pack files
`packs/XX/<id>.pack` of checksummed records. Chunks are fixed-size slots of a disk
aligned to disk offsets (256 KiB by default, set at `init`), identified by BLAKE3-256 of
their bytes; all-zero slots are never stored. See `formats` for byte layouts.

Module map: `repository` (open/init/locks), `packs` (pack files behind a backend
interface), `writer` (new packs for one operation), `index` (chunk -> pack location),
`catalog` (VMs, points, chunk maps), `chunks` (verified loads), `cache` + `reader`
(the read path), `gc` (prune + garbage collection), `verify`, `stats`.

Which lock or transaction guards what:

=========================  ===============================================================
guard                      protects
=========================  ===============================================================
write.lock (flock EX)      one writer at a time: backup, prune, gc. GC's mark phase relies
                           on it: no ingest can add a reference to a chunk being dropped.
gc.lock (flock SH)         held by every reader of packs (restore, verify, serve) while it
                           may open a pack.
gc.lock (flock EX, try)    GC deleting pack files; if readers hold it, deletion is deferred
                           to the next GC (the files are already unlisted, so harmless).
one LMDB write txn         an ingest's commit: its packs, chunk locations and restore point
                           appear together or not at all; GC's relocation + drop likewise.
LMDB read txn (snapshot)   readers see a consistent catalog + index while writers commit.
fsync before commit        pack data and the directory entry are durable before any LMDB
                           transaction references them (`PackWriter.seal`).
=========================  ===============================================================

The LMDB environment's tables (named databases), by owner:

============  =====================================================================
table         key -> value
============  =====================================================================
meta          settings and counters (e.g. ``ns-next-inode``, the next inode ever handed out)
chunks        chunk id -> pack and offset of its record (`index`)
packs         pack id -> its size and record count (`index`)
vms           VM name -> when its first point was made (`catalog`)
points        point id -> the restore point: disks, sizes, parent (`catalog`)
maps          point id + disk -> the disk's chunk map (`catalog`)
files         point id + name -> a small file backed up with it: .vmx, .nvram (`catalog`)
holds         point id + holder -> why prune must keep the point (a session runs from it)
file-index    point id "/" [+ disk + partition [+ VG/LV]] -> the names, sizes and mtimes of a volume's
              files (opaque to the store: `appliance.flr.index`); the bare key marks the
              point indexed. Dropped with the point (`catalog`)
ns_nodes      inode -> the datastore node: kind, role, mode, owner, times, generation,
              parent, role references (`appliance.datastore.namespace`)
ns_names      parent inode + name -> inode (lookup)
ns_children   parent inode + child inode -> name (readdir in inode order: stable cookies)
sessions      session name -> what it was made from (`appliance.datastore.sessions`)
============  =====================================================================

The ``ns_*`` and ``sessions`` tables are the datastore's, not the chunk store's: the
store keeps them so NFS file handles and fileids survive restarts with the data they
name, and the store's code never reads them. Inode numbers are never reused.

Garbage collection is described in `gc`; crash behaviour: an interrupted ingest leaves
only temporary or unlisted packs, which no reader can see and the next GC deletes.
"""

from appliance.store.catalog import DiskInfo as DiskInfo
from appliance.store.catalog import RestorePoint as RestorePoint
from appliance.store.reader import ReadPath as ReadPath
from appliance.store.repository import Store as Store
from appliance.store.repository import init_store as init_store
from appliance.store.repository import open_store as open_store
