"""ONC RPC over TCP (RFC 5531 section 11): record marking, connections, a small client.

Each connection reads records in order but runs up to `MAX_IN_FLIGHT` calls at once
(ESXi and the Linux client pipeline many READ/WRITEs on one connection); replies go out
as calls complete. A reply answered on the loop that is true only after a sync (a stable
WRITE: `rpc.HeldResult`) waits until the calls at hand are read, then one sync makes
them all true before they are sent. A record over `MAX_RECORD` bytes closes its connection, since its
bytes cannot be skipped without reading them all; anything else malformed is the
dispatcher's to answer, and one connection's trouble never ends the listener.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
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
_IOV_MAX = 1024
#: Bytes a connection receives into at a time. Records that straddle the end are moved to
#: the front; with 64 KiB WRITEs at depth 16, 1 MiB made that rare enough to write 11%
#: faster than 256 KiB (4 MiB gained nothing more). bytearray zero-fills it, so each
#: connection holds it resident.
RECEIVE_BUFFER = 1 << 20
#: Calls one connection may answer in a row without yielding to the other tasks.
_YIELD_EVERY = 4 * MAX_IN_FLIGHT
_U32 = struct.Struct(">I")


class RecordTooLarge(Exception):
    """A record over the size limit: the connection it came on is closed."""


class RecordAssembler:
    """Reassembles record-marked messages (RFC 5531 section 11) from bytes put in its buffer.

    Bytes are received straight into `free_space()`, and a whole record is handed out as
    a view of the buffer: a 64 KiB WRITE goes from the socket to the page cache with no
    copy in between. A view stays valid until the next `free_space()`, which may move
    bytes within the buffer; a caller that keeps records longer (a call answered later,
    in a task) says so with `lend()`, and the next bytes go to a fresh buffer instead.
    The buffer is never resized, so views of it can never be invalidated that way.
    """

    def __init__(self, max_record: int = MAX_RECORD, capacity: int = RECEIVE_BUFFER) -> None:
        self._max = max_record
        self._capacity = capacity
        self._buffer = bytearray(capacity)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._lent = False
        self._fragments: bytearray | None = None  # the earlier fragments of a record in progress
        self._wanted = 4  # bytes the next fragment needs in the buffer, header included

    def lend(self) -> None:
        """The records handed out since the last `free_space()` stay in use: keep their bytes."""
        self._lent = True

    def free_space(self) -> memoryview:
        """Room for the next bytes received; call `received` with how many were put there.

        The room holds at least the rest of the fragment in progress, and 64 KiB.
        """
        held = self._end - self._start
        room = max(self._wanted - held, 1 << 16)
        if self._lent:
            self._move_to_fresh_buffer(max(self._capacity, held + room))
        elif len(self._buffer) - self._end < room:
            if len(self._buffer) - held >= room:
                self._buffer[:held] = self._buffer[self._start : self._end]
                self._start, self._end = 0, held
            else:
                self._move_to_fresh_buffer(held + room)
        return self._view[self._end :]

    def _move_to_fresh_buffer(self, size: int) -> None:
        held = self._end - self._start
        fresh = bytearray(size)
        fresh[:held] = self._view[self._start : self._end]
        self._buffer, self._view = fresh, memoryview(fresh)
        self._start, self._end, self._lent = 0, held, False

    def received(self, count: int) -> None:
        self._end += count

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes that arrived elsewhere (a stream that hands out its own buffers)."""
        view = memoryview(data)
        while view:
            space = self.free_space()
            taken = min(len(space), len(view))
            space[:taken] = view[:taken]
            self.received(taken)
            view = view[taken:]

    def next_record(self) -> memoryview | bytes | None:
        """The next whole record (see the class docstring for how long it is valid), or None
        until more bytes are received."""
        while True:
            held = self._end - self._start
            if held < 4:
                self._wanted = 4
                return None
            word = _U32.unpack_from(self._buffer, self._start)[0]
            length = word & ~LAST_FRAGMENT
            earlier = len(self._fragments) if self._fragments is not None else 0
            if earlier + length > self._max:
                raise RecordTooLarge(f"record of more than {earlier + length} bytes exceeds the limit of {self._max}")
            if held < 4 + length:
                self._wanted = 4 + length
                return None
            body = self._view[self._start + 4 : self._start + 4 + length]
            self._start += 4 + length
            if word & LAST_FRAGMENT:
                self._wanted = 4
                if self._fragments is None:
                    return body
                self._fragments += body
                whole, self._fragments = bytes(self._fragments), None
                return whole
            if self._fragments is None:
                self._fragments = bytearray(body)
            else:
                self._fragments += body


