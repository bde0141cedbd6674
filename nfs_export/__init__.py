"""NFSv3 export of a VFS: what ESXi mounts as a datastore.

Layers, each a module, bottom up (the package knows nothing of chunks or the store; it
speaks only to `appliance.datastore.vfs.Vfs` and maps `appliance.errors` to nfsstat3):

- `xdr`: the RFC 4506 encoding; one exception (`XdrError`) for any malformed input.
- `rpc`: ONC RPC v2 messages (RFC 5531): AUTH_SYS/AUTH_NONE, replies, and the
  (program, version) -> procedure tables of the dispatcher.
- `rpc_tcp`: record marking, pipelined calls per connection, `serve_rpc`, a client.
- `portmap`: registration with rpcbind, or a portmapper of our own (RFC 1833 v2).
- `mount`: MOUNT v3, which hands out the root file handle.
- `exports`: who may mount, root squash, permission checks.
- `handles`: file handles = export + fileid + generation + keyed check; valid across
  restarts because the secret is kept with the store.
- `nfs3_types`, `nfs3_readdir`, `nfs3`: NFS v3 (RFC 1813) types, directory paging and
  the procedures.
- `workers`: the threads VFS calls run in (cheaper per call than `trio.to_thread`).
- `server`: `serve_nfs`, the whole service as one trio task.

Decisions a client can observe: FSINFO offers 1 MiB transfers and no hard links (LINK
and MKNOD are NFS3ERR_NOTSUPP); restore points are NFS3ERR_ROFS; a VFS PermissionDenied
(a place the datastore never allows a change, like /sessions itself) is NFS3ERR_ACCES;
readdir cookies are stable, so the cookie verifier is constant per store; the write
verifier changes on every start; handles and fsid derive from the store's secret.
"""

from nfs_export.exports import Export as Export
from nfs_export.exports import parse_networks as parse_networks
from nfs_export.server import NfsService as NfsService
from nfs_export.server import serve_nfs as serve_nfs

__all__ = ["Export", "NfsService", "parse_networks", "serve_nfs"]
