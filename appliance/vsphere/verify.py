"""Proof that a VM booted from backup works: guest tools, a guest IP, or the operator's script.

A check is named as on the command line: `tools` (VMware Tools running: the guest
kernel and its services came up), `ip` (the guest reported an IP address: its network
came up too) or `script:CMD`. The script is the application-level proof only the
operator can write (a database answering a query, a web page loading): it runs once
the guest has an IP, through /bin/sh on the appliance, with VM_NAME and VM_IP in its
environment, and passes by exiting 0 within what is left of the timeout. It owns
its retries: it knows what "not up yet" looks like for its application.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyVmomi import vim

from appliance.errors import UsageError, VerificationFailed
from appliance.vsphere.client import Connection, faults

#: Guest properties change within seconds; a tighter loop only loads vCenter.
POLL_SECONDS = 1.0
#: How much of a failing script's output the error repeats.
OUTPUT_TAIL = 400


@dataclass(frozen=True)
class Check:
    kind: str  # "tools", "ip" or "script"
    command: str = ""

    def __str__(self) -> str:
        return f"script:{self.command}" if self.kind == "script" else self.kind


def parse_check(text: str) -> Check:
    """`tools`, `ip` or `script:CMD`, as `--verify` takes it."""
    if text in ("tools", "ip"):
        return Check(text)
    if text.startswith("script:") and text[len("script:"):].strip():
        return Check("script", text[len("script:"):])
    raise UsageError(f"verification {text!r}: expected tools, ip or script:COMMAND")


def verify_vm(connection: Connection, machine: vim.VirtualMachine, check: Check, timeout: float) -> str:
    """Wait until the VM passes `check`; a short account of what was seen, or VerificationFailed."""
    deadline = time.monotonic() + timeout
    with faults(f"read VM {machine.name!r}"):
        name = machine.name
    if check.kind == "tools":
        _wait(machine, deadline, _tools_running, f"VM {name!r}: VMware Tools not running after {timeout:g} s")
        return "VMware Tools running"
    address = _wait(machine, deadline, _guest_ip, f"VM {name!r}: no guest IP address after {timeout:g} s")
    if check.kind == "ip":
        return f"guest IP {address}"
    return _run_script(check.command, name, address, deadline)


def _tools_running(machine: vim.VirtualMachine) -> str:
    running = machine.guest.toolsRunningStatus == vim.vm.GuestInfo.ToolsRunningStatus.guestToolsRunning
    return "running" if running else ""


def _guest_ip(machine: vim.VirtualMachine) -> str:
    return machine.guest.ipAddress or ""


def _wait(machine: vim.VirtualMachine, deadline: float, probe: Callable[[vim.VirtualMachine], str],
          failure: str) -> str:
    """Poll `probe` until it answers something non-empty, or fail with `failure` at the deadline."""
    while True:
        with faults(f"read the guest state of VM {machine.name!r}"):
            seen = probe(machine)
        if seen:
            return seen
        if time.monotonic() >= deadline:
            raise VerificationFailed(failure)
        time.sleep(max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))


def _run_script(command: str, name: str, address: str, deadline: float) -> str:
    environment = {**os.environ, "VM_NAME": name, "VM_IP": address}
    # Its own process group, so a timeout kills what the script started too (and nothing
    # left behind keeps the output pipe open).
    process = subprocess.Popen(["/bin/sh", "-c", command], env=environment, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise VerificationFailed(f"VM {name!r}: verification script did not finish in time: {command}") from None
    if process.returncode != 0:
        tail = " ".join(output.decode(errors="replace").split())[-OUTPUT_TAIL:]  # one line, as errors are
        raise VerificationFailed(f"VM {name!r}: verification script exited {process.returncode}: {command}"
                                 + (f": {tail}" if tail else ""))
    return f"script passed ({address})"
