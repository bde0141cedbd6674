"""ONC RPC (`rpc`, `rpc_tcp`): record marking, every reply status, pipelining, and fuzzing a live server.

`BackgroundServer` (a serve_* function in its own thread and trio loop) is shared with
the tests that drive the server with external clients.
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfs_export import Export, serve_nfs
from nfs_export.rpc import (
    AuthFlavor,
    Call,
    Credential,
    Encodable,
    HeldResult,
    Procedure,
    Program,
    RpcDispatcher,
    Void,
    decode_void,
)
from nfs_export.rpc_tcp import MAX_RECORD, RecordAssembler, RecordReader, RecordTooLarge, serve_rpc
from nfs_export.xdr import Decoder, Encoder
from tests.memory_vfs import MemoryVfs

TEST_PROGRAM = 0x2000_0001
LAST = 0x8000_0000


# ----- helpers ----------------------------------------------------------------------------


def call_record(xid: int, program: int, version: int, procedure: int, body: bytes = b"",
                credential: Credential | None = None, rpc_version: int = 2) -> bytes:
    e = Encoder()
    for word in (xid, 0, rpc_version, program, version, procedure):
        e.uint32(word)
    (credential or Credential()).encode(e)
    Credential().encode(e)
    return bytes(e.data) + body


def framed(record: bytes, pieces: int = 1) -> bytes:
    """`record` in `pieces` fragments of record marking."""
    size = -(-len(record) // pieces) or 1
    parts = [record[i : i + size] for i in range(0, len(record), size)] or [b""]
    out = b""
    for index, part in enumerate(parts):
        out += struct.pack(">I", len(part) | (LAST if index == len(parts) - 1 else 0)) + part
    return out


@dataclass
class Reply:
    xid: int
    accepted: bool
    stat: int
    rest: Decoder


def parse_reply(record: bytes) -> Reply:
    d = Decoder(record)
    xid = d.uint32()
    assert d.uint32() == 1  # REPLY
    if d.uint32() == 0:
        d.uint32()
        d.opaque()
        return Reply(xid, True, d.uint32(), d)
    return Reply(xid, False, d.uint32(), d)


class BlockingRpc:
    """Raw record I/O over a blocking socket (the fuzz tests' side of the wire)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def receive(self) -> bytes | None:
        """The next record, or None when the server closed the connection."""
        record = b""
        while True:
            header = self._exactly(4)
            if header is None:
                return None
            word = struct.unpack(">I", header)[0]
            fragment = self._exactly(word & ~LAST)
            if fragment is None:
                return None
            record += fragment
            if word & LAST:
                return record


class BackgroundServer:
    """Runs `serve(task_status=...)` in a thread with its own trio loop, stopped by `stop`."""

    def __init__(self, serve: Callable[..., Awaitable[None]]) -> None:
        self._serve = serve
        self._thread: threading.Thread | None = None
        self._cancel: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> Any:
        ready: queue.Queue[Any] = queue.Queue()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self._cancel, self._token = nursery.cancel_scope, trio.lowlevel.current_trio_token()
                ready.put(await nursery.start(self._serve))

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # noqa: BLE001  (handed to the starting thread, which raises it)
                ready.put(exc)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started = ready.get(timeout=30)
        if isinstance(started, BaseException):
            raise started
        return started

    def stop(self) -> None:
        assert self._thread is not None and self._cancel is not None
        trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


@contextmanager
def background(serve: Callable[..., Awaitable[None]]) -> Iterator[Any]:
    server = BackgroundServer(serve)
    started = server.start()
    try:
        yield started
    finally:
        server.stop()


# ----- record marking ---------------------------------------------------------------------


@pytest.mark.trio
@pytest.mark.parametrize("pieces", [1, 2, 7])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
async def test_records_reassemble_from_fragments_and_small_reads(pieces: int, chunk: int) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    records = [bytes(range(256)) * 3, b"", b"x" * 13]
    wire = b"".join(framed(r, pieces) for r in records)

    async def feed() -> None:
        for start in range(0, len(wire), chunk):
            await send.send_all(wire[start : start + chunk])
        await send.aclose()

    reader = RecordReader(receive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        got = [await reader.read_record() for _ in records]
        assert await reader.read_record() is None
    assert [bytes(r or b"") for r in got] == records


def test_lent_records_keep_their_bytes_while_more_arrive() -> None:
    assembler = RecordAssembler(capacity=64)
    first, second = b"a" * 20, b"b" * 24
    assembler.feed(framed(first) + framed(second) + framed(b"c" * 8)[:6])
    kept = assembler.next_record()
    assert kept is not None and bytes(kept) == first
    assembler.lend()  # a call that will be answered later holds `kept`
    assert bytes(assembler.next_record() or b"") == second
    assert assembler.next_record() is None
    assembler.feed(framed(b"c" * 8)[6:] + framed(b"d" * 40) + framed(b"e" * 60))  # needs room: moves and grows
    assert [bytes(assembler.next_record() or b"") for _ in range(3)] == [b"c" * 8, b"d" * 40, b"e" * 60]
    assert bytes(kept) == first


@pytest.mark.trio
async def test_a_record_over_the_limit_is_refused() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(struct.pack(">I", 60) + b"a" * 60 + struct.pack(">I", LAST | 60))
    with pytest.raises(RecordTooLarge):
        await RecordReader(receive, max_record=100).read_record()


# ----- dispatch ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Echo:
    data: bytes

    def encode(self, encoder: Encoder) -> None:
        encoder.opaque(self.data)


@dataclass(frozen=True)
class Filled:
    """A large reply whose data goes out by reference, in two pieces (as a READ's chunks do)."""

    size: int
    byte: int

    def encode(self, encoder: Encoder) -> None:
        half = bytes([self.byte]) * (self.size // 2)
        encoder.opaque_last([half, memoryview(bytes([self.byte]) * (self.size - len(half)))])


class TestProgram:
    __test__ = False

    def __init__(self) -> None:
        self.release = trio.Event()
        self.calls: list[Call] = []
        self.made_ready: list[int] = []  # xids whose held reply was made true, in order
        self.ready_fails = False

    async def echo(self, call: Call, data: bytes) -> Encodable:
        self.calls.append(call)
        return Echo(data)

    async def fail(self, call: Call, args: None) -> Encodable:
        raise RuntimeError("handler bug")

    async def slow(self, call: Call, args: None) -> Encodable:
        await self.release.wait()
        return Void()

    def program(self) -> Program:
        return Program(TEST_PROGRAM, 1, "TEST", {
            0: Procedure("NULL", decode_void, self.echo_void),
            1: Procedure("ECHO", lambda d: d.opaque(64), self.echo),
            2: Procedure("FAIL", decode_void, self.fail),
            3: Procedure("SLOW", decode_void, self.slow),
            4: Procedure("FILL", lambda d: (d.uint32(), d.uint32()), self.slow, run_nowait=self.fill),
            5: Procedure("HELD", decode_void, self.echo_void, run_nowait=self.held),
        })

    def held(self, call: Call, args: None) -> HeldResult:
        """Answered at once, true only after `ready` (as a stable write after its sync)."""
        def ready() -> None:
            if self.ready_fails:
                raise OSError(5, "Input/output error")
            self.made_ready.append(call.xid)
        return HeldResult(Void(), ready)

    async def echo_void(self, call: Call, args: None) -> Encodable:
        return Void()

    def fill(self, call: Call, args: tuple[int, int]) -> Encodable:
        return Filled(*args)


AUTH_SYS_BODY = bytes.fromhex("00000000" "00000001" "61000000" "000003e8" "000003e8" "00000000")
DISPATCH_CASES = [
    ("rpc version 3", call_record(1, TEST_PROGRAM, 1, 0, rpc_version=3), (False, 0, [2, 2])),
    ("unknown program", call_record(1, 0x2000_0002, 1, 0), (True, 1, [])),
    ("unknown version", call_record(1, TEST_PROGRAM, 9, 0), (True, 2, [1, 1])),
    ("unknown procedure", call_record(1, TEST_PROGRAM, 1, 99), (True, 3, [])),
    ("truncated arguments", call_record(1, TEST_PROGRAM, 1, 1, b"\0\0\0\x09ab"), (True, 4, [])),
    ("opaque over its limit", call_record(1, TEST_PROGRAM, 1, 1, b"\0\0\1\0" + bytes(256)), (True, 4, [])),
    ("truncated header", call_record(1, TEST_PROGRAM, 1, 0)[:20], (True, 4, [])),
    ("handler raises", call_record(1, TEST_PROGRAM, 1, 2), (True, 5, [])),
    ("unknown auth flavor", call_record(1, TEST_PROGRAM, 1, 0)[:24] + bytes.fromhex("0000000600000000" + "00" * 8),
     (False, 1, [1])),
    ("garbled AUTH_SYS", call_record(1, TEST_PROGRAM, 1, 0)[:24] + bytes.fromhex("0000000100000004ffffffff")
     + bytes(8), (False, 1, [1])),
]


@pytest.mark.trio
@pytest.mark.parametrize(("record", "expected"), [c[1:] for c in DISPATCH_CASES], ids=[c[0] for c in DISPATCH_CASES])
async def test_dispatcher_answers_every_kind_of_bad_call(record: bytes, expected: tuple[bool, int, list[int]]) -> None:
    dispatcher = RpcDispatcher([TestProgram().program()])
    out = Encoder()
    assert await dispatcher.dispatch(record, "127.0.0.1", out)
    reply = parse_reply(bytes(out.data))
    accepted, stat, details = expected
    assert (reply.xid, reply.accepted, reply.stat) == (1, accepted, stat)
    assert [reply.rest.uint32() for _ in details] == details
    assert reply.rest.remaining() == 0


@pytest.mark.trio
@pytest.mark.parametrize("record", [b"\0\0\0", call_record(5, TEST_PROGRAM, 1, 0)[:4] + b"\0\0\0\x01"],
                         ids=["no xid", "a reply"])
async def test_messages_without_a_caller_to_answer_are_dropped(record: bytes) -> None:
    assert not await RpcDispatcher([TestProgram().program()]).dispatch(record, "127.0.0.1", Encoder())


@pytest.mark.trio
async def test_auth_sys_credential_reaches_the_handler() -> None:
    test = TestProgram()
    credential = Credential(AuthFlavor.AUTH_SYS, 1000, 100, (4, 27), "esxi-01", stamp=9)
    out = Encoder()
    await RpcDispatcher([test.program()]).dispatch(
        call_record(3, TEST_PROGRAM, 1, 1, b"\0\0\0\x02hi\0\0", credential), "10.0.0.5", out)
    reply = parse_reply(bytes(out.data))
    assert (reply.accepted, reply.stat, reply.rest.opaque()) == (True, 0, b"hi")
    assert test.calls[0].credential == credential and test.calls[0].client == "10.0.0.5"


@pytest.mark.trio
async def test_a_header_seen_before_is_answered_as_the_first_time() -> None:
    """Checked headers are remembered by their bytes: a repeat must change nothing,
    for bad calls (never remembered) and for good calls with bad arguments alike."""
    dispatcher = RpcDispatcher([TestProgram().program()])
    good = call_record(1, TEST_PROGRAM, 1, 1, b"\0\0\0\x02hi\0\0")
    for round_ in range(2):
        for name, record, _ in DISPATCH_CASES:
            for candidate in (good, record):
                first, again = Encoder(), Encoder()
                assert await dispatcher.dispatch(candidate, "127.0.0.1", first)
                assert await dispatcher.dispatch(candidate, "127.0.0.1", again)
                assert bytes(first.data) == bytes(again.data), (name, round_)


@pytest.mark.trio
async def test_calls_that_differ_only_in_credential_or_arguments_are_told_apart() -> None:
    """More distinct credentials than a dispatcher remembers, each sent twice with its own
    xid and arguments: every handler call sees exactly its own."""
    test = TestProgram()
    dispatcher = RpcDispatcher([test.program()])
    sent = []
    for round_ in range(2):
        for uid in range(300):
            credential = Credential(AuthFlavor.AUTH_SYS, uid, 100 + uid % 3, (uid,), f"host-{uid % 7}", stamp=uid)
            xid, data = round_ * 1000 + uid, f"{round_}:{uid}".encode()
            body = struct.pack(">I", len(data)) + data + bytes(-len(data) % 4)
            out = Encoder()
            await dispatcher.dispatch(call_record(xid, TEST_PROGRAM, 1, 1, body, credential), "127.0.0.1", out)
            reply = parse_reply(bytes(out.data))
            assert (reply.xid, reply.accepted, reply.stat, reply.rest.opaque()) == (xid, True, 0, data)
            sent.append((xid, credential))
    assert [(call.xid, call.credential) for call in test.calls] == sent


# ----- a live server ----------------------------------------------------------------------


async def _receive(stream: trio.SocketStream, reader: RecordReader) -> Reply:
    record = await reader.read_record()
    assert record is not None
    return parse_reply(bytes(record))


@pytest.mark.trio
async def test_calls_on_one_connection_complete_out_of_order(nursery: trio.Nursery) -> None:
    test = TestProgram()
    port = await nursery.start(partial(serve_rpc, RpcDispatcher([test.program()]), host="127.0.0.1", port=0))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reader = RecordReader(stream)
    await stream.send_all(framed(call_record(1, TEST_PROGRAM, 1, 3)) + framed(call_record(2, TEST_PROGRAM, 1, 0), 3))
    assert (await _receive(stream, reader)).xid == 2  # the slow call does not hold up the next
    test.release.set()
    assert (await _receive(stream, reader)).xid == 1
    await stream.aclose()


@pytest.mark.trio
async def test_held_replies_wait_for_the_calls_at_hand_and_are_made_true_first(nursery: trio.Nursery) -> None:
    """Stable writes answered on the loop: every call in the batch is read, then each held reply is made
    true (one sync covers them), then sent; a call answered at once meanwhile is not held up."""
    test = TestProgram()
    port = await nursery.start(partial(serve_rpc, RpcDispatcher([test.program()]), host="127.0.0.1", port=0))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reader = RecordReader(stream)
    await stream.send_all(b"".join(framed(call_record(xid, TEST_PROGRAM, 1, 5)) for xid in (1, 2, 3))
                          + framed(call_record(4, TEST_PROGRAM, 1, 0)))
    replies = [await _receive(stream, reader) for _ in range(4)]
    assert sorted(reply.xid for reply in replies) == [1, 2, 3, 4]
    assert all((reply.accepted, reply.stat) == (True, 0) for reply in replies)
    assert test.made_ready == [1, 2, 3]
    await stream.aclose()


@pytest.mark.trio
async def test_a_held_reply_that_cannot_be_made_true_closes_its_connection_unanswered(
        nursery: trio.Nursery) -> None:
    test = TestProgram()
    test.ready_fails = True
    port = await nursery.start(partial(serve_rpc, RpcDispatcher([test.program()]), host="127.0.0.1", port=0))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(framed(call_record(1, TEST_PROGRAM, 1, 5)))
    assert await RecordReader(stream).read_record() is None  # closed, never a success it could not keep
    other = await trio.open_tcp_stream("127.0.0.1", port)
    await other.send_all(framed(call_record(2, TEST_PROGRAM, 1, 0)))
    assert (await _receive(other, RecordReader(other))).xid == 2  # the server goes on
    await stream.aclose()
    await other.aclose()


@pytest.mark.trio
async def test_replies_a_client_is_slow_to_read_arrive_whole_and_in_order(nursery: trio.Nursery) -> None:
    """Replies larger than the socket takes at once are sent in parts; the client waits meanwhile."""
    port = await nursery.start(partial(serve_rpc, RpcDispatcher([TestProgram().program()]), host="127.0.0.1", port=0))
    slow_reader = await trio.open_tcp_stream("127.0.0.1", port)
    sizes = [(200_001 + 7 * n, n % 251) for n in range(120)]  # 24 MB of replies, odd lengths (XDR padding)
    calls = b"".join(framed(call_record(n, TEST_PROGRAM, 1, 4, struct.pack(">II", size, byte)))
                     for n, (size, byte) in enumerate(sizes))
    nursery.start_soon(slow_reader.send_all, calls)
    await trio.sleep(0.3)  # the server fills the socket and stops reading this client's calls
    other = await trio.open_tcp_stream("127.0.0.1", port)
    await other.send_all(framed(call_record(999, TEST_PROGRAM, 1, 0)))
    assert (await _receive(other, RecordReader(other))).xid == 999  # the other client is not held up
    reader = RecordReader(slow_reader)
    for n, (size, byte) in enumerate(sizes):
        reply = await _receive(slow_reader, reader)
        assert (reply.xid, reply.accepted, reply.stat) == (n, True, 0)
        assert reply.rest.opaque() == bytes([byte]) * size and reply.rest.remaining() == 0
    await slow_reader.aclose()
    await other.aclose()


@pytest.mark.trio
async def test_an_oversized_record_closes_only_its_connection(nursery: trio.Nursery) -> None:
    dispatcher = RpcDispatcher([TestProgram().program()])
    port = await nursery.start(partial(serve_rpc, dispatcher, host="127.0.0.1", port=0))
    bad = await trio.open_tcp_stream("127.0.0.1", port)
    await bad.send_all(struct.pack(">I", LAST | (MAX_RECORD + 1)))
    assert await bad.receive_some(10) == b""
    good = await trio.open_tcp_stream("127.0.0.1", port)
    await good.send_all(framed(call_record(7, TEST_PROGRAM, 1, 0)))
    assert (await _receive(good, RecordReader(good))).xid == 7
    assert dispatcher.statistics().oversized_records == 1
    await bad.aclose()
    await good.aclose()


# ----- fuzzing ----------------------------------------------------------------------------

NULL_XID = 0xFEED_0000


class ErrorCatcher(logging.Handler):
    """Keeps the server's error log records (any would mean a handler bug)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[tuple[int, list[bytes]]]:
    """A read-only NFS+MOUNT server on one port, and valid calls to mutate."""
    vfs = MemoryVfs()
    folder = vfs.mkdir(vfs.root_inode, "d", 0o755, 0, 0)
    vfs.write(vfs.create(folder.inode, "f", 0o644, 0, 0, True).inode, 0, b"x" * 100)
    serve = partial(serve_nfs, vfs, handle_secret=b"f" * 32, export=Export(read_only=True), nfs_port=0,
                    mount_port=None, register_portmap=False)
    catcher = ErrorCatcher()
    errors = catcher.records
    logging.getLogger("nfs_export").addHandler(catcher)
    with background(serve) as service:
        rpc = BlockingRpc(service.nfs_port)
        rpc.send(framed(call_record(1, 100005, 3, 1, b"\0\0\0\x01/\0\0\0", Credential(AuthFlavor.AUTH_SYS, 0, 0))))
        reply = parse_reply(rpc.receive() or b"")
        assert reply.rest.uint32() == 0
        root = reply.rest.opaque()
        rpc.close()
        handle = struct.pack(">I", len(root)) + root
        root_cred = Credential(AuthFlavor.AUTH_SYS, 0, 0, (0,), "fuzz")
        calls = [
            call_record(2, 100003, 3, 1, handle, root_cred),  # GETATTR
            call_record(3, 100003, 3, 3, handle + b"\0\0\0\x01d\0\0\0", root_cred),  # LOOKUP
            call_record(4, 100003, 3, 6, handle + bytes(8) + b"\0\0\0\x10", root_cred),  # READ
            call_record(5, 100003, 3, 7, handle + bytes(8) + b"\0\0\0\x02\0\0\0\x02\0\0\0\x02ab\0\0", root_cred),
            call_record(6, 100003, 3, 17, handle + bytes(16) + b"\0\0\x10\0\0\0\x10\0", root_cred),  # READDIRPLUS
            call_record(7, 100005, 3, 1, b"\0\0\0\x02/d\0\0"),  # MNT
            call_record(8, 100003, 3, 2, handle + bytes(24) + b"\0\0\0\0", root_cred),  # SETATTR
        ]
        yield service.nfs_port, calls
        statistics = service.statistics()
    logging.getLogger("nfs_export").removeHandler(catcher)
    assert statistics.system_errors == 0 and not errors, [r.getMessage() for r in errors]
    assert statistics.garbage > 0 and statistics.calls > 300, statistics


def _exchange(port: int, wire: bytes) -> None:
    """Send fuzz bytes then a NULL call; every reply must parse, then the NULL's must come
    (unless the server closed the connection), and a fresh connection must still work."""
    rpc = BlockingRpc(port)
    try:
        rpc.send(wire + framed(call_record(NULL_XID, 100003, 3, 0)))
        while (record := rpc.receive()) is not None:
            reply = parse_reply(record)
            if reply.xid == NULL_XID:
                break
    except (ConnectionResetError, BrokenPipeError):
        pass  # closing the connection is an allowed answer to garbage
    finally:
        rpc.close()
    fresh = BlockingRpc(port)
    fresh.send(framed(call_record(NULL_XID + 1, 100003, 3, 0)))
    reply = parse_reply(fresh.receive() or b"")
    assert (reply.xid, reply.accepted, reply.stat) == (NULL_XID + 1, True, 0)
    fresh.close()


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(index=st.integers(0, 6), cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400),
       st.integers(0, 255)), max_size=6), pieces=st.integers(1, 4))
def test_mutated_calls_get_an_answer_or_a_closed_connection(fuzz_target: tuple[int, list[bytes]], index: int,
                                                           cut: int, flips: list[tuple[int, int]],
                                                           pieces: int) -> None:
    port, calls = fuzz_target
    record = bytearray(calls[index][: max(cut, 8)])
    for position, value in flips:
        if position < len(record):
            record[position] = value
    _exchange(port, framed(bytes(record), pieces))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_never_take_the_server_down(fuzz_target: tuple[int, list[bytes]], data: bytes) -> None:
    port, _ = fuzz_target
    rpc = BlockingRpc(port)
    rpc.send(data)
    rpc.close()
    _exchange(port, framed(data))
