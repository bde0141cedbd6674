"""`appliance serve`: NFS and FUSE from one process, stopped by SIGTERM, restarted with
the same handles; started and stopped by PID like an operator's service manager would."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nfs_export import NfsService
from nfs_export.portmap import PMAP_PORT
from tests.conftest import engine_of, run_cli, write_image
from tests.test_nfs3 import COMMIT, GETATTR, OK, UNSTABLE, NfsClient, fattr
from tests.test_nfs_server import with_client



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accepting(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Serve:
    """`appliance serve` as a child process on fixed free ports.

    With `portmap`, serve registers with the portmapper on port 111 (or answers as it),
    which QEMU's nfs:// driver needs: it cannot be told the ports.
    """

    def __init__(self, store: Path, *extra: str, portmap: bool = False) -> None:
        self.store, self.extra = store, extra
        self.portmap = portmap
        self.process: subprocess.Popen[bytes] | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        """Four distinct free ports (the kernel may hand the same free port to two probes in a row)."""
        picked: list[int] = []
        while len(picked) < 4:
            port = free_port()
            if port not in picked:
                picked.append(port)
        nfs, mount, metrics, api = picked
        self.ports = NfsService(nfs, mount, ())
        self.metrics_port = metrics
        self.api_port = api
        self.log_path = self.store.parent / f"serve-{self.api_port}.log"

    def log_text(self) -> str:
        """What serve wrote to stderr (a file: a pipe nobody reads would fill and block it)."""
        return self.log_path.read_text()

    def start(self) -> None:
        """Start and wait until it listens; new ports if another process took one meanwhile."""
        for _ in range(3):
            with self.log_path.open("ab") as log:
                self.process = self._spawn(log)
            deadline = time.monotonic() + 30
            ports = [self.ports.nfs_port, self.ports.mount_port, self.api_port, *([PMAP_PORT] if self.portmap else [])]
            while not all(map(accepting, ports)):
                if self.process.poll() is not None:
                    break
                assert time.monotonic() < deadline, "serve did not start listening"
                time.sleep(0.05)
            else:
                return
            if "address already in use" not in self.log_text().lower():
                raise AssertionError(f"serve exited: {self.log_text()}")
            self._pick_ports()
        raise AssertionError(f"serve found no free ports: {self.log_text()}")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "appliance", "--store", str(self.store), "serve",
                *([] if self.portmap else ["--no-portmap"]), "--nfs-port", str(self.ports.nfs_port),
                "--mount-port", str(self.ports.mount_port), "--metrics-port", str(self.metrics_port),
                "--api-port", str(self.api_port), *self.extra]

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.process = None
        return code

    def url(self, path: str) -> str:
        return f"nfs://127.0.0.1{path}?nfsport={self.ports.nfs_port}&mountport={self.ports.mount_port}&version=3"


@pytest.fixture
def store(tmp_path: Path, store_backend: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A store with one point of VM vm1 and a session s1 of it; packs in the S3 engine `store_backend` names."""
    store = tmp_path / "store"
    flags: list[str] = []
    engine = engine_of(request, store_backend)
    if engine is not None:
        flags = ["--s3-endpoint", engine.endpoint, "--s3-bucket", "appliance", "--s3-prefix",
                 f"{uuid.uuid4().hex[:12]}/", "--s3-credentials-file", str(engine.credentials_file)]
    run_cli("--store", str(store), "init", *flags, check=True)
    image = write_image(tmp_path / "disk.img", 2 << 20, seed=5)
    run_cli("--store", str(store), "backup", "--vm", "vm1", str(image), check=True)
    run_cli("--store", str(store), "session", "create", "--vm", "vm1", "--point", "latest", "--name", "s1",
            check=True)
    yield store


def serve_with_mount(store: Path, mountpoint: Path) -> Serve:
    """`serve --mount`, returned once both NFS and the FUSE mount are up."""
    mountpoint.mkdir()
    server = Serve(store, "--mount", str(mountpoint))
    server.start()
    deadline = time.monotonic() + 30
    while not os.path.ismount(mountpoint):
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError("FUSE mount did not appear")
        time.sleep(0.05)
    return server


