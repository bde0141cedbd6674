"""A QEMU guest that outlives the command that booted it, found again through its run directory.

`boot_guest` starts qemu-system-x86_64 with `-daemonize`: QEMU opens every disk (NFS
mounts included) and only then detaches into its own session, so a disk that cannot
be opened is an error of `boot_guest` with QEMU's own message, while a guest that
started runs on after the calling process exits. What a later process needs to drive
it (`migrate`, `stop`) is kept in the run directory:

    guest.json    the boot record (BootRecord), replaced durably when it changes
    qemu.pid      written by QEMU
    qmp.sock      the QMP socket (one client at a time: each operation connects anew)
    console.log   the guest's serial console

A PID alone could name another process after QEMU exits, so the record also holds
the process's start time from /proc, and a guest counts as running only while both match.

Disks are attached as raw virtio-blk drives `disk0`, `disk1`, ... in the order given,
either local paths or nfs:// URLs (see `disk_urls`). Everything is synchronous with
explicit timeouts: a caller on an event loop runs these in a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from appliance.durable import write_durably
from appliance.errors import HypervisorError, HypervisorTimeout, QmpCommandFailed
from appliance.events import event
from appliance.hypervisor.accel import QEMU, choose_accelerator, machine_options, remember_fallback
from appliance.hypervisor.qmp import QmpClient, connect_qmp

RECORD_NAME = "guest.json"
PID_NAME = "qemu.pid"
QMP_NAME = "qmp.sock"
CONSOLE_NAME = "console.log"
START_TIMEOUT = 120.0
QMP_TIMEOUT = 30.0
QUIT_SECONDS = 10.0
CONSOLE_POLL = 0.02
MIRROR_EVENTS = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
FINISH_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


@dataclass(frozen=True)
class BootRecord:
    """What another process needs to find and drive a booted guest (guest.json)."""

    pid: int
    process_start: int  # /proc/PID/stat starttime: tells this QEMU from a later process with its PID
    accel: str
    memory_mib: int
    disks: list[str]  # what drive diskN reads and writes now: a URL, or a local path after a mirror
    started_at: float  # time.time() when QEMU was started
    command: list[str]


def drive_id(index: int) -> str:
    return f"disk{index}"


def _option(value: str) -> str:
    """A value inside a QEMU -drive/-serial option list, where ',' must be doubled."""
    return value.replace(",", ",,")


def _disk_source(disk: str | Path) -> str:
    text = str(disk)
    return text if "://" in text else str(Path(text).resolve())


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot; None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    return None if fields[0] == "Z" else int(fields[19])


class QemuGuest:
    """A guest booted by `boot_guest`, or found again with `QemuGuest.load(run_dir)`."""

    def __init__(self, run_dir: Path, record: BootRecord) -> None:
        self.run_dir, self.record = run_dir, record

    @classmethod
    def load(cls, run_dir: Path) -> QemuGuest:
        try:
            data = json.loads((run_dir / RECORD_NAME).read_text())
            return cls(run_dir, BootRecord(**data))
        except FileNotFoundError:
            raise HypervisorError(f"no guest was booted in {run_dir} ({RECORD_NAME} is missing)") from None
        except (ValueError, TypeError) as exc:
            raise HypervisorError(f"{run_dir / RECORD_NAME} is damaged: {exc}") from None

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / QMP_NAME

    @property
    def console_log(self) -> Path:
        return self.run_dir / CONSOLE_NAME

    def qmp(self, timeout: float = QMP_TIMEOUT) -> QmpClient:
        """A new QMP connection to this guest's QEMU (close it: QEMU serves one at a time)."""
        return connect_qmp(self.qmp_socket, timeout)

    def is_running(self) -> bool:
        return _process_start(self.record.pid) == self.record.process_start

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_console(self, marker: str, timeout: float) -> None:
        """Return once `marker` appears on the serial console.

        Raises HypervisorError if QEMU exits first, HypervisorTimeout after `timeout`
        seconds; both messages end with the console's last lines.
        """
        needle = marker.encode()
        deadline = time.monotonic() + timeout
        seen, offset = b"", 0
        while True:
            running = self.is_running()  # before reading: output written just before an exit still counts
            try:
                with open(self.console_log, "rb") as console:
                    console.seek(offset)
                    fresh = console.read()
            except FileNotFoundError:
                fresh = b""
            offset += len(fresh)
            seen = seen[-len(needle):] + fresh
            if needle in seen:
                return
            if not running:
                raise HypervisorError(f"the guest in {self.run_dir} stopped before printing {marker!r}"
                                      f"{self._console_tail()}")
            if time.monotonic() > deadline:
                raise HypervisorTimeout(f"the guest in {self.run_dir} did not print {marker!r} within "
                                        f"{timeout:.0f} s{self._console_tail()}")
            time.sleep(CONSOLE_POLL)

    def _console_tail(self, lines: int = 5) -> str:
        tail = self.console_text().strip().splitlines()[-lines:]
        return "; console ends: " + " | ".join(tail) if tail else "; the console is empty"

    def mirror_disks(self, to_dir: Path, timeout: float = 600.0) -> list[Path]:
        """Move every disk of the running guest to a local raw file in `to_dir`; the new paths.

        QMP drive-mirror copies each disk while the guest keeps writing (writes during
        the copy are tracked and copied again); at BLOCK_JOB_READY source and target
        are in sync, and block-job-complete switches the guest to the target, after
        which nothing it writes reaches the source. query-block then has to name the
        targets, or this raises. The record is updated so later commands see the local
        files. On failure the unfinished jobs are cancelled and their partial targets
        removed: the guest stays on those old disks (and on the new one of any disk whose
        switch had completed, which the record then names).
        """
        if not self.is_running():
            raise HypervisorError(f"the guest in {self.run_dir} is not running: nothing to mirror")
        to_dir.mkdir(parents=True, exist_ok=True)
        targets = [to_dir.resolve() / self._mirror_name(disk) for disk in self.record.disks]
        if len(set(targets)) != len(targets):
            raise HypervisorError(f"two disks of the guest in {self.run_dir} would mirror to one file in {to_dir}")
        for target in targets:
            if target.exists():
                raise HypervisorError(f"mirror target {target} already exists")
        deadline = time.monotonic() + timeout
        jobs = [f"mirror-{drive_id(n)}" for n in range(len(targets))]
        started: list[str] = []
        finished: list[str] = []
        with self.qmp() as qmp:
            try:
                for n, (job, target) in enumerate(zip(jobs, targets)):
                    qmp.execute("drive-mirror", {"job-id": job, "device": drive_id(n), "target": str(target),
                                                 "format": "raw", "sync": "full", "mode": "absolute-paths"})
                    started.append(job)
                for job in jobs:
                    self._wait_job(qmp, job, MIRROR_EVENTS, deadline, "BLOCK_JOB_READY")
                for job in jobs:
                    qmp.execute("block-job-complete", {"device": job})
                for job in jobs:
                    self._wait_job(qmp, job, FINISH_EVENTS, deadline, "BLOCK_JOB_COMPLETED")
                    finished.append(job)
            except BaseException:
                self._cancel(qmp, [job for job in started if job not in finished])
                moved = [n for n, job in enumerate(jobs) if job in finished]
                for n, target in enumerate(targets):
                    if n not in moved:
                        target.unlink(missing_ok=True)
                if moved:  # a disk the guest already switched to is its disk now: keep and record it
                    self._save(dataclasses.replace(self.record, disks=[
                        str(targets[n]) if n in moved else disk for n, disk in enumerate(self.record.disks)]))
                raise
            in_use = {device["device"]: device.get("inserted", {}).get("file")
                      for device in qmp.execute("query-block")}
        for n, target in enumerate(targets):
            if in_use.get(drive_id(n)) != str(target):
                raise HypervisorError(f"after the mirror, {drive_id(n)} of the guest in {self.run_dir} uses "
                                      f"{in_use.get(drive_id(n))}, not {target}")
        self._save(dataclasses.replace(self.record, disks=[str(target) for target in targets]))
        return targets

    @staticmethod
    def _mirror_name(disk: str) -> str:
        """vm1-flat.vmdk (a flat extent, raw bytes) -> vm1.raw."""
        name = Path(unquote(urlparse(disk).path) if "://" in disk else disk).name
        stem = name.rsplit(".", 1)[0] if "." in name else name
        return f"{stem.removesuffix('-flat')}.raw"

    def _wait_job(self, qmp: QmpClient, job: str, names: Sequence[str], deadline: float, wanted: str) -> None:
        event = qmp.wait_event(names, max(deadline - time.monotonic(), 0.0),
                               lambda e: e.get("data", {}).get("device") == job)
        data = event.get("data", {})
        if event["event"] != wanted or "error" in data:
            raise HypervisorError(f"{job} of the guest in {self.run_dir} ended with {event['event']}"
                                  f"{': ' + data['error'] if 'error' in data else ''}")

    def _cancel(self, qmp: QmpClient, jobs: list[str]) -> None:
        """Best effort: the caller is already failing with a better message than ours."""
        for job in jobs:
            try:
                qmp.execute("block-job-cancel", {"device": job, "force": True}, timeout=QUIT_SECONDS)
                qmp.wait_event(FINISH_EVENTS, QUIT_SECONDS, lambda e: e.get("data", {}).get("device") == job)
            except HypervisorError:
                continue

    def power_off(self, timeout: float = 60.0) -> str:
        """Stop the guest, politely first; how it ended: "powerdown", "quit", "kill" or "not running".

        The ACPI power button (system_powerdown) gives the guest `timeout` seconds to
        shut down cleanly; a guest that ignores it is stopped with QMP quit (QEMU
        flushes its disks), and a QEMU that does not answer is killed.
        """
        if not self.is_running():
            return "not running"
        for how, command, seconds in (("powerdown", "system_powerdown", timeout), ("quit", "quit", QUIT_SECONDS)):
            try:
                with self.qmp(QUIT_SECONDS) as qmp:
                    qmp.execute(command, timeout=QUIT_SECONDS)
            except QmpCommandFailed:
                continue
            except HypervisorError:
                if not self.is_running():
                    return how
                continue
            if self._exited_within(seconds):
                return how
        if self.is_running():  # never a later process that got QEMU's PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.record.pid, signal.SIGKILL)
            self.wait_exit(QUIT_SECONDS)
        return "kill"

    def wait_exit(self, timeout: float) -> None:
        """Return once QEMU has exited; HypervisorTimeout if it still runs after `timeout` s."""
        if not self._exited_within(timeout):
            raise HypervisorTimeout(f"the guest in {self.run_dir} (pid {self.record.pid}) still runs after "
                                    f"{timeout:.0f} s")

    def _exited_within(self, timeout: float) -> bool:
        """Waits on a pidfd: QEMU is not our child (it daemonized), so waitpid cannot see it."""
        try:
            pidfd = os.pidfd_open(self.record.pid)
        except ProcessLookupError:
            return True
        try:
            if not self.is_running():  # the PID was reused before the pidfd was opened
                return True
            select.select([pidfd], [], [], timeout)
            return not self.is_running()
        finally:
            os.close(pidfd)

    def _save(self, record: BootRecord) -> None:
        write_durably(self.run_dir / RECORD_NAME, json.dumps(dataclasses.asdict(record), indent=1).encode())
        self.record = record


