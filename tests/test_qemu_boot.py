"""A real guest booted by QEMU from a backup over the appliance's NFS export, and the
QMP client and guest lifecycle under it, against real QEMU processes (never mocks).

The guest boots from its disk's own bootloader (appliance/demo/guest_image.py), as a hypervisor
boots a VM; one test boots the kernel given to QEMU instead. The end-to-end tests run
`appliance serve` and QEMU in a private network namespace (appliance/hypervisor/netns.py): QEMU finds
the server through the portmapper on port 111, which serve answers itself there, so
other NFS servers on this machine cannot interfere. The product's own path (the CLI,
the API's jobs) is tested in tests/test_instant_boot_qemu.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import HypervisorError, HypervisorTimeout, InvalidName, QmpCommandFailed
from appliance.hypervisor import QemuGuest, boot_guest, connect_qmp, session_disk_url
from appliance.hypervisor.qemu import RECORD_NAME
from tests.conftest import run_cli, sha256_of
from appliance.demo.guest_image import BOOTED_MARKER, DONE_MARKER, GuestImage, build_guest, guest_file, kernel_append
from appliance.hypervisor.netns import private_network
from tests.test_nfs_serve import Serve

VM = "vm1"
SESSION = "s1"
MEMORY_MIB = 256
BOOT_TIMEOUT = 180.0
MIGRATE_RUN_SECONDS = 20


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return build_guest()


def backed_up(tmp_path: Path, disk: Path, vms: tuple[str, ...] = (VM,)) -> Path:
    """A new store holding `disk` as the latest point of each of `vms`."""
    store = tmp_path / "store"
    run_cli("--store", str(store), "init", check=True)
    for vm in vms:
        run_cli("--store", str(store), "backup", "--vm", vm, str(disk), check=True)
    return store


def backed_up_session(tmp_path: Path, disk: Path) -> Path:
    """A store holding `disk` as the latest point of VM, with session SESSION of it."""
    store = backed_up(tmp_path, disk)
    run_cli("--store", str(store), "session", "create", "--vm", VM, "--point", "latest", "--name", SESSION,
            check=True)
    return store


def exported_disk(store: Path, tmp_path: Path, name: str, session: str = SESSION) -> Path:
    """Disk 0 of `session` as the guest left it (through the API while `serve` runs)."""
    output = tmp_path / name
    run_cli("--store", str(store), "session", "export", session, "--disk", "0", "--output", str(output), check=True)
    return output


def restored_disk(store: Path, tmp_path: Path, vm: str = VM) -> Path:
    """Disk 0 of `vm`'s latest restore point, as a file (the restore point itself, never a session)."""
    output = tmp_path / f"restored-{vm}.img"
    run_cli("--store", str(store), "restore", "--vm", vm, "--point", "latest", "--disk", "0", "--output",
            str(output), check=True)
    return output


@contextlib.contextmanager
def booted_over_nfs(store: Path, run_dir: Path, guests: list[QemuGuest]) -> Iterator[tuple[QemuGuest, Serve]]:
    """Serve `store` and boot session SESSION's disk from it (its bootloader), both in a private network."""
    with private_network():
        server = Serve(store, portmap=True)
        server.start()
        try:
            guest = boot_guest(run_dir, [session_disk_url("127.0.0.1", SESSION, VM)], MEMORY_MIB)
            guests.append(guest)
            yield guest, server
        finally:
            if server.process is not None:
                assert server.stop() == 0


