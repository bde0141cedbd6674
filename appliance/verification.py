"""How a VM booted from backup is proven good: the `--verify` forms, and the operator's script.

`tools` (VMware Tools running: the guest kernel and its services came up), `ip` (the
guest reported an IP address: its network came up too), `console:TEXT` (TEXT on a QEMU
guest's serial console), `script:CMD` or `none`. The script is the application-level
proof only the operator can write (a database answers a query, a page loads): CMD runs
through /bin/sh on the appliance with APPLIANCE_VM, APPLIANCE_VM_IP and
APPLIANCE_SESSION in its environment, again every few seconds until it exits 0 or no
time for another run is left (a service in a booting guest is "not up yet" for a while before it is
up); each run gets what is left of the timeout and is killed, with its process group,
when that is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from appliance.errors import UsageError, VerificationFailed

KINDS = ("none", "tools", "ip", "script", "console")

#: Pause between two runs of a failing script.
RETRY_SECONDS = 3.0
#: How much of a failing script's output the error repeats.
OUTPUT_TAIL = 400


@dataclass(frozen=True)
class Verification:
    """How to decide that a booted VM works.

    tools: VMware Tools report running; ip: the guest reports an IP address;
    script:CMD: CMD (run by /bin/sh on the appliance, with APPLIANCE_VM,
    APPLIANCE_VM_IP and APPLIANCE_SESSION set) exits 0, retried until the timeout;
    console:TEXT: TEXT appears on a QEMU guest's serial console; none: powered on is enough.
    """

    kind: str
    argument: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.argument}" if self.argument else self.kind


def parse_verification(value: str) -> Verification:
    kind, _, argument = value.partition(":")
    if kind not in KINDS:
        raise UsageError(f'unknown verification "{value}": use tools, ip, script:CMD, console:TEXT or none')
    if kind in ("script", "console") and not argument:
        raise UsageError(f'verification "{kind}:" needs {"a command" if kind == "script" else "a text"} after the colon')
    if kind not in ("script", "console") and argument:
        raise UsageError(f'verification "{kind}" takes no argument')
    return Verification(kind, argument)


#: What each boot target can see of its guest: (who, the verifications it offers).
_OFFERED = {
    "vsphere": ("a vSphere VM has", ("none", "tools", "ip", "script"), "tools, ip or script:CMD"),
    "qemu": ("a QEMU guest reports", ("none", "console", "script"), "console:TEXT or script:CMD"),
}


def verification_pattern(kinds: tuple[str, ...] = KINDS) -> str:
    """What `parse_verification` accepts of `kinds`, as a regular expression (for the API's schema)."""
    return "^(" + "|".join(f"{kind}:[\\s\\S]+" if kind in ("script", "console") else kind for kind in kinds) + ")$"


def offered_pattern(target: str) -> str:
    """The verifications `target` can observe, as a regular expression (for the API's schema)."""
    return verification_pattern(_OFFERED[target][1])


def check_offered(target: str, verification: Verification) -> None:
    """Refuse a verification the target cannot observe (a QEMU guest has no VMware Tools)."""
    who, kinds, alternatives = _OFFERED[target]
    if verification.kind not in kinds:
        raise UsageError(f"{who} no {verification.kind}: verify with {alternatives}")


def run_until_success(command: str, environment: Mapping[str, str], timeout: float,
                      sleep: Callable[[float], None] = time.sleep) -> str:
    """Run `command` until it exits 0; its output's tail, or VerificationFailed after `timeout` s.

    `sleep` waits between runs (a job passes its own, so a cancel ends the wait).
    """
    started = time.monotonic()
    deadline = started + timeout
    runs = 0
    while True:
        runs += 1
        code, output = _run_once(command, {**os.environ, **environment}, deadline)
        if code == 0:
            return output[-OUTPUT_TAIL:].strip()
        if deadline - time.monotonic() > RETRY_SECONDS:
            sleep(RETRY_SECONDS)
            continue
        reason = "was killed at the timeout" if code is None else f"exited {code}"
        tail = output[-OUTPUT_TAIL:].strip() or "(no output)"
        raise VerificationFailed(f"verification script {command!r} {reason} after {runs} run(s) "
                                 f"in {time.monotonic() - started:.0f} s: {tail}")


def _run_once(command: str, environment: Mapping[str, str], deadline: float) -> tuple[int | None, str]:
    """One run; (exit code or None when killed at the deadline, stdout+stderr)."""
    process = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=dict(environment), start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        return process.returncode, output.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output.decode(errors="replace")
