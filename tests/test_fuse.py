"""The datastore through a real FUSE mount, driven by real tools (qemu-img, dd, fio)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import run_cli, sha256_of, write_image

DISK_BYTES = 6 << 20


def mounted(path: Path) -> bool:
    """Whether something is mounted on `path`, a dead FUSE mount included.

    `os.path.ismount` says False for a mount whose daemon died (stat fails with ENOTCONN),
    so it cannot tell when fusermount3 has cleaned one up.
    """
    escaped = str(path).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    with open("/proc/self/mounts") as table:
        return any(line.split()[1] == escaped for line in table)


class Mount:
    """`appliance mount` as a child process, started and stopped by PID."""

    def __init__(self, store: Path, mountpoint: Path) -> None:
        self.store, self.mountpoint = store, mountpoint
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--store", str(self.store), "mount", str(self.mountpoint)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None:
                raise AssertionError(f"mount exited: {self.process.stderr.read().decode()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise AssertionError("mount did not appear")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.process = None
        return code


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Path, Path, Mount, Path]]:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    run_cli("--store", str(store), "init", check=True)
    image = write_image(tmp_path / "disk.img", DISK_BYTES, seed=7)
    run_cli("--store", str(store), "backup", "--vm", "vm1", str(image), check=True)
    run_cli("--store", str(store), "session", "create", "--vm", "vm1", "--point", "latest", "--name", "s1",
            check=True)
    mount = Mount(store, mountpoint)
    mount.start()
    try:
        yield store, mountpoint, mount, image
        if mount.process is not None:
            assert mount.stop() == 0
        assert not mounted(mountpoint)
    finally:
        if mount.process is not None:
            mount.process.kill()
            mount.process.wait()
        if mounted(mountpoint):  # after a failure: a dead mount would hang whoever lists tmp next
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def point_dir(mountpoint: Path) -> Path:
    (point,) = (mountpoint / "restore-points" / "vm1").iterdir()
    return point


def test_qemu_reads_the_synthesized_vmdk(env: tuple[Path, Path, Mount, Path]) -> None:
    _, mountpoint, _, image = env
    folder = point_dir(mountpoint)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(folder / "vm1.vmdk")],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "vmdk" and info["virtual-size"] == DISK_BYTES
    assert info["format-specific"]["data"]["extents"][0]["filename"].endswith("vm1-flat.vmdk")
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(folder / "vm1-flat.vmdk"), str(image)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(folder / "vm1.vmdk"), str(image)],
                   check=True, capture_output=True)


def test_restore_points_are_read_only(env: tuple[Path, Path, Mount, Path]) -> None:
    _, mountpoint, _, _ = env
    folder = point_dir(mountpoint)
    for attempt in (lambda: open(folder / "vm1-flat.vmdk", "r+b"), lambda: open(folder / "new", "wb"),
                    lambda: os.unlink(folder / "vm1.vmx"), lambda: os.mkdir(folder / "d")):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS


def test_session_writes_persist_and_leave_the_point_alone(env: tuple[Path, Path, Mount, Path]) -> None:
    store, mountpoint, mount, image = env
    flat = mountpoint / "sessions" / "s1" / "vm1-flat.vmdk"
    base = point_dir(mountpoint) / "vm1-flat.vmdk"
    before = sha256_of(base)
    expected = bytearray(image.read_bytes())
    for offset, size in ((1, 1), (4095, 2), (65530, 70000), (1 << 20, 4096), (DISK_BYTES - 3, 3)):
        data = os.urandom(size)
        subprocess.run(["dd", f"of={flat}", "bs=1", f"seek={offset}", "conv=notrunc,fsync", "status=none"],
                       input=data, check=True)
        expected[offset : offset + size] = data
    assert flat.read_bytes() == bytes(expected)
    assert sha256_of(base) == before
    assert mount.stop() == 0
    mount.start()
    assert flat.read_bytes() == bytes(expected)
    assert sha256_of(point_dir(mountpoint) / "vm1-flat.vmdk") == sha256_of(image)


def test_file_operations_behave_like_a_local_fs(env: tuple[Path, Path, Mount, Path]) -> None:
    _, mountpoint, _, _ = env
    session = mountpoint / "sessions" / "s1"
    (session / "vmware.log").write_text("line 1\n")
    with open(session / "vmware.log", "a") as log:
        log.write("line 2\n")
    assert (session / "vmware.log").read_text() == "line 1\nline 2\n"
    os.rename(session / "vmware.log", session / "vmware-1.log")
    assert not (session / "vmware.log").exists()
    os.truncate(session / "vmware-1.log", 4)
    assert (session / "vmware-1.log").read_text() == "line"
    (session / "dir" / "sub").mkdir(parents=True)
    with pytest.raises(OSError) as caught:
        os.rmdir(session / "dir")
    assert caught.value.errno == errno.ENOTEMPTY
    os.rmdir(session / "dir" / "sub")
    os.rmdir(session / "dir")
    swap = session / "vm1.vswp"
    with open(swap, "wb") as handle:
        handle.truncate(1 << 30)  # sparse, as ESXi makes it
    assert swap.stat().st_size == 1 << 30
    os.unlink(swap)
    assert sorted(os.listdir(session)) == ["vm1-flat.vmdk", "vm1.vmdk", "vm1.vmx", "vmware-1.log"]
    with pytest.raises(OSError) as caught:
        (session / ("x" * 256)).write_text("")
    assert caught.value.errno == errno.ENAMETOOLONG
    inode = (session / "vmware-1.log").stat().st_ino
    os.rename(session / "vmware-1.log", session / "renamed.log")
    assert (session / "renamed.log").stat().st_ino == inode


def test_two_sessions_are_isolated(env: tuple[Path, Path, Mount, Path]) -> None:
    store, mountpoint, _, image = env
    run_cli("--store", str(store), "session", "create", "--vm", "vm1", "--point", "latest", "--name", "s2",
            check=True)
    with open(mountpoint / "sessions" / "s1" / "vm1-flat.vmdk", "r+b") as handle:
        handle.write(b"only in s1")
    assert (mountpoint / "sessions" / "s2" / "vm1-flat.vmdk").read_bytes() == image.read_bytes()


def test_commit_then_restore_equals_the_session(env: tuple[Path, Path, Mount, Path], tmp_path: Path) -> None:
    store, mountpoint, mount, _ = env
    flat = mountpoint / "sessions" / "s1" / "vm1-flat.vmdk"
    with open(flat, "r+b") as handle:
        handle.seek(3 << 20)
        handle.write(os.urandom(200_000))
    view = hashlib.sha256(flat.read_bytes()).hexdigest()
    busy = run_cli("--store", str(store), "session", "commit", "s1")
    assert busy.returncode == 75 and "being served" in busy.stderr
    assert mount.stop() == 0
    point = run_cli("--store", str(store), "session", "commit", "s1", check=True).stdout.split()[-1]
    run_cli("--store", str(store), "restore", "--vm", "vm1", "--point", point, "--output", str(tmp_path / "r.img"),
            check=True)
    assert sha256_of(tmp_path / "r.img") == view
    run_cli("--store", str(store), "session", "delete", "s1", check=True)
    assert json.loads(run_cli("--store", str(store), "session", "list", "--json", check=True).stdout) == []


def test_a_killed_mount_does_not_block_the_next(env: tuple[Path, Path, Mount, Path]) -> None:
    _, mountpoint, mount, image = env
    mount.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while mounted(mountpoint):
        assert time.monotonic() < deadline, "fusermount3 did not unmount after the daemon died"
        time.sleep(0.1)  # auto_unmount: fusermount3 cleans up after the dead process
    mount.start()
    assert (point_dir(mountpoint) / "vm1-flat.vmdk").read_bytes() == image.read_bytes()


@pytest.mark.slow
def test_fio_verified_random_writes(env: tuple[Path, Path, Mount, Path], tmp_path: Path) -> None:
    _, mountpoint, mount, _ = env
    flat = mountpoint / "sessions" / "s1" / "vm1-flat.vmdk"
    common = ["fio", "--name=verify", f"--filename={flat}", "--size=4m", "--bs=4k", "--rw=randwrite",
              "--ioengine=psync", "--verify=crc32c", "--randseed=11", "--output-format=json"]
    subprocess.run(common + ["--do_verify=1"], check=True, capture_output=True, cwd=tmp_path)
    assert mount.stop() == 0
    mount.start()
    subprocess.run(common + ["--verify_only"], check=True, capture_output=True, cwd=tmp_path)
