#!/usr/bin/env python3
"""Stable NFSv3 WRITEs, pipelined on one TCP connection: the write pattern ESXi sends.

libnfs and QEMU write UNSTABLE and COMMIT later, so `qemu-img bench -w` never shows what
a hypervisor that asks for FILE_SYNC on every WRITE (ESXi does) feels. This is a small
ONC RPC client of its own (RFC 5531 record marking and call header, AUTH_SYS; RFC 1813
MOUNT MNT, LOOKUP, WRITE) that keeps `depth` WRITEs of `size` bytes in flight, each
asking for `stable` (FILE_SYNC by default), at offsets a prime number of blocks apart
(wrapping inside the file), so no two writes of a pass touch the same block.

Every reply is checked: NFS3_OK, the whole count written, and `committed` at least as
stable as asked; anything else raises `CallFailed` with what the server said. The
client (`RpcConnection`, `file_handle`, `lookup`, `write_args`, `check_write`, `read`) is also what
`tests/test_crash_stable_writes.py` writes and reads with, and `tests/bench/scale.py` looks up and reads with.

Used by `tests/bench/nfs.py` against ganesha and ours in the same run; run alone:
    stable_writes.py --nfs-port P --mount-port M --export /dir --path file.img
Output (alone): one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time

MOUNT_PROGRAM, MOUNT_VERSION, MOUNT_MNT = 100005, 3, 1
NFS_PROGRAM, NFS_VERSION, NFS_LOOKUP, NFS_WRITE = 100003, 3, 3, 7
UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
STABLE_NAMES = {"unstable": UNSTABLE, "data_sync": DATA_SYNC, "file_sync": FILE_SYNC}
STEP_BLOCKS = 4099  # a prime: consecutive writes land far apart and a pass touches each block once
_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">IIIIII")  # xid, CALL, rpcvers, program, version, procedure
NFS_READ = 6


class CallFailed(Exception):
    """The server refused or failed a call; the message says which and how."""


def _opaque(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data + bytes(-len(data) % 4)


def _credential() -> bytes:
    """AUTH_SYS as root (ESXi's credential: root not squashed), then an AUTH_NONE verifier."""
    body = struct.pack(">I", 0) + _opaque(b"bench") + struct.pack(">III", 0, 0, 0)
    return struct.pack(">I", 1) + _opaque(body) + struct.pack(">II", 0, 0)


class RpcConnection:
    """One TCP connection making ONC RPC calls; replies are matched by xid."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.credential = _credential()
        self.xid = int.from_bytes(os.urandom(4), "big")
        self.buffer = bytearray()
        #: Received into, then copied out: `recv(1 MiB)` would map and unmap a fresh 1 MiB
        #: buffer for every small reply, and the client's cost would swamp the server's.
        self._landing = bytearray(1 << 16)

    def close(self) -> None:
        self.sock.close()

    def send(self, program: int, version: int, procedure: int, args: bytes | list[bytes]) -> int:
        """Send one call (a record of one fragment); its xid."""
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        pieces = args if isinstance(args, list) else [args]
        header = _HEADER.pack(self.xid, 0, 2, program, version, procedure) + self.credential
        length = len(header) + sum(map(len, pieces))
        self.sock.sendmsg([_U32.pack(0x80000000 | length), header, *pieces])
        return self.xid

    def receive(self) -> tuple[int, memoryview]:
        """The next reply: its xid and its results (after the accepted-reply header)."""
        record = bytearray()
        while True:
            marker = _U32.unpack(self._take(4))[0]
            record += self._take(marker & 0x7FFFFFFF)
            if marker & 0x80000000:
                break
        xid, kind, reply_stat = struct.unpack_from(">III", record)
        if kind != 1 or reply_stat != 0:
            raise CallFailed(f"call {xid} was denied (reply_stat {reply_stat})")
        verifier_length = _U32.unpack_from(record, 16)[0]
        at = 20 + verifier_length + (-verifier_length % 4)
        accept_stat = _U32.unpack_from(record, at)[0]
        if accept_stat != 0:
            raise CallFailed(f"call {xid} was not executed (accept_stat {accept_stat})")
        return xid, memoryview(record)[at + 4:]

    def call(self, program: int, version: int, procedure: int, args: bytes) -> memoryview:
        xid = self.send(program, version, procedure, args)
        got, results = self.receive()
        if got != xid:
            raise CallFailed(f"expected the reply to call {xid}, got {got}")
        return results

    def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            got = self.sock.recv_into(self._landing)
            if not got:
                raise ConnectionError("the server closed the connection")
            self.buffer += memoryview(self._landing)[:got]
        taken = bytes(self.buffer[:count])
        del self.buffer[:count]
        return taken


def _status(results: memoryview, what: str) -> None:
    status = _U32.unpack_from(results)[0]
    if status != 0:
        raise CallFailed(f"{what} failed with nfsstat3 {status}")


def _handle(results: memoryview) -> bytes:
    length = _U32.unpack_from(results, 4)[0]
    return bytes(results[8:8 + length])


def file_handle(host: str, nfs_port: int, mount_port: int, export: str, path: str) -> bytes:
    """MNT the export, then LOOKUP each component of `path` under it."""
    mount = RpcConnection(host, mount_port)
    try:
        results = mount.call(MOUNT_PROGRAM, MOUNT_VERSION, MOUNT_MNT, _opaque(export.encode()))
        _status(results, f"MNT {export}")
        handle = _handle(results)
    finally:
        mount.close()
    nfs = RpcConnection(host, nfs_port)
    try:
        for name in filter(None, path.split("/")):
            handle = lookup(nfs, handle, name)
    finally:
        nfs.close()
    return handle


def lookup(connection: RpcConnection, directory: bytes, name: str) -> bytes:
    """One LOOKUP: the handle of `name` in the directory `directory` names."""
    results = connection.call(NFS_PROGRAM, NFS_VERSION, NFS_LOOKUP, _opaque(directory) + _opaque(name.encode()))
    _status(results, f"LOOKUP {name}")
    return _handle(results)


def _skip_post_op_attr(results: memoryview, at: int) -> int:
    return at + 4 + (84 if _U32.unpack_from(results, at)[0] else 0)


def write_args(handle: bytes, offset: int, data: bytes, stable: int) -> list[bytes]:
    """WRITE3args for `handle` (an opaque, as `file_handle` gives it through `_opaque`)."""
    return [_opaque(handle) + struct.pack(">QII", offset, len(data), stable), _opaque(data)]


def read(connection: RpcConnection, handle: bytes, offset: int, count: int) -> bytes:
    """One READ: the bytes the server returned (short only at the end of the file)."""
    results = connection.call(NFS_PROGRAM, NFS_VERSION, NFS_READ, _opaque(handle) + struct.pack(">QI", offset, count))
    _status(results, "READ")
    at = _skip_post_op_attr(results, 4)
    got = _U32.unpack_from(results, at)[0]
    return bytes(results[at + 12:at + 12 + got])


def check_write(results: memoryview, size: int, stable: int) -> None:
    _status(results, "WRITE")
    at = 4 + 4 + (24 if _U32.unpack_from(results, 4)[0] else 0)  # wcc_data: pre_op_attr
    at = _skip_post_op_attr(results, at)
    count, committed = struct.unpack_from(">II", results, at)
    if count != size or committed < stable:
        raise CallFailed(f"WRITE wrote {count} of {size} bytes, committed {committed} (asked {stable})")


def stable_write_ops(host: str, nfs_port: int, mount_port: int, export: str, path: str, file_size: int,
                     size: int, depth: int, count: int, stable: int = FILE_SYNC) -> float:
    """WRITEs per second: `count` writes of `size` bytes, `depth` in flight, each asking for `stable`."""
    handle = file_handle(host, nfs_port, mount_port, export, path)
    blocks = file_size // size
    payload = os.urandom(size)
    connection = RpcConnection(host, nfs_port)
    pending: set[int] = set()
    sent = done = 0
    try:
        started = time.perf_counter()
        while done < count:
            while sent < count and len(pending) < depth:
                offset = (sent * STEP_BLOCKS % blocks) * size
                pending.add(connection.send(NFS_PROGRAM, NFS_VERSION, NFS_WRITE,
                                            write_args(handle, offset, payload, stable)))
                sent += 1
            xid, results = connection.receive()
            if xid not in pending:
                raise CallFailed(f"a reply to call {xid}, which is not in flight")
            pending.remove(xid)
            check_write(results, size, stable)
            done += 1
        seconds = time.perf_counter() - started
    finally:
        connection.close()
    return round(count / seconds, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--nfs-port", type=int, required=True)
    parser.add_argument("--mount-port", type=int, required=True)
    parser.add_argument("--export", required=True, help="the export's path, as MNT takes it")
    parser.add_argument("--path", required=True, help="the file, relative to the export")
    parser.add_argument("--file-size", type=int, required=True, help="bytes of the file the writes stay within")
    parser.add_argument("--size", type=int, default=64 << 10)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--stable", choices=list(STABLE_NAMES), default="file_sync")
    args = parser.parse_args()
    ops = stable_write_ops(args.host, args.nfs_port, args.mount_port, args.export, args.path, args.file_size,
                           args.size, args.depth, args.count, STABLE_NAMES[args.stable])
    print(json.dumps({"bench": "stable_writes", "size": args.size, "depth": args.depth, "count": args.count,
                      "stable": args.stable, "ops": ops, "MBps": round(ops * args.size / 1e6, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
