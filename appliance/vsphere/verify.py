"""Waiting for a VM booted from backup to prove itself: guest tools, a guest IP, or the operator's script.

`tools` and `ip` are read from what VMware Tools report to vCenter; `script:CMD` waits
for the guest's IP and then runs the operator's script (`appliance.verification`)
with the VM's name and IP, until it passes or the timeout is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pyVmomi import vim

from appliance.errors import VerificationFailed
from appliance.verification import Verification, check_offered, run_until_success
from appliance.vsphere.client import Connection, faults

#: Guest properties change within seconds; a tighter loop only loads vCenter.
POLL_SECONDS = 1.0


def verify_vm(connection: Connection, machine: vim.VirtualMachine, check: Verification, timeout: float,
              session: str = "", sleep: Callable[[float], None] = time.sleep) -> str:
    """Wait until the VM passes `check`; a short account of what was seen, or VerificationFailed."""
    check_offered("vsphere", check)
    deadline = time.monotonic() + timeout
    with faults(f"read VM {machine.name!r}"):
        name = machine.name
    if check.kind == "tools":
        _wait(machine, deadline, _tools_running, f"VM {name!r}: VMware Tools not running after {timeout:g} s")
        return "VMware Tools running"
    address = _wait(machine, deadline, _guest_ip, f"VM {name!r}: no guest IP address after {timeout:g} s")
    if check.kind == "ip":
        return f"guest IP {address}"
    output = run_until_success(check.argument, {"APPLIANCE_VM": name, "APPLIANCE_VM_IP": address,
                                                "APPLIANCE_SESSION": session},
                               max(0.0, deadline - time.monotonic()), sleep)
    return f"script passed ({address})" + (f": {output}" if output else "")


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