@pytest.mark.slow
def test_guest_boots_from_its_backup_over_nfs_and_writes_only_into_the_session(
        guest_image: GuestImage, guests: list[QemuGuest], tmp_path: Path) -> None:
    guest_disk = guest_image.copy_disk(tmp_path / "guest.img")
    original = sha256_of(guest_disk)
    store = backed_up_session(tmp_path, guest_disk)
    with booted_over_nfs(store, tmp_path / "run", guests) as (guest, _):
        guest.wait_for_console(BOOTED_MARKER, BOOT_TIMEOUT)
        guest.wait_for_console(DONE_MARKER, BOOT_TIMEOUT)
        guest.wait_exit(60)
    session_disk = exported_disk(store, tmp_path, "session.img")
    started = guest_file(session_disk, "/guest/started")
    assert started is not None and started.startswith("booted ")
    assert guest_file(session_disk, "/guest/finished") == "finished after 0 seconds\n"
    point_disk = restored_disk(store, tmp_path)
    assert sha256_of(point_disk) == original
    assert guest_file(point_disk, "/guest/started") is None


@pytest.mark.slow
def test_mirror_moves_the_running_guest_off_nfs(guest_image: GuestImage, guests: list[QemuGuest],
                                                tmp_path: Path) -> None:
    """drive-mirror mid-run, then serve stops: the guest finishes on the local copy alone."""
    guest_disk = guest_image.copy_disk(tmp_path / "guest.img", MIGRATE_RUN_SECONDS)
    original = sha256_of(guest_disk)
    store = backed_up_session(tmp_path, guest_disk)
    run_dir = tmp_path / "run"
    with booted_over_nfs(store, run_dir, guests) as (guest, server):
        guest.wait_for_console("APPLIANCE-GUEST: progress 2", BOOT_TIMEOUT)
        (local,) = QemuGuest.load(run_dir).mirror_disks(tmp_path / "local")
        assert DONE_MARKER not in guest.console_text(), "the guest finished before the mirror did"
        assert server.stop() == 0
        assert guest.is_running(), "the guest did not survive the NFS server stopping after the mirror"
        guest.wait_for_console(DONE_MARKER, BOOT_TIMEOUT)
        guest.wait_exit(60)
    assert QemuGuest.load(run_dir).record.disks == [str(local)]
    assert local.parent == (tmp_path / "local").resolve()
    assert guest_file(local, "/guest/finished") == f"finished after {MIGRATE_RUN_SECONDS} seconds\n"
    assert guest_file(local, "/guest/progress") == "".join(f"{i}\n" for i in range(1, MIGRATE_RUN_SECONDS + 1))
    session_disk = exported_disk(store, tmp_path, "session.img")
    assert guest_file(session_disk, "/guest/started") == guest_file(local, "/guest/started")
    assert guest_file(session_disk, "/guest/finished") is None
    progress = guest_file(session_disk, "/guest/progress")
    assert progress is not None and 2 <= len(progress.splitlines()) < MIGRATE_RUN_SECONDS
    assert sha256_of(restored_disk(store, tmp_path)) == original


@pytest.mark.slow
def test_a_guest_outlives_the_process_that_booted_it(guest_image: GuestImage, guests: list[QemuGuest],
                                                     tmp_path: Path) -> None:
    """Boot from a child process that exits; this process finds the guest by its run directory."""
    guest_disk = guest_image.copy_disk(tmp_path / "guest.img", 600)
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from appliance.hypervisor import boot_guest
        boot_guest(Path({str(run_dir)!r}), [Path({str(guest_disk)!r})], {MEMORY_MIB})
    """)
    subprocess.run([sys.executable, "-c", script], timeout=BOOT_TIMEOUT, check=True)
    guest = QemuGuest.load(run_dir)
    guests.append(guest)
    assert guest.is_running()
    guest.wait_for_console(BOOTED_MARKER, BOOT_TIMEOUT)
    with pytest.raises(HypervisorError, match="already runs from"):
        boot_guest(run_dir, [guest_disk])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "guest.raw").write_bytes(b"an operator's file")
    with pytest.raises(HypervisorError, match="guest.raw already exists"):
        guest.mirror_disks(taken)
    assert (taken / "guest.raw").read_bytes() == b"an operator's file"
    with guest.qmp() as qmp:
        qmp.execute("stop")  # a paused guest cannot answer the ACPI power button: QMP quit ends it
    assert guest.power_off(timeout=2) == "quit"
    assert not guest.is_running()
    assert guest.power_off() == "not running"
    guest.wait_exit(1)
    with pytest.raises(HypervisorError, match="is not running: nothing to mirror"):
        guest.mirror_disks(tmp_path / "late")


@pytest.fixture
def full_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 256 KiB tmpfs: a mirror target there runs out of space."""
    path = tmp_path / "full"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], timeout=30, check=True)
    yield path
    subprocess.run(["umount", str(path)], timeout=30, check=True)


