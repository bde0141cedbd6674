"""ONC RPC over TCP (RFC 5531 section 11): record marking, connections, a small client.

Each connection reads records in order but runs up to `MAX_IN_FLIGHT` calls at once
(ESXi and the Linux client pipeline many READ/WRITEs on one connection); replies go out
as calls complete. A record over `MAX_RECORD` bytes closes its connection, since its
bytes cannot be skipped without reading them all; anything else malformed is the
dispatcher's to answer, and one connection's trouble never ends the listener.
"""

from __future__ import annotations

import logging
import struct
from functools import partial

import trio

from nfs_export.rpc import (
    MAX_AUTH_BYTES,
    RPC_VERSION,
    AcceptStat,
    AuthStat,
    Credential,
    MsgType,
    PendingCall,
    RejectStat,
    ReplyStat,
    RpcDispatcher,
)
from nfs_export.xdr import Decoder, Encoder

log = logging.getLogger(__name__)

#: The largest record accepted: a 1 MiB WRITE plus generous room for its headers.
MAX_RECORD = (2 << 20) + 4096
MAX_IN_FLIGHT = 32
LAST_FRAGMENT = 0x8000_0000
_U32 = struct.Struct(">I")


class RecordTooLarge(Exception):
    """A record over the size limit: the connection it came on is closed."""


class RecordReader:
    """Reassembles record-marked messages (RFC 5531 section 11) from a byte stream."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_record: int = MAX_RECORD) -> None:
        self._stream = stream
        self._max = max_record
        self._buffer = bytearray()
        self._position = 0

    async def _exactly(self, size: int) -> bytearray | None:
        """The next `size` bytes, or None if the stream ends first."""
        while len(self._buffer) - self._position < size:
            if self._position:
                del self._buffer[: self._position]
                self._position = 0
            chunk = await self._stream.receive_some(max(size - len(self._buffer), 1 << 16))
            if not chunk:
                return None
            self._buffer += chunk
        piece = self._buffer[self._position : self._position + size]
        self._position += size
        return piece

    async def read_record(self) -> bytearray | None:
        """The next whole record, or None at the end of the stream."""
        record: bytearray | None = None
        while True:
            header = await self._exactly(4)
            if header is None:
                return None
            word = _U32.unpack(header)[0]
            length = word & ~LAST_FRAGMENT
            total = length + (len(record) if record is not None else 0)
            if total > self._max:
                raise RecordTooLarge(f"record of more than {total} bytes exceeds the limit of {self._max}")
            fragment = await self._exactly(length)
            if fragment is None:
                return None
            if record is None:
                record = fragment
            else:
                record += fragment
            if word & LAST_FRAGMENT:
                return record


def _mark(out: Encoder) -> Encoder:
    """Start a reply buffer with room for its record mark, filled in by `_sealed`."""
    out.data += b"\0\0\0\0"
    return out


def _sealed(out: Encoder) -> bytearray:
    """The buffer with its record mark: one last fragment."""
    _U32.pack_into(out.data, 0, LAST_FRAGMENT | (len(out.data) - 4))
    return out.data


async def _send_buffers(sock: trio.socket.SocketType, buffers: list[bytearray]) -> None:
    """Send every buffer with as few sendmsg calls as the socket allows."""
    views = [memoryview(buffer) for buffer in buffers]
    while views:
        sent = await sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0


class _ReplyWriter:
    """Sends a connection's replies in the order calls complete.

    Replies that complete together leave in one sendmsg: on loopback a syscall per
    small reply costs more than the call itself. A call's slot is freed only once its
    reply has left, so a client that stops reading replies stops being read.
    """

    def __init__(self, sock: trio.socket.SocketType, slots: trio.Semaphore, scope: trio.CancelScope) -> None:
        self._sock = sock
        self._slots = slots
        self._scope = scope
        self._queue: list[bytearray] = []
        self._ready = trio.Event()
        self._closing = False

    def put(self, reply: bytearray | None) -> None:
        """Queue a reply (None: the call needs none, its slot is free at once)."""
        if reply is None:
            self._slots.release()
            return
        self._queue.append(reply)
        self._ready.set()

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._closing = True
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            batch, self._queue = self._queue, []
            if batch:
                try:
                    await _send_buffers(self._sock, batch)
                except OSError:
                    self._scope.cancel()  # the client went away: stop reading its calls too
                    return
                for _ in batch:
                    self._slots.release()
            if self._closing and not self._queue:
                return


async def _finish(call: PendingCall, out: Encoder, writer: _ReplyWriter) -> None:
    await call.finish()
    writer.put(_sealed(out))


async def _read_calls(dispatcher: RpcDispatcher, reader: RecordReader, client: str, writer: _ReplyWriter,
                      slots: trio.Semaphore, nursery: trio.Nursery) -> None:
    """Answer calls until the stream ends or breaks the record size limit.

    A call answered at once (a READ from memory, a malformed one) is queued for the
    writer here; only a call that has to wait gets a task of its own.
    """
    try:
        while True:
            try:
                slots.acquire_nowait()  # no scheduler round trip per call while slots are free
            except trio.WouldBlock:
                await slots.acquire()
            record = await reader.read_record()
            if record is None:
                return
            out = _mark(Encoder())
            started = dispatcher.start(record, client, out)
            if isinstance(started, bool):
                writer.put(_sealed(out) if started else None)
            else:
                nursery.start_soon(_finish, started, out, writer)
    except RecordTooLarge as exc:
        dispatcher.record_oversized()
        log.warning("closing RPC connection from %s: %s", client, exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # reset by the client


async def _serve_connection(dispatcher: RpcDispatcher, max_record: int, stream: trio.SocketStream) -> None:
    client = str(stream.socket.getpeername()[0])
    dispatcher.connection_opened()
    slots = trio.Semaphore(MAX_IN_FLIGHT)
    try:
        async with trio.open_nursery() as connection:
            writer = _ReplyWriter(stream.socket, slots, connection.cancel_scope)
            connection.start_soon(writer.run)
            async with trio.open_nursery() as calls:
                await _read_calls(dispatcher, RecordReader(stream, max_record), client, writer, slots, calls)
            writer.close()
    except Exception:
        # One connection's failure must never end the listener (and every other client's service).
        log.exception("RPC connection from %s failed", client)
    finally:
        await stream.aclose()


async def listen_tcp(host: str, port: int) -> list[trio.SocketListener]:
    """TCP listeners on one address; a failure names the address (port 0: any free port)."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host} port {port}: {exc.strerror}") from exc


