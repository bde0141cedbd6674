"""A synchronous QMP client over QEMU's unix socket.

QMP is newline-delimited JSON: a greeting, then `qmp_capabilities` to leave negotiation
mode, then commands answered by `{"return": ...}` or `{"error": ...}` and, interleaved
at any time, asynchronous `{"event": ...}` messages. Commands carry an `id` so a late
answer to a command that timed out is never taken for the answer to the next one.
Events that arrive while a command waits are kept, because the one a caller waits for
next (BLOCK_JOB_READY after `drive-mirror`) often arrives before it starts waiting.

Blocking calls with explicit timeouts, no threads of its own: a caller on an event
loop runs it in a worker thread. Every failure is a `HypervisorError`.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.errors import HypervisorError, HypervisorTimeout, QmpCommandFailed

Message = dict[str, Any]
EventFilter = Callable[[Message], bool]

#: Longest unix socket path the kernel accepts (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
MAX_KEPT_EVENTS = 10_000
DEFAULT_TIMEOUT = 30.0


class QmpClient:
    """One QMP connection; use `connect_qmp` to open it."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self._sock, self.path = sock, path
        self._buffer = b""
        self._ids = itertools.count(1)
        self.events: deque[Message] = deque(maxlen=MAX_KEPT_EVENTS)
        self.greeting: Message = {}

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Run `command` and return its "return" value; QmpCommandFailed on an error answer."""
        ident = f"appliance-{next(self._ids)}"
        request: Message = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        self._send(request)
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline, f"answer to {command}")
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == ident:
                break
        if "error" in message:
            error = message["error"]
            raise QmpCommandFailed(f"QEMU ({self.path}) refused {command}: {error.get('desc', error)}",
                                   str(error.get("class", "GenericError")))
        return message.get("return")

    def wait_event(self, names: str | Collection[str], timeout: float,
                   match: EventFilter | None = None) -> Message:
        """The first event named in `names` (and accepted by `match`), kept or arriving.

        The returned event is removed from `events`; others stay for later waits.
        """
        wanted = {names} if isinstance(names, str) else set(names)

        def fits(event: Message) -> bool:
            return event.get("event") in wanted and (match is None or match(event))

        for event in self.events:
            if fits(event):
                self.events.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline, f"event {' or '.join(sorted(wanted))}")
            if "event" not in message:
                continue  # a late answer to a command whose wait timed out
            if fits(message):
                return message
            self.events.append(message)

    def _send(self, message: Message) -> None:
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise HypervisorError(f"QMP socket {self.path}: cannot send ({exc.strerror or exc})") from None

    def _receive(self, deadline: float, waiting_for: str) -> Message:
        """The next message, reading until a whole line is buffered or `deadline` passes."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HypervisorTimeout(f"QMP socket {self.path}: no {waiting_for} in time")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                raise HypervisorError(f"QMP socket {self.path}: {exc.strerror or exc}") from None
            if not data:
                raise HypervisorError(f"QMP socket {self.path} closed while waiting for {waiting_for} "
                                      "(QEMU exited?)")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise HypervisorError(f"QMP socket {self.path}: not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise HypervisorError(f"QMP socket {self.path}: not a JSON object: {line[:200]!r}")
        return message


def connect_qmp(path: Path, timeout: float = DEFAULT_TIMEOUT) -> QmpClient:
    """Connect to QEMU's QMP socket at `path`, read the greeting and negotiate capabilities."""
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise HypervisorError(f"QMP socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise HypervisorError(f"cannot connect to QMP socket {path}: {exc.strerror or exc}") from None
    client = QmpClient(sock, path)
    try:
        greeting = client._receive(time.monotonic() + timeout, "QMP greeting")
        if "QMP" not in greeting:
            raise HypervisorError(f"QMP socket {path}: no QMP greeting but {str(greeting)[:200]}")
        client.greeting = greeting
        client.execute("qmp_capabilities", timeout=timeout)
    except BaseException:
        client.close()
        raise
    return client
