"""ONC RPC version 2 (RFC 5531) messages: call headers, credentials, replies, dispatch.

A program is a table from procedure number to `Procedure`; the dispatcher holds one
table from (program, version) to `Program`. Decoding the arguments, running the
handler and encoding the reply happen once, in `RpcDispatcher.dispatch`, so a handler
only ever sees decoded arguments and returns a result that knows how to encode itself.

Malformed input never reaches a handler: a call whose header or arguments do not
decode is answered GARBAGE_ARGS (or AUTH_ERROR for a bad credential), and the
transport (`nfs_export.rpc_tcp`) keeps the connection going.

Every message ends in one `CallOutcome`. The dispatcher's own counters
(`statistics()`) are derived from it, and an optional `CallObserver` hears each one
with its latency: that is how metrics reach this package without it importing them.
"""

from __future__ import annotations

import enum
import functools
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from nfs_export.xdr import Decoder, Encoder, XdrError

log = logging.getLogger(__name__)
A = TypeVar("A")
_TWO_WORDS = struct.Struct(">2I")
_THREE_WORDS = struct.Struct(">3I")
_ACCEPTED = struct.Struct(">6I")
_U32 = struct.Struct(">I")

RPC_VERSION = 2
MAX_AUTH_BYTES = 400
MAX_MACHINE_NAME = 255
MAX_GIDS = 16
NOBODY = 65534
#: Call headers a dispatcher remembers checked (see `_header_key`); it forgets them all
#: when full. A client sends a handful: one per procedure and credential it uses.
KNOWN_HEADERS = 256
#: Where the part of a call header that repeats from call to call begins: after the xid
#: and the message type.
_HEADER_START = 8
#: After rpcvers, prog, vers, proc and the credential's flavor: the credential's length.
_CREDENTIAL_LENGTH_AT = _HEADER_START + 5 * 4


class MsgType(enum.IntEnum):
    CALL = 0
    REPLY = 1


