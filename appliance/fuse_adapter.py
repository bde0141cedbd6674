"""The FUSE front: a thin pyfuse3 adapter over the datastore VFS, on trio.

Every VFS call runs in a worker thread (`trio.to_thread`), because the VFS blocks on
disk I/O and decompression and the same loop also serves NFS. Handlers hold no shared
state across an await. VFS errors become errno in one table (`ERRNO`).

Tuning from measurement (see DESIGN.md): the kernel's write-back cache makes small
writes about ten times faster; readahead is raised to 1 MiB after mounting so
sequential reads arrive as 1 MiB requests; restore-point files may stay in the page
cache (they never change), session files may not.

Every operation is timed for an optional `OpObserver` (metrics) by one decorator,
`_observed`, so handlers carry no measuring code of their own.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from appliance import errors
from appliance.datastore.datastore import file_type_bits
from appliance.datastore.vfs import AttributeChanges, Attributes, Durability, Kind, Vfs

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
#: Hears each FUSE operation's name and how long the adapter took to answer it.
OpObserver = Callable[[str, float], None]

ERRNO: tuple[tuple[type[BaseException], int], ...] = (
    (errors.NotFound, errno.ENOENT),
    (errors.ReadOnly, errno.EROFS),
    (errors.AlreadyExists, errno.EEXIST),
    (errors.NotEmpty, errno.ENOTEMPTY),
    (errors.NotADirectory, errno.ENOTDIR),
    (errors.IsADirectory, errno.EISDIR),
    (errors.PermissionDenied, errno.EPERM),
    (errors.StaleHandle, errno.ESTALE),
    (errors.NotSupported, errno.EOPNOTSUPP),
    (errors.NameTooLong, errno.ENAMETOOLONG),
    (errors.InvalidName, errno.EINVAL),
    (errors.IntegrityError, errno.EIO),
    (errors.TryAgain, errno.EAGAIN),
    (errors.SessionDiskError, errno.EIO),
)
READ_ONLY_TIMEOUT = 300.0  # restore points never change
WRITABLE_TIMEOUT = 1.0


def errno_for(exc: BaseException) -> int:
    for kind, number in ERRNO:
        if isinstance(exc, kind):
            return number
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _observed(
    operation: Callable[Concatenate[FuseAdapter, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[FuseAdapter, P], Coroutine[Any, Any, T]]:
    """Report the operation's name and duration (errors included) to the observer."""
    name = operation.__name__

    @functools.wraps(operation)
    async def timed(self: FuseAdapter, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self.observe_op is None:
            return await operation(self, *args, **kwargs)
        started = time.perf_counter()
        try:
            return await operation(self, *args, **kwargs)
        finally:
            self.observe_op(name, time.perf_counter() - started)

    return timed


class FuseAdapter(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, vfs: Vfs, observe_op: OpObserver | None = None) -> None:
        super().__init__()
        self.vfs = vfs
        self.observe_op = observe_op

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(function, *args)
        except (errors.ApplianceError, OSError) as exc:
            if isinstance(exc, (errors.IntegrityError, errors.SessionDiskError)):
                log.error("I/O error: %s", exc)
            raise pyfuse3.FUSEError(errno_for(exc)) from None

    def _entry(self, attributes: Attributes) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attributes.inode
        entry.generation = attributes.generation
        timeout = READ_ONLY_TIMEOUT if attributes.read_only else WRITABLE_TIMEOUT
        entry.entry_timeout = timeout
        entry.attr_timeout = timeout
        entry.st_mode = file_type_bits(attributes.kind) | attributes.mode
        entry.st_nlink = attributes.nlink
        entry.st_uid = attributes.uid
        entry.st_gid = attributes.gid
        entry.st_rdev = 0
        entry.st_size = attributes.size
        entry.st_blksize = 1 << 20
        entry.st_blocks = -(-attributes.used // 512)
        entry.st_atime_ns = attributes.atime_ns
        entry.st_mtime_ns = attributes.mtime_ns
        entry.st_ctime_ns = attributes.ctime_ns
        return entry

    @_observed
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._call(self.vfs.lookup, parent_inode, _name(name)))

    @_observed
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._call(self.vfs.getattr, inode))

    @_observed
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        changes = AttributeChanges(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode & 0o7777 if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._entry(await self._call(self.vfs.setattr, inode, changes))

    @_observed
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(await self._call(self.vfs.readlink, inode))

    @_observed
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        attributes = await self._call(self.vfs.getattr, inode)
        if attributes.kind is not Kind.DIRECTORY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_observed
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = await self._call(lambda: list(self.vfs.readdir(fh, start_id)))
        for entry in entries:
            if not pyfuse3.readdir_reply(token, os.fsencode(entry.name), self._entry(entry.attributes), entry.cookie):
                break

    @_observed
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        attributes = await self._call(self.vfs.getattr, inode)
        if attributes.kind is Kind.DIRECTORY:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if attributes.read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=attributes.read_only)

    @_observed
    async def read(self, fh: int, off: int, size: int) -> bytes:
        cached = self.vfs.read_nowait(fh, off, size)
        if cached is None:
            return await self._call(self.vfs.read, fh, off, size)
        return b"".join(cached)  # pyfuse3 takes bytes; the cache hands out views

    @_observed
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        written = self.vfs.write_nowait(fh, off, buf)  # a page-cache pwrite: no thread hop (as `read`)
        return written if written is not None else await self._call(self.vfs.write, fh, off, buf)

    @_observed
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attributes = await self._call(self.vfs.create, parent_inode, _name(name), mode, ctx.uid, ctx.gid,
                                      bool(flags & os.O_EXCL))
        return pyfuse3.FileInfo(fh=attributes.inode), self._entry(attributes)

    @_observed
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._call(self.vfs.mkdir, parent_inode, _name(name), mode, ctx.uid, ctx.gid))

    @_observed
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._call(self.vfs.symlink, parent_inode, _name(name), os.fsdecode(target),
                                            ctx.uid, ctx.gid))

    @_observed
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call(self.vfs.remove, parent_inode, _name(name))

    @_observed
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call(self.vfs.rmdir, parent_inode, _name(name))

    @_observed
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE / NOREPLACE are not offered
        await self._call(self.vfs.rename, parent_inode_old, _name(name_old), parent_inode_new, _name(name_new))

    @_observed
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @_observed
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @_observed
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = await self._call(self.vfs.statfs)
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = stats.block_size
        data.f_blocks = stats.total_bytes // stats.block_size
        data.f_bfree = stats.free_bytes // stats.block_size
        data.f_bavail = stats.available_bytes // stats.block_size
        data.f_files = stats.total_files
        data.f_ffree = data.f_favail = stats.free_files
        data.f_namemax = stats.name_max
        return data

    @_observed
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._call(self.vfs.fsync, fh, Durability.DATA if datasync else Durability.FILE)

    @_observed
    async def flush(self, fh: int) -> None:
        return None

    @_observed
    async def release(self, fh: int) -> None:
        return None

    @_observed
    async def releasedir(self, fh: int) -> None:
        return None

    @_observed
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_observed
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None


def clear_stale_mount(mountpoint: Path) -> None:
    """Unmount what a killed earlier run left behind ("Transport endpoint is not connected")."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)


def _raise_readahead(mountpoint: Path, kilobytes: int) -> None:
    device = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        path.write_text(str(kilobytes))
    except OSError as exc:
        log.warning("cannot raise readahead of %s: %s", mountpoint, exc)


async def serve_fuse(vfs: Vfs, mountpoint: Path, readahead_kb: int = 1024, observe_op: OpObserver | None = None,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Mount `vfs` at `mountpoint` and serve until SIGINT/SIGTERM or cancellation.

    `observe_op` hears every FUSE operation with its latency (metrics).
    """
    clear_stale_mount(mountpoint)
    options = set(pyfuse3.default_options) | {"fsname=appliance", "subtype=appliance", "auto_unmount"}
    pyfuse3.init(FuseAdapter(vfs, observe_op), str(mountpoint), options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            # stat() of our own mount must not run on the loop: the loop answers it.
            await trio.to_thread.run_sync(_raise_readahead, mountpoint, readahead_kb)
            task_status.started()
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal %s: unmounting %s", signal.Signals(signum).name, mountpoint)
                    break
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
