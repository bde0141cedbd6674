"""`serve_nfs` over the real datastore, driven by a real NFSv3 client (libnfs-utils).

The server runs in a background thread with its own trio loop on free ports; libnfs
is told both ports (`nfsport` + `mountport`), which skips the portmapper.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from appliance.datastore import sessions
from appliance.datastore.datastore import Datastore
from appliance.datastore.layout import overlay_path
from appliance.ingest.backup import backup
from appliance.store import ReadPath, init_store, open_store
from nfs_export import Export, NfsService, parse_networks, serve_nfs
from nfs_export.rpc_tcp import open_rpc_client
from overlay import Overlay, stalls
from tests import test_nfs_portmap
from tests.conftest import SMALL_CHUNK, write_image
from tests.test_nfs3 import (
    BADHANDLE,
    COMMIT,
    CREATE,
    FILE_SYNC,
    GETATTR,
    OK,
    READ,
    READDIR,
    REMOVE,
    ROFS,
    ROOT,
    SETATTR,
    UNSTABLE,
    WRITE,
    NfsClient,
    fattr,
    fixed,
    post_op,
    sattr,
)
from tests.test_nfs_rpc import background

T = TypeVar("T")
rpcbind = test_nfs_portmap.rpcbind  # the fixture
DISK_BYTES = 6 << 20
SECRET = b"k" * 32


@dataclass
class Served:
    datastore: Datastore
    service: NfsService
    image: Path
    point: str
    work: Path

    def url(self, path: str, service: NfsService | None = None) -> str:
        service = service or self.service
        return f"nfs://127.0.0.1{path}?nfsport={service.nfs_port}&mountport={service.mount_port}&version=3"


def run(*command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, capture_output=True, timeout=60, check=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_client(service: NfsService, work: Callable[[NfsClient], Awaitable[T]]) -> T:
    """Run `work` with a raw NFS client (as root) in a trio loop of its own."""

    async def main() -> T:
        nfs = await open_rpc_client("127.0.0.1", service.nfs_port, credential=ROOT)
        mount = await open_rpc_client("127.0.0.1", service.mount_port, credential=ROOT)
        try:
            return await work(NfsClient(nfs, mount))
        finally:
            await nfs.aclose()
            await mount.aclose()

    return trio.run(main)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A store with one restore point of vm1 and a session s1, served over NFS."""
    work = tmp_path_factory.mktemp("nfs-server")
    image = write_image(work / "disk.img", DISK_BYTES, seed=7)
    init_store(work / "store", chunk_size=SMALL_CHUNK)
    with open_store(work / "store") as store, store.reader_lock(), ReadPath(store) as read_path:
        point = backup(store, "vm1", [image])
        datastore = Datastore(store, read_path)
        sessions.create_session(store, datastore.namespace, read_path, "vm1", "latest", "s1")
        serve = partial(serve_nfs, datastore, handle_secret=SECRET, nfs_port=0, mount_port=0,
                        register_portmap=False)
        try:
            with background(serve) as service:
                yield Served(datastore, service, image, point.id, work)
        finally:
            datastore.close()


def test_nfs_ls_shows_the_datastore_tree(served: Served) -> None:
    top = run("nfs-ls", served.url("/"))
    assert top.returncode == 0, top.stderr
    assert sorted(line.split()[-1] for line in top.stdout.decode().splitlines()) == ["restore-points", "sessions"]
    listing = run("nfs-ls", "-R", served.url("/"))
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout.decode()
    assert f"restore-points/vm1/{served.point}/vm1-flat.vmdk" in text
    assert "sessions/s1/vm1.vmdk" in text


def test_nfs_cat_reads_the_restore_point_and_the_descriptor(served: Served) -> None:
    flat = run("nfs-cat", served.url(f"/restore-points/vm1/{served.point}/vm1-flat.vmdk"))
    assert flat.returncode == 0, flat.stderr
    assert sha256(flat.stdout) == sha256(served.image.read_bytes())
    descriptor = run("nfs-cat", served.url("/sessions/s1/vm1.vmdk"))
    assert b'createType="vmfs"' in descriptor.stdout and b'VMFS "vm1-flat.vmdk"' in descriptor.stdout


