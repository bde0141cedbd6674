"""`serve_nfs`: NFSv3, MOUNT v3 and portmapper registration in one trio nursery.

NFS and MOUNT each get a TCP listener (ESXi learns the MOUNT port from the portmapper;
Linux conventionally uses 2049 and 20048); passing ``mount_port=None`` serves MOUNT on
the NFS port instead. Cancelling the task closes the listeners and unregisters from
rpcbind, so a restart finds the ports and registrations free.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial

import trio

from appliance.datastore.vfs import Vfs
from nfs_export.exports import Export
from nfs_export.handles import HandleCodec
from nfs_export.mount import MOUNT_PROGRAM, MOUNT_V3, MountServer
from nfs_export.nfs3 import Nfs3Server
from nfs_export.nfs3_types import NFS_PROGRAM, NFS_V3
from nfs_export.portmap import (
    IPPROTO_TCP,
    PMAP_PORT,
    mapping,
    serve_portmap_registration,
)
from nfs_export.rpc import CallObserver, RpcDispatcher, RpcStatistics
from nfs_export.rpc_tcp import serve_rpc
from nfs_export.workers import open_worker_pool

NFS_PORT = 2049
MOUNT_PORT = 20048


@dataclass(frozen=True)
class NfsService:
    """What a started `serve_nfs` reports: the bound ports and its counters."""

    nfs_port: int
    mount_port: int
    dispatchers: tuple[RpcDispatcher, ...] = field(repr=False)

    def statistics(self) -> RpcStatistics:
        """RPC counters summed over the NFS and MOUNT listeners."""
        every = [d.statistics() for d in self.dispatchers]
        return RpcStatistics(**{f.name: sum(getattr(s, f.name) for s in every) for f in fields(RpcStatistics)})


async def serve_nfs(vfs: Vfs, *, handle_secret: bytes, export: Export | None = None, host: str = "127.0.0.1",
                    nfs_port: int = NFS_PORT, mount_port: int | None = MOUNT_PORT, register_portmap: bool = True,
                    portmap_port: int = PMAP_PORT, observe_call: CallObserver | None = None,
                    task_status: trio.TaskStatus[NfsService] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `vfs` over NFSv3 until cancelled.

    `handle_secret` must be the same on every start (persist it with the store): it seals
    the file handles clients keep. The default export is loopback-only, read-write,
    without root squash. Port 0 binds a free port; the bound ports are reported.
    `observe_call` hears every NFS and MOUNT call with its latency and outcome (metrics).
    """
    export = export or Export()
    codec = HandleCodec(handle_secret)
    async with open_worker_pool() as workers, trio.open_nursery() as nursery:
        nfs = Nfs3Server(vfs, export, codec, workers).program()
        mount = MountServer(vfs, export, codec).program()
        if mount_port is None:
            dispatchers: tuple[RpcDispatcher, ...] = (RpcDispatcher([nfs, mount], observe_call),)
            bound_nfs = bound_mount = await nursery.start(partial(serve_rpc, dispatchers[0], host=host,
                                                                  port=nfs_port))
        else:
            dispatchers = (RpcDispatcher([nfs], observe_call), RpcDispatcher([mount], observe_call))
            bound_nfs = await nursery.start(partial(serve_rpc, dispatchers[0], host=host, port=nfs_port))
            bound_mount = await nursery.start(partial(serve_rpc, dispatchers[1], host=host, port=mount_port))
        if register_portmap:
            maps = [mapping(NFS_PROGRAM, NFS_V3, IPPROTO_TCP, bound_nfs),
                    mapping(MOUNT_PROGRAM, MOUNT_V3, IPPROTO_TCP, bound_mount)]
            await nursery.start(partial(serve_portmap_registration, maps, host=host, port=portmap_port))
        task_status.started(NfsService(bound_nfs, bound_mount, dispatchers))
