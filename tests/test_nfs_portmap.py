"""Portmapper: our own (for hosts without rpcbind) and registration with a real rpcbind."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from functools import partial

import pytest
import trio

from nfs_export.portmap import (
    IPPROTO_TCP,
    PMAP_PROGRAM,
    PMAP_V2,
    PmapProc,
    PortMapper,
    mapping,
    serve_portmap_registration,
)
from nfs_export.rpc import RpcDispatcher
from nfs_export.rpc_tcp import RpcClient, open_rpc_client, serve_rpc
from nfs_export.xdr import Decoder, Encoder

NFS = mapping(100003, 3, IPPROTO_TCP, 2049)
MOUNT = mapping(100005, 3, IPPROTO_TCP, 20048)


def encoded(item: mapping) -> bytes:
    e = Encoder()
    item.encode(e)
    return bytes(e.data)


async def getport(client: RpcClient, item: mapping) -> int:
    return (await client.call(PMAP_PROGRAM, PMAP_V2, PmapProc.GETPORT, encoded(item))).uint32()


async def dump(client: RpcClient) -> list[mapping]:
    reply = await client.call(PMAP_PROGRAM, PMAP_V2, PmapProc.DUMP)
    items = []
    while reply.bool():
        items.append(mapping.decode(reply))
    return items


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def rpcbind() -> Iterator[None]:
    """A real rpcbind on port 111: the one running, or one started here (stopped by PID)."""
    if listening(111):
        yield
        return
    if shutil.which("rpcbind") is None:
        pytest.fail("rpcbind is not installed (deploy/dev-setup.sh installs it)")
    process = subprocess.Popen(["rpcbind", "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not listening(111):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"rpcbind did not start: {process.stderr.read().decode() if process.stderr else ''}")
        time.sleep(0.05)
    yield
    process.terminate()
    process.wait(timeout=10)


def rpcinfo() -> str:
    return subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True, text=True, timeout=10,
                          check=True).stdout


@pytest.mark.trio
async def test_our_portmapper_answers_set_getport_dump_unset(nursery: trio.Nursery) -> None:
    port = await nursery.start(partial(serve_rpc, RpcDispatcher([PortMapper([NFS]).program()]), host="127.0.0.1",
                                       port=0))
    client = await open_rpc_client("127.0.0.1", port)
    call = partial(client.call, PMAP_PROGRAM, PMAP_V2)
    assert await getport(client, NFS) == 2049
    assert (await call(PmapProc.SET, encoded(MOUNT))).bool()
    assert not (await call(PmapProc.SET, encoded(mapping(100005, 3, IPPROTO_TCP, 999)))).bool()
    assert await getport(client, MOUNT) == 20048
    assert set(await dump(client)) == {NFS, MOUNT, mapping(PMAP_PROGRAM, PMAP_V2, IPPROTO_TCP, 111)}
    assert (await call(PmapProc.UNSET, encoded(MOUNT))).bool()
    assert await getport(client, MOUNT) == 0
    assert isinstance(await call(PmapProc.NULL), Decoder)
    await client.aclose()


@pytest.mark.trio
async def test_only_local_callers_may_change_the_map() -> None:
    mapper = PortMapper([NFS])
    dispatcher = RpcDispatcher([mapper.program()])
    for procedure, item in ((PmapProc.SET, MOUNT), (PmapProc.UNSET, NFS)):
        e = Encoder()
        for word in (1, 0, 2, PMAP_PROGRAM, PMAP_V2, procedure, 0, 0, 0, 0):
            e.uint32(word)
        item.encode(e)
        out = Encoder()
        await dispatcher.dispatch(e.data, "192.0.2.9", out)
        assert bytes(out.data)[-4:] == b"\0\0\0\0"  # FALSE
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_rpc, dispatcher, host="127.0.0.1", port=0))
        client = await open_rpc_client("127.0.0.1", port)
        assert (await getport(client, NFS), await getport(client, MOUNT)) == (2049, 0)
        await client.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_registration_falls_back_to_serving_a_portmapper(nursery: trio.Nursery) -> None:
    """No portmapper on the port: serve one; a second server then registers with it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await nursery.start(partial(serve_portmap_registration, [NFS], host="127.0.0.1", port=port))
    other = mapping(100005, 3, IPPROTO_TCP, 31000)
    with trio.CancelScope() as second:
        async with trio.open_nursery() as inner:
            await inner.start(partial(serve_portmap_registration, [other], host="127.0.0.1", port=port))
            client = await open_rpc_client("127.0.0.1", port)
            assert (await getport(client, NFS), await getport(client, other)) == (2049, 31000)
            second.cancel()
    assert await getport(client, other) == 0  # unregistered on shutdown
    await client.aclose()


def test_registration_with_rpcbind_and_removal_on_shutdown(rpcbind: None) -> None:
    maps = [mapping(100003, 3, IPPROTO_TCP, 32049), mapping(100005, 3, IPPROTO_TCP, 32048)]
    seen: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_portmap_registration, maps, host="127.0.0.1"))
            seen.append(await trio.to_thread.run_sync(rpcinfo))
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert "100003    3   tcp  32049" in seen[0] and "100005    3   tcp  32048" in seen[0]
    after = rpcinfo()
    assert "32049" not in after and "32048" not in after
