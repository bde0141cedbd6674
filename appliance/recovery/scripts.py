"""The operator's verification script: the application-level proof that a booted VM works.

Only the operator knows what "works" means for an application (a database answers a
query, a page loads), so `script:CMD` runs CMD through /bin/sh on the appliance with the
VM's name, IP and session in its environment. It is run again every few seconds until it
exits 0 or the timeout passes, as a service in a booting guest is "not up yet" for a
while before it is up; each run gets what is left of the timeout, and is killed (with
its process group) when that is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping

from appliance.errors import VerificationFailed

#: Pause between two runs of a failing script.
RETRY_SECONDS = 3.0
#: How much of a failing script's output the error repeats.
OUTPUT_TAIL = 400


def run_until_success(command: str, environment: Mapping[str, str], timeout: float,
                      sleep: Callable[[float], None] = time.sleep) -> str:
    """Run `command` until it exits 0; its output's tail, or VerificationFailed after `timeout` s.

    `sleep` waits between runs (a job passes its own, so a cancel ends the wait).
    """
    deadline = time.monotonic() + timeout
    runs = 0
    while True:
        runs += 1
        code, output = _run_once(command, {**os.environ, **environment}, deadline)
        if code == 0:
            return output[-OUTPUT_TAIL:].strip()
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "was killed at the timeout" if code is None else f"exited {code}"
            tail = output[-OUTPUT_TAIL:].strip() or "(no output)"
            raise VerificationFailed(f"verification script {command!r} {reason} after {runs} run(s) "
                                     f"in {timeout:g} s: {tail}")
        sleep(min(RETRY_SECONDS, left))


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