class RecordReader:
    """Whole records from a trio stream (the RPC client and tests; the server reads its sockets itself)."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_record: int = MAX_RECORD) -> None:
        self._stream = stream
        self._records = RecordAssembler(max_record)

    async def read_record(self) -> bytes | None:
        """The next whole record (a copy: the caller may keep it), or None at the end of the stream."""
        while (record := self._records.next_record()) is None:
            chunk = await self._stream.receive_some(1 << 16)
            if not chunk:
                return None
            self._records.feed(chunk)
        return bytes(record)


def _mark(out: Encoder) -> Encoder:
    """Start a reply buffer with room for its record mark, filled in by `_sealed`."""
    out.data += b"\0\0\0\0"
    return out


def _sealed(out: Encoder) -> list[bytes | bytearray | memoryview]:
    """The reply's buffers, the first starting with its record mark: one last fragment."""
    _U32.pack_into(out.data, 0, LAST_FRAGMENT | (len(out) - 4))
    return out.buffers()


class _ClientGone(Exception):
    """The connection broke (reset by the client): nothing more can be sent on it."""


class _EndOfCalls(Exception):
    """The client closed its side: no more calls, though replies may still be read."""


class _Connection:
    """One client's TCP connection: nonblocking reads and writes on its socket, trio only to wait.

    Calls are read in order and answered as they complete. Replies that complete
    together leave in one writev: on loopback a syscall per small reply costs more than
    the call itself. A call's slot is freed only once its reply has left, so a client
    that stops reading replies stops being read.

    The socket is read and written with plain nonblocking syscalls, and trio is asked
    only to wait when one would block: a trio socket operation yields to the scheduler
    twice even when it need not wait, which cost a quarter of a 4 KiB READ's time.
    """

    def __init__(self, sock: trio.socket.SocketType, dispatcher: RpcDispatcher, client: str,
                 assembler: RecordAssembler) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        # trio's SocketStream caps unsent bytes at 16 KiB (TCP_NOTSENT_LOWAT), so a 1 MiB
        # READ reply left in about five writevs; 0 restores the system's limit (none by
        # default) and the reply leaves in one, 5% faster warm sequential reads.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 0)
        self._dispatcher = dispatcher
        self._client = client
        self._records = assembler
        self._unsent: list[bytes | bytearray | memoryview] = []  # buffers of queued replies, in wire order
        self._queued_bytes = 0  # every reply byte ever queued on this connection
        self._sent_bytes = 0  # ... and sent
        self._reply_ends: collections.deque[int] = collections.deque()  # _queued_bytes at the end of each reply
        self._free_slots = MAX_IN_FLIGHT
        self._slot_freed = trio.Event()
        self._reply_queued = trio.Event()
        #: Replies answered on the loop that are true only once their `ready` returns (stable
        #: writes: a sync). They wait until the calls at hand are read, so one sync covers them all.
        self._held: list[tuple[Callable[[], None], Encoder]] = []

    async def read_calls(self, nursery: trio.Nursery) -> bool:
        """Answer calls until the stream ends; a call that has to wait gets a task in `nursery`.

        True when the client closed its side in order, so replies still due should be sent.
        """
        unyielding = 0  # calls answered since this task last let others run
        try:
            while True:
                while not self._free_slots:
                    self._release_held()
                    self.send_nowait()  # replies answered at once hold slots until they leave
                    if self._free_slots:
                        break
                    await self._slot_freed.wait()
                    self._slot_freed = trio.Event()
                record = self._records.next_record()
                if record is None:
                    if self._held and self._receive_nowait():
                        continue  # calls that arrived meanwhile join the held ones: one sync for more writes
                    self._release_held()
                    self.send_nowait()
                    if not self._receive_nowait():
                        await trio.lowlevel.wait_readable(self._sock)
                        self._receive_nowait()
                        unyielding = 0
                    elif unyielding >= _YIELD_EVERY:
                        await trio.lowlevel.checkpoint()  # a client that never pauses must not starve the others
                        unyielding = 0
                    continue
                unyielding += 1
                self._free_slots -= 1
                out = _mark(Encoder())
                started = self._dispatcher.start(record, self._client, out)
                if isinstance(started, bool):
                    self._queue_reply(out if started else None)  # sent before the next wait
                elif isinstance(started, PendingCall):
                    if started.keeps_views:
                        self._records.lend()  # keep the record's bytes: a fresh buffer receives what follows
                    nursery.start_soon(self._finish, started, out)
                else:
                    self._held.append((started, out))
        except _EndOfCalls:
            try:
                self._release_held()
            except _ClientGone:
                return False
            return True
        except RecordTooLarge as exc:
            self._dispatcher.record_oversized()
            log.warning("closing RPC connection from %s: %s", self._client, exc)
        except _ClientGone:
            pass
        return False

    def _release_held(self) -> None:
        """Make the held replies true (the first sync covers the rest) and queue them.

        One whose `ready` fails is never sent as it stands: the connection is dropped, and
        the client resends its calls, which then meet the error on the ordinary path.
        """
        held, self._held = self._held, []
        for ready, out in held:
            try:
                ready()
            except Exception:
                log.exception("closing RPC connection from %s: a reply held for a sync cannot be made true",
                              self._client)
                raise _ClientGone() from None
            self._queue_reply(out)

    def _receive_nowait(self) -> bool:
        """Receive what the socket holds; False if it held nothing."""
        try:
            count = os.readv(self._fd, [self._records.free_space()])
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _ClientGone() from exc
        if not count:
            raise _EndOfCalls()
        self._records.received(count)
        return True

    async def _finish(self, call: PendingCall, out: Encoder) -> None:
        await call.finish()
        self._queue_reply(out)
        self._reply_queued.set()

    def _queue_reply(self, out: Encoder | None) -> None:
        """Queue a reply (None: the call needs none, its slot is free at once)."""
        if out is None:
            self._release(1)
            return
        self._unsent += _sealed(out)
        self._queued_bytes += len(out)
        self._reply_ends.append(self._queued_bytes)

    def _release(self, slots: int) -> None:
        self._free_slots += slots
        self._slot_freed.set()

    def send_nowait(self) -> None:
        """Send queued replies as far as the socket takes them without waiting."""
        while self._unsent:
            try:
                sent = os.writev(self._fd, self._unsent if len(self._unsent) <= _IOV_MAX else self._unsent[:_IOV_MAX])
            except BlockingIOError:
                self._reply_queued.set()  # the writer waits until the socket takes more
                return
            except OSError as exc:
                raise _ClientGone() from exc
            self._sent_bytes += sent
            if self._sent_bytes == self._queued_bytes:
                self._unsent.clear()
            else:
                self._drop_sent(sent)
            replies = 0
            while self._reply_ends and self._reply_ends[0] <= self._sent_bytes:
                self._reply_ends.popleft()
                replies += 1
            self._release(replies)

    def _drop_sent(self, sent: int) -> None:
        """After a short write: drop the buffers sent whole, and the sent part of the next."""
        done = 0
        for buffer in self._unsent:
            if sent < len(buffer):
                break
            sent -= len(buffer)
            done += 1
        del self._unsent[:done]
        if sent:
            self._unsent[0] = memoryview(self._unsent[0])[sent:]

    async def write_replies(self, scope: trio.CancelScope) -> None:
        """Send replies that complete while the reader waits, and any the socket could not take at once.

        If the client is gone, `scope` (the whole connection) is cancelled: its calls have no one to answer.
        """
        try:
            while True:
                await self._reply_queued.wait()
                self._reply_queued = trio.Event()
                await self.drain()
        except _ClientGone:
            scope.cancel()

    async def drain(self) -> None:
        """Send every queued reply, waiting for the socket to take them."""
        self.send_nowait()
        while self._unsent:
            await trio.lowlevel.wait_writable(self._sock)
            self.send_nowait()


async def _serve_connection(dispatcher: RpcDispatcher, max_record: int, stream: trio.SocketStream) -> None:
    client = str(stream.socket.getpeername()[0])
    dispatcher.connection_opened()
    connection = _Connection(stream.socket, dispatcher, client, RecordAssembler(max_record))
    try:
        async with trio.open_nursery() as tasks:
            tasks.start_soon(connection.write_replies, tasks.cancel_scope)
            async with trio.open_nursery() as calls:
                ended_in_order = await connection.read_calls(calls)
            if ended_in_order:
                with contextlib.suppress(_ClientGone):
                    await connection.drain()
            tasks.cancel_scope.cancel()
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
        await self._stream.send_all(b"".join(_sealed(out)))
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