@pytest.mark.slow
def test_a_failed_mirror_leaves_the_guest_on_its_disks(guest_image: GuestImage, guests: list[QemuGuest],
                                                       tmp_path: Path, full_directory: Path) -> None:
    guest_disk = guest_image.copy_disk(tmp_path / "guest.img", 600)
    guest = boot_guest(tmp_path / "run", [guest_disk], MEMORY_MIB)
    guests.append(guest)
    guest.wait_for_console(BOOTED_MARKER, BOOT_TIMEOUT)
    with pytest.raises(HypervisorError, match="mirror-disk0 .* ended with BLOCK_JOB_COMPLETED: No space left"):
        guest.mirror_disks(full_directory)
    assert not any(full_directory.iterdir())
    assert guest.is_running()
    assert QemuGuest.load(tmp_path / "run").record.disks == [str(guest_disk)]
    with guest.qmp() as qmp:
        assert [device["inserted"]["file"] for device in qmp.execute("query-block")] == [str(guest_disk)]
        assert qmp.execute("query-block-jobs") == []


@pytest.mark.slow
def test_a_kernel_given_to_qemu_boots_instead_of_the_disks_bootloader(guest_image: GuestImage,
                                                                     guests: list[QemuGuest], tmp_path: Path) -> None:
    """`boot_guest(kernel=...)`: QEMU's -kernel/-initrd/-append win over the disk's syslinux.cfg.

    The disk's own configuration runs the guest 0 seconds; the command line given here says 1.
    """
    guest_disk = guest_image.copy_disk(tmp_path / "guest.img")
    guest = boot_guest(tmp_path / "run", [guest_disk], MEMORY_MIB, kernel=guest_image.kernel,
                       initrd=guest_image.initrd, append=kernel_append(1))
    guests.append(guest)
    guest.wait_for_console(DONE_MARKER, BOOT_TIMEOUT)
    guest.wait_exit(60)
    assert "Loading /vmlinuz" not in guest.console_text()  # syslinux never ran
    assert guest_file(guest_disk, "/guest/finished") == "finished after 1 seconds\n"


