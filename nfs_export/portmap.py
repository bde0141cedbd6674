"""Portmapper (RFC 1833, version 2): how ESXi and QEMU find the NFS and MOUNT ports.

Neither can be told a port: both ask the portmapper on port 111. If rpcbind runs, we
register there with PMAP SET (after an UNSET, since rpcbind refuses to replace a stale
entry left by a killed run) and UNSET again on shutdown. rpcbind accepts SET/UNSET
over TCP only from a loopback address and a privileged source port, which the client
takes when it runs as root. If nothing listens on 111, this process answers as the
portmapper itself (NULL, SET, UNSET, GETPORT, DUMP), with our programs preloaded and
SET/UNSET taken from loopback callers only.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

import trio

from nfs_export.rpc import (
    Call,
    Encodable,
    Procedure,
    Program,
    RpcDispatcher,
    Void,
    decode_void,
)
from nfs_export.rpc_tcp import RpcCallError, open_rpc_client, serve_rpc
from nfs_export.xdr import Decoder, Encoder

log = logging.getLogger(__name__)

PMAP_PROGRAM = 100000
PMAP_V2 = 2
PMAP_PORT = 111
IPPROTO_TCP = 6
#: How long shutdown waits for rpcbind to take our UNSETs.
UNSET_TIMEOUT = 5.0


class PmapProc(enum.IntEnum):
    NULL = 0
    SET = 1
    UNSET = 2
    GETPORT = 3
    DUMP = 4


@dataclass(frozen=True, slots=True)
class mapping:
    prog: int
    vers: int
    prot: int
    port: int

    @classmethod
    def decode(cls, decoder: Decoder) -> mapping:
        return cls(decoder.uint32(), decoder.uint32(), decoder.uint32(), decoder.uint32())

    def encode(self, encoder: Encoder) -> None:
        for value in (self.prog, self.vers, self.prot, self.port):
            encoder.uint32(value)


@dataclass(frozen=True, slots=True)
class _Bool:
    value: bool

    def encode(self, encoder: Encoder) -> None:
        encoder.bool(self.value)


@dataclass(frozen=True, slots=True)
class _Port:
    port: int

    def encode(self, encoder: Encoder) -> None:
        encoder.uint32(self.port)


@dataclass(frozen=True, slots=True)
class pmaplist:
    maps: tuple[mapping, ...]

    def encode(self, encoder: Encoder) -> None:
        for item in self.maps:
            encoder.bool(True)
            item.encode(encoder)
        encoder.bool(False)


def _is_loopback(client: str) -> bool:
    address = ipaddress.ip_address(client)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class PortMapper:
    """The portmapper program, for hosts without rpcbind."""

    def __init__(self, maps: list[mapping]) -> None:
        self._maps: dict[tuple[int, int, int], int] = {(m.prog, m.vers, m.prot): m.port for m in maps}
        self._maps[(PMAP_PROGRAM, PMAP_V2, IPPROTO_TCP)] = PMAP_PORT

    def program(self) -> Program:
        procedures: dict[int, Procedure[Any]] = {
            PmapProc.NULL: Procedure("NULL", decode_void, self.null),
            PmapProc.SET: Procedure("SET", mapping.decode, self.set),
            PmapProc.UNSET: Procedure("UNSET", mapping.decode, self.unset),
            PmapProc.GETPORT: Procedure("GETPORT", mapping.decode, self.getport),
            PmapProc.DUMP: Procedure("DUMP", decode_void, self.dump),
        }
        return Program(PMAP_PROGRAM, PMAP_V2, "PORTMAP", procedures)

    async def null(self, call: Call, args: None) -> Encodable:
        return Void()

    async def set(self, call: Call, args: mapping) -> Encodable:
        key = (args.prog, args.vers, args.prot)
        if not _is_loopback(call.client) or key in self._maps:
            return _Bool(False)
        self._maps[key] = args.port
        return _Bool(True)

    async def unset(self, call: Call, args: mapping) -> Encodable:
        if not _is_loopback(call.client):
            return _Bool(False)
        doomed = [key for key in self._maps if key[:2] == (args.prog, args.vers)]
        for key in doomed:
            del self._maps[key]
        return _Bool(bool(doomed))

    async def getport(self, call: Call, args: mapping) -> Encodable:
        return _Port(self._maps.get((args.prog, args.vers, args.prot), 0))

    async def dump(self, call: Call, args: None) -> Encodable:
        return pmaplist(tuple(mapping(*key, port) for key, port in sorted(self._maps.items())))


async def _pmap_calls(port: int, calls: list[tuple[PmapProc, mapping]]) -> list[bool]:
    """Make SET/UNSET calls over one connection (each privileged source port then sits
    in TIME_WAIT for a minute, and there are only a few hundred of them)."""
    client = await open_rpc_client("127.0.0.1", port, reserved_port=True)
    try:
        answers = []
        for procedure, item in calls:
            encoder = Encoder()
            item.encode(encoder)
            answers.append((await client.call(PMAP_PROGRAM, PMAP_V2, procedure, encoder.data)).bool())
        return answers
    finally:
        await client.aclose()


async def register(maps: list[mapping], port: int = PMAP_PORT) -> None:
    """UNSET then SET each mapping with the portmapper on `port`; logs what it refuses."""
    answers = await _pmap_calls(port, [(proc, item) for item in maps for proc in (PmapProc.UNSET, PmapProc.SET)])
    for item, accepted in zip(maps, answers[1::2]):
        if not accepted:
            log.error("portmapper on port %d refused to register program %d version %d: clients that ask it "
                      "(ESXi, QEMU) will not find this server", port, item.prog, item.vers)


async def unregister(maps: list[mapping], port: int = PMAP_PORT) -> None:
    await _pmap_calls(port, [(PmapProc.UNSET, item) for item in maps])


async def serve_portmap_registration(maps: list[mapping], *, host: str, port: int = PMAP_PORT,
                                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Keep `maps` findable through the portmapper on `port` until cancelled.

    With a portmapper running: register, wait, unregister on cancellation. Without one:
    serve the portmapper ourselves on `host`:`port`. Reports `port` once registered.
    """
    try:
        await register(maps, port)
    except OSError:
        log.info("no portmapper on port %d: serving one", port)
        dispatcher = RpcDispatcher([PortMapper(maps).program()])
        await serve_rpc(dispatcher, host=host, port=port, task_status=task_status)
        return
    except RpcCallError as exc:
        log.error("portmapper on port %d failed: %s; clients must be told the ports", port, exc)
        task_status.started(port)
        return
    log.info("registered %s with the portmapper on port %d",
             ", ".join(f"{m.prog} v{m.vers} port {m.port}" for m in maps), port)
    task_status.started(port)
    try:
        await trio.sleep_forever()
    finally:
        with trio.move_on_after(UNSET_TIMEOUT) as scope:
            scope.shield = True
            try:
                await unregister(maps, port)
            except (OSError, RpcCallError) as exc:
                log.warning("could not unregister from the portmapper on port %d: %s", port, exc)
