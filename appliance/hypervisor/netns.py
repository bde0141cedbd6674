"""A private network namespace for the calling thread, so QEMU can reach our NFS server.

QEMU's nfs:// driver always asks the portmapper on port 111, and a portmapper holds
one NFSv3 registration at a time: the demo, the tests and the benchmarks would take it
from another NFS server on the same machine (or it from them). In a namespace of its own, `appliance serve`
finds nothing on port 111 and answers as the portmapper itself, and every child
started from this thread (serve, QEMU, qemu-img) shares that namespace's loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, call: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{call}: {os.strerror(errno)}")


@contextlib.contextmanager
def private_network() -> Iterator[None]:
    """Run the block (and the processes it starts) in a new network namespace with lo up.

    Only this thread moves (namespaces are per thread), and it moves back on exit;
    the namespace lives on while processes started inside still run.
    """
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, timeout=30, check=True)
            yield
        finally:
            _check(_libc.setns(original, CLONE_NEWNET), "setns back to the original network namespace")
    finally:
        os.close(original)