def test_nfs_cp_round_trips_through_a_session(served: Served) -> None:
    local = served.work / "upload.bin"
    local.write_bytes(write_image(served.work / "other.img", 3 << 20, seed=11).read_bytes()[: (3 << 20) - 5])
    upload = run("nfs-cp", str(local), served.url("/sessions/s1/upload.bin"))
    assert upload.returncode == 0, upload.stderr
    back = served.work / "download.bin"
    download = run("nfs-cp", served.url("/sessions/s1/upload.bin"), str(back))
    assert download.returncode == 0, download.stderr
    assert back.read_bytes() == local.read_bytes()


def test_session_disk_writes_never_touch_the_point(served: Served) -> None:
    """FILE_SYNC and UNSTABLE+COMMIT writes land in the session's overlay only."""
    expected = bytearray(served.image.read_bytes())
    writes = [(0, b"boot sector", FILE_SYNC), (65530, os.urandom(70000), UNSTABLE), (DISK_BYTES - 3, b"end", UNSTABLE)]

    async def write(client: NfsClient) -> None:
        status, folder = await client.mnt("/sessions/s1")
        assert status == OK
        flat = await client.lookup(folder, "vm1-flat.vmdk")
        for offset, data, stable in writes:
            await client.write(flat, offset, data, stable)
        await client.ok(COMMIT, flat, ("u64", 0), 0)

    with_client(served.service, write)
    for offset, data, _ in writes:
        expected[offset : offset + len(data)] = data
    session_disk = run("nfs-cat", served.url("/sessions/s1/vm1-flat.vmdk"))
    assert sha256(session_disk.stdout) == sha256(bytes(expected))
    point_disk = run("nfs-cat", served.url(f"/restore-points/vm1/{served.point}/vm1-flat.vmdk"))
    assert sha256(point_disk.stdout) == sha256(served.image.read_bytes())


def test_restore_points_refuse_writes(served: Served) -> None:
    local = served.work / "small.bin"
    local.write_bytes(b"must not land")
    folder = f"/restore-points/vm1/{served.point}"
    assert run("nfs-cp", str(local), served.url(f"{folder}/new.bin")).returncode != 0

    async def write(client: NfsClient) -> list[int]:
        status, folder_handle = await client.mnt(folder)
        assert status == OK
        flat = await client.lookup(folder_handle, "vm1-flat.vmdk")
        statuses = []
        for call in ((WRITE, flat, ("u64", 0), 1, FILE_SYNC, b"x"), (SETATTR, flat, lambda e: sattr(e, size=0), 0),
                     (REMOVE, folder_handle, "vm1.vmx"), (CREATE, folder_handle, "x", 0, lambda e: sattr(e))):
            statuses.append((await client.call(*call))[0])
        return statuses

    assert with_client(served.service, write) == [ROFS] * 4
    assert sha256(run("nfs-cat", served.url(f"{folder}/vm1-flat.vmdk")).stdout) == sha256(served.image.read_bytes())


def test_a_client_outside_the_export_is_refused(served: Served) -> None:
    serve = partial(serve_nfs, served.datastore, handle_secret=SECRET, nfs_port=0, mount_port=0,
                    register_portmap=False, export=Export(allow=parse_networks(["10.9.9.0/24"])))
    with background(serve) as service:
        listing = run("nfs-ls", served.url("/", service))
    assert listing.returncode != 0 and listing.stdout == b""