def test_serve_nfs_and_fuse_from_one_process(store: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    server = serve_with_mount(store, mountpoint)
    try:
        local = tmp_path / "vmware.log"
        local.write_bytes(b"written over NFS, read over FUSE\n")
        copy = subprocess.run(["nfs-cp", str(local), server.url("/sessions/s1/vmware.log")], capture_output=True,
                              timeout=60, check=False)
        assert copy.returncode == 0, copy.stderr
        assert (mountpoint / "sessions" / "s1" / "vmware.log").read_bytes() == local.read_bytes()
        listing = subprocess.run(["nfs-ls", server.url("/sessions/s1")], capture_output=True, timeout=60, check=True)
        assert b"vmware.log" in listing.stdout and b"vm1-flat.vmdk" in listing.stdout
    finally:
        assert server.stop() == 0
    assert not os.path.ismount(mountpoint)
    key = store / "nfs-handle.key"
    assert len(key.read_bytes()) == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600


def test_metrics_count_the_traffic_of_a_live_serve(store: Path) -> None:
    server = Serve(store)
    server.start()
    try:
        for _ in range(3):
            subprocess.run(["nfs-cat", server.url("/sessions/s1/vm1.vmx")], capture_output=True, timeout=60,
                           check=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        assert server.stop() == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    reads = samples[("appliance_nfs_request_seconds_count", (("procedure", "READ"), ("program", "nfs")))]
    mounts = samples[("appliance_nfs_request_seconds_count", (("procedure", "MNT"), ("program", "mount")))]
    assert reads >= 3 and mounts >= 3
    assert samples[("appliance_session_read_bytes_total", (("session", "s1"),))] >= 3 * 10


@pytest.mark.store_backends
def test_fuse_writes_are_visible_over_nfs(store: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    server = serve_with_mount(store, mountpoint)
    try:
        data = os.urandom(3 * 65536 + 17)
        with open(mountpoint / "sessions" / "s1" / "vm1-flat.vmdk", "r+b") as disk:
            disk.seek(12345)
            disk.write(data)
            os.fsync(disk.fileno())
        (mountpoint / "sessions" / "s1" / "note.txt").write_text("from FUSE\n")
        flat = subprocess.run(["nfs-cat", server.url("/sessions/s1/vm1-flat.vmdk")], capture_output=True,
                              timeout=60, check=True).stdout
        assert flat[12345 : 12345 + len(data)] == data
        note = subprocess.run(["nfs-cat", server.url("/sessions/s1/note.txt")], capture_output=True,
                              timeout=60, check=True).stdout
        assert note == b"from FUSE\n"
    finally:
        assert server.stop() == 0


@pytest.mark.store_backends
def test_kill_9_after_commit_loses_nothing(store: Path, tmp_path: Path) -> None:
    """UNSTABLE writes covered by a successful COMMIT survive SIGKILL of the server."""
    server = Serve(store)
    server.start()
    writes = [(offset, os.urandom(size)) for offset, size in ((0, 4096), (70_000, 65536), (1 << 20, 131072 + 3))]

    async def write_and_commit(client: NfsClient) -> None:
        status, folder = await client.mnt("/sessions/s1")
        assert status == OK
        handle = await client.lookup(folder, "vm1-flat.vmdk")
        for offset, data in writes:
            await client.write(handle, offset, data, stable=UNSTABLE)
        await client.ok(COMMIT, handle, ("u64", 0), 0)

    try:
        with_client(server.ports, write_and_commit)
        assert server.process is not None
        server.process.kill()
        server.process.wait(timeout=30)
        server.process = None
        server.start()
        flat = subprocess.run(["nfs-cat", server.url("/sessions/s1/vm1-flat.vmdk")], capture_output=True,
                              timeout=60, check=True).stdout
        for offset, data in writes:
            assert flat[offset : offset + len(data)] == data
    finally:
        assert server.stop() == 0


@pytest.mark.store_backends
def test_handles_survive_a_process_restart(store: Path) -> None:
    server = Serve(store, "--export-path", "/datastore")
    server.start()

    async def first_handle(client: NfsClient) -> tuple[bytes, int]:
        status, folder = await client.mnt("/datastore/sessions/s1")
        assert status == OK
        handle = await client.lookup(folder, "vm1.vmx")
        return handle, (await client.getattr(handle))["fileid"]

    async def getattr_status(client: NfsClient) -> tuple[int, int]:
        status, reply = await client.call(GETATTR, handle)
        return status, fattr(reply)["fileid"] if status == OK else 0

    try:
        handle, fileid = with_client(server.ports, first_handle)
        assert server.stop() == 0
        server.start()
        assert with_client(server.ports, getattr_status) == (OK, fileid)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("arguments", "code", "fragment"), [
    (["--export-allow", "10.0.0.0/33"], 2, "--export-allow"),
    (["--nfs-port", "{busy}"], 1, "cannot listen on 127.0.0.1 port {busy}: Address already in use"),
])
def test_serve_errors_are_one_line(store: Path, arguments: list[str], code: int, fragment: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = run_cli("--store", str(store), "serve", "--no-portmap", "--mount-port", str(free_port()),
                         *[a.replace("{busy}", port) for a in arguments], timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert lines[-1].startswith("appliance: error:") and fragment.replace("{busy}", port) in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