def test_boot_fails_with_qemus_message_for_a_missing_disk(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-disk.img"
    with pytest.raises(HypervisorError, match="could not start the guest.*no-such-disk.img"):
        boot_guest(tmp_path / "run", [missing], accel="tcg")
    assert not (tmp_path / "run" / RECORD_NAME).exists()


def test_load_names_the_run_directory_without_a_guest(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match=f"no guest was booted in {tmp_path}"):
        QemuGuest.load(tmp_path)


@pytest.mark.parametrize(("host", "session", "disk", "export", "url"), [
    ("127.0.0.1", "s1", "vm1", "/", "nfs://127.0.0.1/sessions/s1/vm1-flat.vmdk"),
    ("10.0.0.5", "s1", "vm1_1", "/datastore", "nfs://10.0.0.5/datastore/sessions/s1/vm1_1-flat.vmdk"),
    ("::1", "boot test", "vm1", "/datastore/", "nfs://[::1]/datastore/sessions/boot%20test/vm1-flat.vmdk"),
    ("backup.example", "s1", "db", "/", "nfs://backup.example/sessions/s1/db-flat.vmdk"),
])
def test_session_disk_url(host: str, session: str, disk: str, export: str, url: str) -> None:
    assert session_disk_url(host, session, disk, export) == url


def test_session_disk_url_refuses_a_path_as_a_name() -> None:
    with pytest.raises(InvalidName):
        session_disk_url("127.0.0.1", "../restore-points", "vm1")


@pytest.fixture
def qmp_qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A QEMU without a machine (`-machine none`): QMP only, started in a second."""
    path = tmp_path / "qmp.sock"
    process = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                                "-qmp", f"unix:{path},server=on,wait=off"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not path.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else b""
        assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
        time.sleep(0.02)
    yield process, path
    process.kill()
    process.wait(timeout=30)


def test_qmp_runs_commands_and_reports_errors_by_class(qmp_qemu: tuple[subprocess.Popen[bytes], Path]) -> None:
    with connect_qmp(qmp_qemu[1]) as qmp:
        assert qmp.greeting["QMP"]["version"]["qemu"]["major"] >= 7
        assert qmp.execute("query-status")["status"] == "running"
        with pytest.raises(QmpCommandFailed, match="refused no-such-command") as unknown:
            qmp.execute("no-such-command")
        assert unknown.value.error_class == "CommandNotFound"
        with pytest.raises(QmpCommandFailed, match="Block job 'no-such-job' not found") as missing:
            qmp.execute("block-job-complete", {"device": "no-such-job"})
        assert missing.value.error_class == "DeviceNotActive"
        assert qmp.execute("query-status")["status"] == "running"  # the connection survives errors


def test_qmp_keeps_events_that_arrive_before_they_are_awaited(
        qmp_qemu: tuple[subprocess.Popen[bytes], Path]) -> None:
    with connect_qmp(qmp_qemu[1]) as qmp:
        qmp.execute("stop")
        qmp.execute("cont")
        assert qmp.wait_event("RESUME", 5)["event"] == "RESUME"
        assert qmp.wait_event(["STOP", "SHUTDOWN"], 5)["event"] == "STOP"
        assert not qmp.events


def test_qmp_times_out_and_then_ignores_the_late_answer(qmp_qemu: tuple[subprocess.Popen[bytes], Path]) -> None:
    process, path = qmp_qemu
    with connect_qmp(path) as qmp:
        started = time.monotonic()
        with pytest.raises(HypervisorTimeout, match="no event SHUTDOWN in time"):
            qmp.wait_event("SHUTDOWN", 0.3)
        assert 0.3 <= time.monotonic() - started < 5
        os.kill(process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(HypervisorTimeout, match="no answer to query-name in time"):
                qmp.execute("query-name", timeout=0.3)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        assert qmp.execute("query-status")["status"] == "running"  # not query-name's late {} answer


def test_qmp_reports_a_socket_that_is_gone(qmp_qemu: tuple[subprocess.Popen[bytes], Path], tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="cannot connect to QMP socket .*missing.sock"):
        connect_qmp(tmp_path / "missing.sock", timeout=2)
    with pytest.raises(HypervisorError, match="longer than 107 bytes"):
        connect_qmp(tmp_path / ("x" * 120), timeout=2)
    with connect_qmp(qmp_qemu[1]) as qmp:
        qmp.execute("quit")
        with pytest.raises(HypervisorError, match="QMP socket") as gone:
            qmp.execute("query-status", timeout=10)
        assert not isinstance(gone.value, HypervisorTimeout)
    assert qmp_qemu[0].wait(timeout=30) == 0


def test_qmp_refuses_a_socket_that_does_not_speak_qmp(tmp_path: Path) -> None:
    path = tmp_path / "other.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()

        def answer_with_something_else() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b'{"hello": 1}\n')
                connection.recv(1)  # until the client gives up

        peer = threading.Thread(target=answer_with_something_else)
        peer.start()
        with pytest.raises(HypervisorError, match="no QMP greeting"):
            connect_qmp(path, timeout=5)
        peer.join(timeout=10)