@pytest.mark.trio
async def test_handles_stay_valid_across_a_restart(served: Served) -> None:
    """Same secret: the old handle opens the same file; another secret: BADHANDLE."""
    ports = (0, 0)
    handles: list[bytes] = []
    seen: list[tuple[int, bytes]] = []
    for secret in (SECRET, SECRET, b"z" * 32):
        async with trio.open_nursery() as nursery:
            service: NfsService = await nursery.start(partial(
                serve_nfs, served.datastore, handle_secret=secret, nfs_port=ports[0], mount_port=ports[1],
                register_portmap=False))
            ports = (service.nfs_port, service.mount_port)  # a restart binds the same ports again
            nfs = await open_rpc_client("127.0.0.1", service.nfs_port, credential=ROOT)
            mount = await open_rpc_client("127.0.0.1", service.mount_port, credential=ROOT)
            client = NfsClient(nfs, mount)
            if not handles:
                folder = await client.lookup(await client.root(), "sessions")
                handles.append(await client.lookup(await client.lookup(folder, "s1"), "vm1.vmx"))
            status, reply = await client.call(GETATTR, handles[0])
            if secret == SECRET:
                assert status == OK
                fileid = fattr(reply)["fileid"]
                read = await client.ok(READ, handles[0], ("u64", 0), 64)
                post_op(read)
                read.uint32()
                read.bool()
                seen.append((fileid, read.opaque()))
            else:
                assert status == BADHANDLE
            await nfs.aclose()
            await mount.aclose()
            nursery.cancel_scope.cancel()
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0][1]


def test_qemu_finds_the_server_through_the_portmapper(served: Served, rpcbind: None) -> None:
    """QEMU asks port 111 and accepts no port options: registration must work."""
    serve = partial(serve_nfs, served.datastore, handle_secret=SECRET, nfs_port=0, mount_port=0)
    url = f"nfs://127.0.0.1/restore-points/vm1/{served.point}/vm1-flat.vmdk"
    with background(serve):
        info = run("qemu-img", "info", "-f", "raw", "--output=json", url)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == DISK_BYTES
        compare = run("qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(served.image))
        assert compare.returncode == 0, compare.stdout + compare.stderr
        copy = served.work / "converted.img"
        convert = run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(copy))
        assert convert.returncode == 0, convert.stderr
        assert copy.read_bytes() == served.image.read_bytes()
        for size in ("64K", "4K"):
            bench = run("qemu-img", "bench", "-f", "raw", "-c", "500", "-d", "16", "-s", size, url)
            assert bench.returncode == 0 and b"Run completed" in bench.stdout, bench.stderr
        session = "nfs://127.0.0.1/sessions/s1/vm1-flat.vmdk"
        writes = run("qemu-img", "bench", "-f", "raw", "-w", "-c", "200", "-d", "16", "-s", "64K", "--pattern=0x5a",
                     session)
        assert writes.returncode == 0, writes.stderr
        first = run("qemu-img", "convert", "-f", "raw", "-O", "raw", session, str(served.work / "session.img"))
        assert first.returncode == 0, first.stderr
        assert (served.work / "session.img").read_bytes() == b"\x5a" * DISK_BYTES  # 200 x 64K wraps the disk
        assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(served.image)).returncode == 0