class ReplyStat(enum.IntEnum):
    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class AcceptStat(enum.IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RejectStat(enum.IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class AuthStat(enum.IntEnum):
    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5


class AuthFlavor(enum.IntEnum):
    AUTH_NONE = 0
    AUTH_SYS = 1


class CallOutcome(enum.StrEnum):
    """How the dispatcher ended one message: the reply it sent, or why it sent none."""

    SUCCESS = "success"
    PROG_UNAVAIL = "prog_unavail"
    PROG_MISMATCH = "prog_mismatch"
    PROC_UNAVAIL = "proc_unavail"
    GARBAGE_ARGS = "garbage_args"
    SYSTEM_ERR = "system_err"
    RPC_MISMATCH = "rpc_mismatch"
    AUTH_ERROR = "auth_error"
    #: Not a call at all (too short for an xid, or a REPLY): dropped without an answer.
    NOT_A_CALL = "not_a_call"
    #: A record over the transport's size limit: its connection was closed.
    RECORD_TOO_LARGE = "record_too_large"


class CallObserver(Protocol):
    """Hears every message the dispatcher ends (metrics), on the event loop.

    `program` is the number the call asked for (0 where its header did not decode, so
    possibly one no program serves); `procedure` is the name of the procedure that got
    the call, or "" when none did; `outcome` is a `CallOutcome` value; `seconds` runs
    from the record reaching the dispatcher to its reply being encoded.
    """

    def __call__(self, program: int, procedure: str, seconds: float, outcome: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Credential:
    """Who the client says is calling: AUTH_SYS fields, or nobody for AUTH_NONE."""

    flavor: AuthFlavor = AuthFlavor.AUTH_NONE
    uid: int = NOBODY
    gid: int = NOBODY
    gids: tuple[int, ...] = ()
    machine: str = ""
    stamp: int = 0

    def encode(self, encoder: Encoder) -> None:
        """The opaque_auth of this credential, as a client sends it."""
        encoder.uint32(self.flavor)
        if self.flavor is AuthFlavor.AUTH_NONE:
            encoder.opaque(b"")
            return
        body = Encoder()
        body.uint32(self.stamp)
        body.string(self.machine)
        body.uint32(self.uid)
        body.uint32(self.gid)
        body.array(self.gids, Encoder.uint32)
        encoder.opaque(body.data)


@dataclass(slots=True)
class Call:
    """The decoded header of one call, handed to the procedure with its arguments.

    Not frozen, like the other types made for every call (`_Prepared`, `_Ended`): a
    frozen dataclass's constructor costs four times as much.
    """

    xid: int
    program: int
    version: int
    procedure: int
    credential: Credential
    client: str  # the peer's IP address, for export rules


_NOBODY = Credential()


class Encodable(Protocol):
    def encode(self, encoder: Encoder) -> None: ...


@dataclass(frozen=True, slots=True)
class Void:
    """The empty result (NULL procedures, UMNT)."""

    def encode(self, encoder: Encoder) -> None:
        return None


def decode_void(decoder: Decoder) -> None:
    return None


@dataclass(frozen=True, slots=True)
class HeldResult:
    """A result computed on the event loop that is true only once `ready()` has returned.

    A stable WRITE done at once is durable only after a sync: the transport keeps such
    replies until it has read every call at hand, then calls each `ready` (the first
    sync covers the others: group commit) and sends them. `ready` may block on the disk;
    if it raises, the transport drops the connection instead of answering, so the client
    resends the call and gets the error from the ordinary path.
    """

    result: Encodable
    ready: Callable[[], None]


@dataclass(frozen=True, slots=True)
class Procedure(Generic[A]):
    """One procedure: how its arguments decode and the handler that answers them."""

    name: str
    decode: Callable[[Decoder], A]
    run: Callable[[Call, A], Awaitable[Encodable]]
    #: Answers on the event loop when it can do so at once, else None (then `run` answers).
    run_nowait: Callable[[Call, A], Encodable | HeldResult | None] | None = None
    #: The decoded arguments may be views of the call's record (a WRITE's data): the
    #: transport then keeps the record's bytes until the call has ended.
    keeps_views: bool = True


@dataclass(frozen=True, slots=True)
class Program:
    number: int
    version: int
    name: str
    procedures: Mapping[int, Procedure[Any]]


@dataclass(frozen=True, slots=True)
class RpcStatistics:
    calls: int
    garbage: int
    auth_errors: int
    system_errors: int
    unavailable: int
    connections: int
    oversized_records: int


@dataclass(slots=True)
class _Counters:
    calls: int = 0
    garbage: int = 0
    auth_errors: int = 0
    system_errors: int = 0
    unavailable: int = 0
    connections: int = 0
    oversized_records: int = 0


#: Which `_Counters` field each outcome other than SUCCESS adds to.
_COUNTED_AS: Mapping[CallOutcome, str] = {
    CallOutcome.GARBAGE_ARGS: "garbage",
    CallOutcome.NOT_A_CALL: "garbage",
    CallOutcome.AUTH_ERROR: "auth_errors",
    CallOutcome.SYSTEM_ERR: "system_errors",
    CallOutcome.PROG_UNAVAIL: "unavailable",
    CallOutcome.PROG_MISMATCH: "unavailable",
    CallOutcome.PROC_UNAVAIL: "unavailable",
    CallOutcome.RECORD_TOO_LARGE: "oversized_records",
}


@dataclass(slots=True)
class _Ended:
    """What became of one message, for the counters and the observer."""

    outcome: CallOutcome
    program: int = 0
    procedure: str = ""


class _AuthError(Exception):
    def __init__(self, stat: AuthStat) -> None:
        super().__init__(stat.name)
        self.stat = stat


def _opaque_auth(decoder: Decoder) -> tuple[int, memoryview]:
    """An opaque_auth: its flavor and body."""
    flavor, length = decoder.unpack(_TWO_WORDS)
    if length > MAX_AUTH_BYTES:
        raise XdrError(f"auth body of {length} bytes exceeds the limit of {MAX_AUTH_BYTES}")
    return flavor, decoder.fixed_view(length)


def _decode_credential(decoder: Decoder) -> Credential:
    flavor, body = _opaque_auth(decoder)
    if flavor == AuthFlavor.AUTH_NONE:
        return _NOBODY
    if flavor != AuthFlavor.AUTH_SYS:
        raise _AuthError(AuthStat.AUTH_BADCRED)
    return _auth_sys(body.tobytes())


#: A client sends the same AUTH_SYS body with every call: each is decoded once.
@functools.lru_cache(maxsize=1024)
def _auth_sys(body: bytes) -> Credential:
    fields = Decoder(body)
    try:
        stamp = fields.uint32()
        machine = fields.string(MAX_MACHINE_NAME)
        uid, gid = fields.uint32(), fields.uint32()
        gids = tuple(fields.array(Decoder.uint32, MAX_GIDS))
    except XdrError:
        raise _AuthError(AuthStat.AUTH_BADCRED) from None
    return Credential(AuthFlavor.AUTH_SYS, uid, gid, gids, machine, stamp)


def _header_key(record: bytes | bytearray | memoryview) -> bytes:
    """A call header's bytes from rpcvers through the verifier, found by the two auth
    lengths alone; empty if the record cannot hold them (the full decode says why).

    A client repeats these bytes in every call of a procedure (same program, credential
    and empty verifier), so a dispatcher checks a header once and then knows it by them:
    decoding it in full cost a third of a 4 KiB READ's dispatch.
    """
    size = len(record)
    if size < _CREDENTIAL_LENGTH_AT + 4:
        return b""
    (credential_length,) = _U32.unpack_from(record, _CREDENTIAL_LENGTH_AT)
    verifier_length_at = _CREDENTIAL_LENGTH_AT + 8 + credential_length + (-credential_length & 3)
    if credential_length > MAX_AUTH_BYTES or size < verifier_length_at + 4:
        return b""
    (verifier_length,) = _U32.unpack_from(record, verifier_length_at)
    end = verifier_length_at + 4 + verifier_length + (-verifier_length & 3)
    if verifier_length > MAX_AUTH_BYTES or size < end:
        return b""
    return bytes(record[_HEADER_START:end])


def _accepted(out: Encoder, xid: int, stat: AcceptStat) -> None:
    # xid, REPLY, MSG_ACCEPTED, verifier AUTH_NONE with an empty body, the accept status.
    out.data += _ACCEPTED.pack(xid, MsgType.REPLY, ReplyStat.MSG_ACCEPTED, AuthFlavor.AUTH_NONE, 0, stat)


def _denied(out: Encoder, xid: int, stat: RejectStat) -> None:
    out.uint32(xid)
    out.uint32(MsgType.REPLY)
    out.uint32(ReplyStat.MSG_DENIED)
    out.uint32(stat)


#: A checked call header: the program and procedure it names, the procedure's number, who calls.
_Header = tuple[Program, Procedure[Any], int, Credential]


@dataclass
class RpcDispatcher:
    """Routes calls to programs; transport-independent (a record in, a reply out)."""

    programs: list[Program]
    observe_call: CallObserver | None = None
    _table: dict[tuple[int, int], Program] = field(init=False)
    _versions: dict[int, tuple[int, int]] = field(init=False)
    _counters: _Counters = field(init=False, default_factory=_Counters)
    _headers: dict[bytes, _Header] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._table = {(p.number, p.version): p for p in self.programs}
        self._versions = {}
        for p in self.programs:
            low, high = self._versions.get(p.number, (p.version, p.version))
            self._versions[p.number] = (min(low, p.version), max(high, p.version))

    def statistics(self) -> RpcStatistics:
        c = self._counters
        return RpcStatistics(c.calls, c.garbage, c.auth_errors, c.system_errors, c.unavailable, c.connections,
                             c.oversized_records)

    def connection_opened(self) -> None:
        self._counters.connections += 1

    def record_oversized(self) -> None:
        self._ended(CallOutcome.RECORD_TOO_LARGE, 0, "", 0.0)

    def _ended(self, outcome: CallOutcome, program: int, procedure: str, seconds: float) -> None:
        """Count one message's outcome and tell the observer."""
        if outcome is not CallOutcome.SUCCESS:
            counted = _COUNTED_AS.get(outcome)
            if counted is not None:
                setattr(self._counters, counted, getattr(self._counters, counted) + 1)
        if self.observe_call is not None:
            self.observe_call(program, procedure, seconds, outcome)

    async def dispatch(self, record: bytes | bytearray | memoryview, client: str, out: Encoder) -> bool:
        """Answer one call message into `out`; False when there is nothing to answer.

        A message too short to hold an xid, or a REPLY, has no caller to answer.
        """
        started = self.start(record, client, out)
        if isinstance(started, PendingCall):
            return await started.finish()
        if not isinstance(started, bool):
            started()  # held until ready: here, at once
            return True
        return started

    def start(self, record: bytes | bytearray | memoryview, client: str,
              out: Encoder) -> bool | PendingCall | Callable[[], None]:
        """Answer what can be answered without waiting; else the call, to `finish` in a task.

        Errors in the header or arguments, and calls whose procedure answers them on the
        loop (`Procedure.run_nowait`), are done here: the transport spares them a task.
        A `HeldResult`'s reply is written too, and its `ready` returned: the transport
        calls it before it sends the reply.
        """
        started = time.perf_counter()
        prepared = self._prepare(record, client, out)
        if isinstance(prepared, _Ended):
            self._ended(prepared.outcome, prepared.program, prepared.procedure, time.perf_counter() - started)
            return prepared.outcome is not CallOutcome.NOT_A_CALL
        run_nowait = prepared.procedure.run_nowait
        if run_nowait is not None:
            try:
                result = run_nowait(prepared.call, prepared.args)
            except Exception:
                return PendingCall(self, prepared, out, started).failed()
            if isinstance(result, HeldResult):
                if self._encoded(prepared, result.result, out, started):
                    return result.ready
                return True  # it did not encode: SYSTEM_ERR is written and waits for nothing
            if result is not None:
                self._encoded(prepared, result, out, started)
                return True
        return PendingCall(self, prepared, out, started)

    def _encoded(self, prepared: _Prepared, result: Encodable, out: Encoder, started: float) -> bool:
        """Write a procedure's result as a SUCCESS reply; False (SYSTEM_ERR written) if it does not encode."""
        mark = len(out)
        try:
            _accepted(out, prepared.call.xid, AcceptStat.SUCCESS)
            result.encode(out)
        except Exception:
            out.discard_from(mark)
            PendingCall(self, prepared, out, started).failed()
            return False
        self._ended(CallOutcome.SUCCESS, prepared.program.number, prepared.procedure.name,
                    time.perf_counter() - started)
        return True

    def _prepare(self, record: bytes | bytearray | memoryview, client: str, out: Encoder) -> _Ended | _Prepared:
        """Decode a message up to its arguments; an `_Ended` (reply written) when it goes no further."""
        decoder = Decoder(record)
        try:
            xid, msg_type = decoder.unpack(_TWO_WORDS)
        except XdrError:
            return _Ended(CallOutcome.NOT_A_CALL)
        if msg_type != MsgType.CALL:
            return _Ended(CallOutcome.NOT_A_CALL)
        self._counters.calls += 1
        key = _header_key(record)
        header = self._headers.get(key)
        if header is not None:
            decoder.offset = _HEADER_START + len(key)
        else:
            checked = self._header(decoder, xid, out)
            if isinstance(checked, _Ended):
                return checked
            header = checked
            if key and decoder.offset == _HEADER_START + len(key):  # the key spans exactly what was checked
                if len(self._headers) >= KNOWN_HEADERS:
                    self._headers.clear()
                self._headers[key] = header
        program, procedure, procedure_number, credential = header
        try:
            args = procedure.decode(decoder)
        except XdrError as exc:
            log.debug("%s %s from %s: garbage arguments: %s", program.name, procedure.name, client, exc)
            _accepted(out, xid, AcceptStat.GARBAGE_ARGS)
            return _Ended(CallOutcome.GARBAGE_ARGS, program.number, procedure.name)
        return _Prepared(program, procedure,
                         Call(xid, program.number, program.version, procedure_number, credential, client), args)

    def _header(self, decoder: Decoder, xid: int, out: Encoder) -> _Ended | _Header:
        """The call header after the message type, checked: what a call's arguments need, or
        an `_Ended` (reply written) when the call goes no further."""
        try:
            if decoder.uint32() != RPC_VERSION:
                _denied(out, xid, RejectStat.RPC_MISMATCH)
                out.uint32(RPC_VERSION)
                out.uint32(RPC_VERSION)
                return _Ended(CallOutcome.RPC_MISMATCH)
            number, version, procedure_number = decoder.unpack(_THREE_WORDS)
            credential = _decode_credential(decoder)
            _opaque_auth(decoder)  # the verifier: AUTH_NONE or AUTH_SYS clients send nothing we check
        except XdrError:
            _accepted(out, xid, AcceptStat.GARBAGE_ARGS)
            return _Ended(CallOutcome.GARBAGE_ARGS)
        except _AuthError as exc:
            _denied(out, xid, RejectStat.AUTH_ERROR)
            out.uint32(exc.stat)
            return _Ended(CallOutcome.AUTH_ERROR)
        program = self._table.get((number, version))
        if program is None:
            versions = self._versions.get(number)
            if versions is None:
                _accepted(out, xid, AcceptStat.PROG_UNAVAIL)
                return _Ended(CallOutcome.PROG_UNAVAIL, number)
            _accepted(out, xid, AcceptStat.PROG_MISMATCH)
            out.uint32(versions[0])
            out.uint32(versions[1])
            return _Ended(CallOutcome.PROG_MISMATCH, number)
        procedure = program.procedures.get(procedure_number)
        if procedure is None:
            _accepted(out, xid, AcceptStat.PROC_UNAVAIL)
            return _Ended(CallOutcome.PROC_UNAVAIL, number)
        return program, procedure, procedure_number, credential


@dataclass(slots=True)
class _Prepared:
    """A call decoded up to its arguments, about to be run."""

    program: Program
    procedure: Procedure[Any]
    call: Call
    args: Any


class PendingCall:
    """A call whose procedure must wait (a worker thread, I/O): the transport awaits `finish`."""

    __slots__ = ("_dispatcher", "_prepared", "_out", "_started", "_start")

    def __init__(self, dispatcher: RpcDispatcher, prepared: _Prepared, out: Encoder, started: float) -> None:
        self._dispatcher, self._prepared, self._out, self._started = dispatcher, prepared, out, started
        self._start = len(out)

    @property
    def keeps_views(self) -> bool:
        """Whether the call's arguments may be views of its record (`Procedure.keeps_views`)."""
        return self._prepared.procedure.keeps_views

    async def finish(self) -> bool:
        """Run the procedure and write its reply; True (a call always has a caller to answer)."""
        try:
            result = await self._prepared.procedure.run(self._prepared.call, self._prepared.args)
        except Exception:
            return self.failed()
        self._dispatcher._encoded(self._prepared, result, self._out, self._started)
        return True

    def failed(self) -> bool:
        """After the procedure raised: SYSTEM_ERR, with the traceback in the log."""
        prepared = self._prepared
        log.exception("%s %s from %s failed", prepared.program.name, prepared.procedure.name, prepared.call.client)
        self._out.discard_from(self._start)
        _accepted(self._out, prepared.call.xid, AcceptStat.SYSTEM_ERR)
        self._dispatcher._ended(CallOutcome.SYSTEM_ERR, prepared.program.number, prepared.procedure.name,
                                time.perf_counter() - self._started)
        return True