async def serve_rpc(dispatcher: RpcDispatcher, *, host: str, port: int, max_record: int = MAX_RECORD,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `dispatcher` on one TCP address until cancelled; reports the bound port."""
    listeners = await listen_tcp(host, port)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_serve_connection, dispatcher, max_record), listeners)


class RpcCallError(Exception):
    """A call that the server did not answer with SUCCESS."""


class RpcClient:
    """A minimal ONC RPC client over one TCP stream (portmapper registration, tests)."""

    def __init__(self, stream: trio.SocketStream, credential: Credential | None = None) -> None:
        self._stream = stream
        self._reader = RecordReader(stream)
        self._credential = credential or Credential()
        self._xid = 0x1000

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def call(self, program: int, version: int, procedure: int, args: bytes | bytearray = b"") -> Decoder:
        """Send one call and wait for its reply; returns a decoder at the result."""
        self._xid += 1
        out = _mark(Encoder())
        for word in (self._xid, MsgType.CALL, RPC_VERSION, program, version, procedure):
            out.uint32(word)
        self._credential.encode(out)
        Credential().encode(out)  # verifier
        out.data += args
        await self._stream.send_all(_sealed(out))
        while True:
            record = await self._reader.read_record()
            if record is None:
                raise RpcCallError(f"connection closed before the reply to program {program} call {procedure}")
            reply = Decoder(record)
            if reply.uint32() == self._xid:
                break
        if reply.uint32() != MsgType.REPLY:
            raise RpcCallError("answer is not a reply")
        if reply.uint32() != ReplyStat.MSG_ACCEPTED:
            stat = RejectStat(reply.uint32())
            detail = AuthStat(reply.uint32()).name if stat is RejectStat.AUTH_ERROR else "RPC_MISMATCH"
            raise RpcCallError(f"call denied: {detail}")
        reply.uint32()
        reply.opaque_view(MAX_AUTH_BYTES)
        accept = AcceptStat(reply.uint32())
        if accept is not AcceptStat.SUCCESS:
            raise RpcCallError(f"program {program} version {version} procedure {procedure}: {accept.name}")
        return reply


async def _bind_reserved(sock: trio.socket.SocketType, host: str) -> None:
    """Bind to a port below 1024 if we may: rpcbind takes SET/UNSET only from those."""
    for local_port in range(1023, 600, -1):
        try:
            await sock.bind((host, local_port))
            return
        except PermissionError:
            return  # not privileged: an ordinary port, which rpcbind may refuse
        except OSError:
            continue


async def open_rpc_client(host: str, port: int, *, credential: Credential | None = None,
                          reserved_port: bool = False) -> RpcClient:
    """Connect to an RPC server over TCP, optionally from a privileged source port."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        if reserved_port:
            await _bind_reserved(sock, "127.0.0.1" if host.startswith("127.") else "0.0.0.0")
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return RpcClient(trio.SocketStream(sock), credential)