class ThreadsThatWrote:
    """A `SessionIo` that notes the thread each session write was counted on."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def session_read(self, session: str, size: int) -> None:
        return None

    def session_written(self, session: str, size: int) -> None:
        self.threads.append(threading.current_thread().name)


def test_unstable_writes_skip_the_worker_threads_and_stable_ones_fsync(
        tmp_path: Path, rpcbind: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img's UNSTABLE writes are done on the event loop and land in the session disk;
    a FILE_SYNC write still goes through a worker thread and is durable before its reply
    (what an unstable write before it left unflushed may stay so: COMMIT is for that)."""
    monkeypatch.setattr(stalls, "STALL_SECONDS", 60.0)  # a slow test disk must not send writes to threads
    size = 4 << 20
    image = write_image(tmp_path / "disk.img", size, seed=3)
    init_store(tmp_path / "store", chunk_size=SMALL_CHUNK)
    wrote = ThreadsThatWrote()
    with open_store(tmp_path / "store") as store, store.reader_lock(), ReadPath(store) as read_path:
        point = backup(store, "vm1", [image])
        datastore = Datastore(store, read_path, session_io=wrote)
        session = sessions.create_session(store, datastore.namespace, read_path, "vm1", "latest", "s1")

        def on_disk(offset: int, length: int) -> bytes:
            """The disk as its files show it to a new opener: the map names blocks only after a flush."""
            durable = Overlay.open(overlay_path(store, session.inode, 0), read_path.disk(point, 0))
            try:
                return durable.read(offset, length)
            finally:
                durable.close()

        try:
            with background(partial(serve_nfs, datastore, handle_secret=SECRET, nfs_port=0, mount_port=0)) as service:
                bench = run("qemu-img", "bench", "-f", "raw", "-w", "-c", "200", "-d", "16", "-s", "64K",
                            "--pattern=0x5a", "nfs://127.0.0.1/sessions/s1/vm1-flat.vmdk")
                assert bench.returncode == 0, bench.stderr
                assert datastore.read(session.disks[0], 0, size) == b"\x5a" * size  # 200 x 64K wraps the disk
                unstable, synced = os.urandom(65536), os.urandom(5000)

                def write_past_the_end(offset: int, data: bytes, stable: int) -> None:
                    async def write(client: NfsClient) -> None:
                        status, folder = await client.mnt("/sessions/s1")
                        assert status == OK
                        await client.write(await client.lookup(folder, "vm1-flat.vmdk"), offset, data, stable)

                    with_client(service, write)

                write_past_the_end(size, unstable, UNSTABLE)
                assert on_disk(size, len(unstable)) == b""  # not flushed: the durable disk has not grown
                write_past_the_end(size + len(unstable), synced, FILE_SYNC)
                assert on_disk(size + len(unstable), len(synced)) == synced  # durable (through the journal)
        finally:
            datastore.close()
    assert len(wrote.threads) == 202  # qemu-img's 200 writes, then ours
    assert not any(name.startswith("nfs-worker-") for name in wrote.threads[:201])
    assert wrote.threads[201].startswith("nfs-worker-")


def wait_until_capturing(tshark: subprocess.Popen[str], port: int) -> None:
    """Probe with TCP connections until tshark shows one (its banner comes too early),
    then keep draining its packet list so a full pipe never stalls the capture."""
    assert tshark.stdout is not None
    deadline = time.monotonic() + 20
    while not select.select([tshark.stdout], [], [], 0.1)[0]:
        assert time.monotonic() < deadline and tshark.poll() is None, "tshark captures nothing"
        socket.create_connection(("127.0.0.1", port)).close()
    threading.Thread(target=tshark.stdout.read, daemon=True).start()


def test_wireshark_decodes_every_packet(served: Served) -> None:
    """tshark's RPC/NFS/MOUNT dissectors find no malformed call or reply."""
    ports = (served.service.nfs_port, served.service.mount_port)
    capture = served.work / "nfs.pcapng"
    tshark = subprocess.Popen(["tshark", "-i", "lo", "-s", "0", "-l", "-P", "-w", str(capture), "-f",
                               " or ".join(f"tcp port {p}" for p in ports)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_until_capturing(tshark, ports[0])
        assert run("nfs-ls", "-R", served.url("/")).returncode == 0
        assert run("nfs-cat", served.url("/sessions/s1/vm1.vmdk")).returncode == 0
        local = served.work / "wire.bin"
        local.write_bytes(os.urandom(300_000))
        assert run("nfs-cp", str(local), served.url("/sessions/s1/wire.bin")).returncode == 0

        async def errors(client: NfsClient) -> None:
            status, folder = await client.mnt("/sessions/s1")
            assert status == OK
            for call in ((GETATTR, b"x" * 25), (CREATE, folder, "wire.bin", 1, lambda e: sattr(e)),
                         (READDIR, folder, ("u64", 0), fixed(bytes(8)), 20)):
                await client.call(*call)
            await client.readdir(folder, 500, plus=True)

        with_client(served.service, errors)
        time.sleep(0.5)  # let the last packets reach the capture
    finally:
        tshark.terminate()
        tshark.wait(timeout=30)
    decode = ["tshark", "-r", str(capture)] + [a for p in ports for a in ("-d", f"tcp.port=={p},rpc")]
    summary = subprocess.run(decode, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "READDIRPLUS" in summary and "NFS3ERR_BADHANDLE" in summary and "MNT Reply" in summary, summary[-2000:]
    malformed = subprocess.run([*decode, "-Y", "_ws.malformed"], capture_output=True, text=True, timeout=60,
                               check=True)
    assert malformed.stdout == "", malformed.stdout
