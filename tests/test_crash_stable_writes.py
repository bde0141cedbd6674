"""kill -9 of `serve` at 100 random moments during stable writes: every answered write survives.

The client is the stable-write benchmark's own ONC RPC client (`tests.bench.stable_writes`),
a peer that shares no code with the server. Each round starts `serve`, reads the whole
session disk back and checks it against what the earlier rounds were told, then keeps
WRITEs of 4 KiB to 64 KiB in flight (FILE_SYNC and DATA_SYNC, aligned to 4 KiB but not
to the overlay's 64 KiB blocks, so first writes to a block read-modify-write it), and
is killed with SIGKILL at a random moment after its first answered write.

What each 4 KiB page may hold (`Pages`): the bytes of the last write to it that was
answered, or of a write to it that was sent and never answered (it may or may not have
happened, and a killed write may land on some of its pages and not others). No two
writes in flight touch the same page, so the order of answered writes is the order
they were sent. After every restart a page must read as one of its candidates, and
what it reads is what it holds from then on (kill -9 loses no page cache: what a
restarted server reads is on disk or will be).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.bench.stable_writes import (
    DATA_SYNC,
    FILE_SYNC,
    NFS_PROGRAM,
    NFS_VERSION,
    NFS_WRITE,
    RpcConnection,
    check_write,
    file_handle,
    read,
    write_args,
)
from tests.conftest import run_cli, write_image
from tests.test_nfs_serve import free_port

PAGE = 4096
DISK_BYTES = 4 << 20
ROUNDS = 100
DEPTH = 8
HOST = "127.0.0.1"


class Pages:
    """The candidates of every page of the disk, as the client knows them."""

    def __init__(self, base: bytes) -> None:
        self.candidates = [[base[at:at + PAGE]] for at in range(0, len(base), PAGE)]

    def answered(self, offset: int, data: bytes) -> None:
        for index, at in enumerate(range(0, len(data), PAGE)):
            self.candidates[offset // PAGE + index] = [data[at:at + PAGE]]

    def unanswered(self, offset: int, data: bytes) -> None:
        for index, at in enumerate(range(0, len(data), PAGE)):
            self.candidates[offset // PAGE + index].append(data[at:at + PAGE])

    def check(self, disk: bytes, after: str) -> None:
        """Every page is one of its candidates; from now on it is exactly what it reads as."""
        assert len(disk) == DISK_BYTES, after
        for index, choices in enumerate(self.candidates):
            page = disk[index * PAGE:(index + 1) * PAGE]
            known = page in choices
            assert known, f"page {index} (offset {index * PAGE}) after {after}: none of its {len(choices)} candidates"
            self.candidates[index] = [page]


class Writer(threading.Thread):
    """Keeps DEPTH stable writes in flight until the connection dies; records every answer."""

    def __init__(self, connection: RpcConnection, handle: bytes, pages: Pages, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.connection, self.handle, self.pages, self.rng = connection, handle, pages, rng
        self.first_answer = threading.Event()
        self.answered = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        pending: dict[int, tuple[int, bytes, int]] = {}  # xid -> (offset, data, stable)
        busy: set[int] = set()  # pages a write in flight covers
        try:
            while True:
                while len(pending) < DEPTH:
                    offset, data = self._next(busy)
                    stable = self.rng.choice((FILE_SYNC, FILE_SYNC, DATA_SYNC))
                    xid = self.connection.send(NFS_PROGRAM, NFS_VERSION, NFS_WRITE,
                                               write_args(self.handle, offset, data, stable))
                    pending[xid] = (offset, data, stable)
                    busy.update(range(offset // PAGE, (offset + len(data)) // PAGE))
                xid, results = self.connection.receive()
                offset, data, stable = pending.pop(xid)
                check_write(results, len(data), stable)
                self.pages.answered(offset, data)
                busy.difference_update(range(offset // PAGE, (offset + len(data)) // PAGE))
                self.answered += 1
                self.first_answer.set()
        except (ConnectionError, OSError):
            for offset, data, _ in pending.values():
                self.pages.unanswered(offset, data)
        except BaseException as exc:  # a wrong answer: the test reports it
            self.error = exc
        finally:
            self.first_answer.set()

    def _next(self, busy: set[int]) -> tuple[int, bytes]:
        while True:
            pages = self.rng.choice((1, 2, 4, 16))
            first = self.rng.randrange(DISK_BYTES // PAGE - pages + 1)
            if busy.isdisjoint(range(first, first + pages)):
                return first * PAGE, self.rng.randbytes(pages * PAGE)


def start_serve(store: Path, ports: tuple[int, int], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance", "--store", str(store), "serve", "--no-portmap", "--no-api",
             "--no-metrics", "--nfs-port", str(ports[0]), "--mount-port", str(ports[1])],
            stdout=subprocess.DEVNULL, stderr=output)


def connect(process: subprocess.Popen[bytes], ports: tuple[int, int], log: Path) -> bytes:
    """The session disk's handle, once the restarted server answers."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return file_handle(HOST, ports[0], ports[1], "/", "sessions/s/vm-flat.vmdk")
        except (ConnectionError, OSError):
            assert process.poll() is None, f"serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "serve did not answer within 30 s"
            time.sleep(0.05)


def read_disk(ports: tuple[int, int], handle: bytes) -> bytes:
    connection = RpcConnection(HOST, ports[0])
    try:
        return b"".join(read(connection, handle, at, 1 << 20) for at in range(0, DISK_BYTES, 1 << 20))
    finally:
        connection.close()


@pytest.mark.slow
def test_every_answered_stable_write_survives_kill_9(tmp_path: Path) -> None:
    base = write_image(tmp_path / "vm.img", DISK_BYTES, seed=3)
    store = tmp_path / "store"
    run_cli("--store", str(store), "init", check=True)
    run_cli("--store", str(store), "backup", "--vm", "vm", str(base), check=True)
    run_cli("--store", str(store), "session", "create", "--vm", "vm", "--point", "latest", "--name", "s", check=True)
    pages = Pages(base.read_bytes())
    rng = random.Random(20261204)
    ports, log = (free_port(), free_port()), tmp_path / "serve.log"
    answered = 0
    for round_number in range(ROUNDS):
        process = start_serve(store, ports, log)
        try:
            handle = connect(process, ports, log)
            pages.check(read_disk(ports, handle), f"restart {round_number}")
            writer = Writer(RpcConnection(HOST, ports[0]), handle, pages, rng)
            writer.start()
            assert writer.first_answer.wait(30), "no write was answered within 30 s"
            time.sleep(rng.uniform(0, 0.3))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        writer.join(timeout=30)
        writer.connection.close()
        assert writer.error is None, f"round {round_number}: {writer.error!r}"
        answered += writer.answered
    process = start_serve(store, ports, log)
    try:
        pages.check(read_disk(ports, connect(process, ports, log)), "the last restart")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    exported = tmp_path / "exported.img"
    run_cli("--store", str(store), "session", "export", "s", "--disk", "0", "--output", str(exported), check=True)
    pages.check(exported.read_bytes(), "an offline export")
    assert answered > ROUNDS * 10, f"only {answered} writes were answered in {ROUNDS} rounds"