def qemu_command(run_dir: Path, disks: Sequence[str], memory_mib: int, accel: str, cpus: int,
                 kernel: Path | None, initrd: Path | None, append: str | None, qemu: str = QEMU) -> list[str]:
    """The QEMU command line: no display, no network, console to a file."""
    command = [qemu, "-name", _option(f"appliance-{run_dir.name}"), *machine_options(accel, cpus),
               "-m", str(memory_mib), "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
               "-no-reboot", "-serial", f"file:{_option(str(run_dir / CONSOLE_NAME))}",
               "-qmp", f"unix:{_option(str(run_dir / QMP_NAME))},server=on,wait=off",
               "-pidfile", str(run_dir / PID_NAME), "-daemonize"]
    for n, disk in enumerate(disks):
        command += ["-drive", f"file={_option(disk)},format=raw,if=none,id={drive_id(n)}",
                    "-device", f"virtio-blk-pci,drive={drive_id(n)}"]
    for flag, value in (("-kernel", kernel), ("-initrd", initrd), ("-append", append)):
        if value is not None:
            command += [flag, str(value)]
    return command


def boot_guest(run_dir: Path, disks: Sequence[str | Path], memory_mib: int = 512, *, cpus: int = 1,
               accel: str = "auto", qemu: str = QEMU, kernel: Path | None = None, initrd: Path | None = None,
               append: str | None = None, timeout: float = START_TIMEOUT) -> QemuGuest:
    """Start a guest on `disks` (nfs:// URLs or local paths) and return once QEMU runs it.

    `accel` "auto" uses KVM only when it really runs guests (`accel.choose_accelerator`),
    and a guest that still fails to start under KVM is started again under TCG (event
    `hypervisor.accel_fallback`); "kvm" or "tcg" is used as given, without a fallback.
    `kernel`/`initrd`/`append` boot a kernel directly instead of the first disk's
    bootloader. Raises HypervisorError with QEMU's message if it cannot start (a disk
    that cannot be opened, a bad option), or if a guest still runs from `run_dir`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / RECORD_NAME).exists() and QemuGuest.load(run_dir).is_running():
        raise HypervisorError(f"a guest already runs from {run_dir}")
    sources = [_disk_source(disk) for disk in disks]
    chosen = choose_accelerator(accel, qemu)

    def start(under: str) -> QemuGuest:
        command = qemu_command(run_dir.resolve(), sources, memory_mib, under, cpus, kernel, initrd, append, qemu)
        return _start(run_dir, command, under, memory_mib, sources, timeout)

    if accel != "auto" or chosen != "kvm":
        return start(chosen)
    try:
        return start("kvm")
    except HypervisorError as kvm_failure:
        try:
            guest = start("tcg")
        except HypervisorError:
            raise kvm_failure from None  # TCG cannot start it either: the guest's own fault, not KVM's
        remember_fallback(qemu)
        event("hypervisor.accel_fallback", logging.WARNING, run_dir=str(run_dir), qemu=qemu, used="tcg",
              kvm_error=str(kvm_failure))
        return guest


def _start(run_dir: Path, command: list[str], accel: str, memory_mib: int, sources: list[str],
           timeout: float) -> QemuGuest:
    """Run one QEMU start; the guest once it runs, or HypervisorError with what QEMU said."""
    for name in (RECORD_NAME, PID_NAME, QMP_NAME, CONSOLE_NAME):
        (run_dir / name).unlink(missing_ok=True)
    started_at = time.time()
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout, check=False)
    except FileNotFoundError:
        raise HypervisorError(f"{command[0]} is not installed (Debian package qemu-system-x86)") from None
    except subprocess.TimeoutExpired:
        _kill_from_pidfile(run_dir / PID_NAME)
        raise HypervisorTimeout(f"QEMU did not start the guest in {run_dir} within {timeout:.0f} s") from None
    if result.returncode != 0:
        detail = " | ".join(result.stderr.strip().splitlines()[-3:]) or f"exit code {result.returncode}"
        raise HypervisorError(f"QEMU ({accel}) could not start the guest in {run_dir}: {detail}")
    pid = int((run_dir / PID_NAME).read_text().strip())
    process_start = _process_start(pid)
    guest = QemuGuest(run_dir, BootRecord(pid, process_start or 0, accel, memory_mib, sources, started_at, command))
    if process_start is None:
        raise HypervisorError(f"QEMU ({accel}, pid {pid}) of the guest in {run_dir} exited right after starting"
                              f"{guest._console_tail()}")
    guest._save(guest.record)
    return guest


def _kill_from_pidfile(pidfile: Path) -> None:
    """After a start that timed out: the daemonized QEMU may exist although its parent hung."""
    try:
        os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
