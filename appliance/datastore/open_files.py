"""The files of sessions that are open, and the sessions paused: opened, paused and closed here alone.

A session disk's overlay and a plain file's descriptor are opened on first use and kept
until the session is paused (commit, export, delete through the serving process), the
file is removed, or the datastore closes. Each is registered with the session it
belongs to, so a pause finds them without walking the namespace.

Pausing a session refuses its changes from then on (`TryAgain`: NFS clients retry on
JUKEBOX) and flushes and closes its files, so the control plane sees every acknowledged
write and no open descriptor outlives a removal. A change that would open a paused
session's overlay again is refused under the same lock that registers overlays, so none
slips in after the pause released them. Reads go on, opening what they need; the pause
releases those again when it ends.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from appliance.errors import SessionBusy, TryAgain
from overlay import Overlay


def paused_error(session: str) -> TryAgain:
    """What a change to a session that is being committed or removed gets: clients retry."""
    return TryAgain(f"session {session!r} is being committed or removed; retry")


class SessionFiles:
    """Open overlays and plain-file descriptors by inode, and the paused sessions; thread-safe.

    `overlays`, `bases` and `paused` are read without the lock on the hot paths (one dict
    or set lookup is atomic); every change to them takes it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.overlays: dict[int, Overlay] = {}
        self.bases: dict[int, tuple[str, int]] = {}  # session disk inode -> its base (point id, disk index)
        self.paused: set[str] = set()
        self._fds: dict[int, int] = {}
        self._sessions: dict[int, str] = {}  # inode of an open file -> its session's name

    def overlay(self, inode: int, session: str, base: tuple[str, int], open_overlay: Callable[[], Overlay],
                changing: bool) -> Overlay:
        """The disk's open overlay, opened with `open_overlay` if need be; for a change, never a paused session's."""
        overlay = self.overlays.get(inode)
        if overlay is not None:
            return overlay
        opened = open_overlay()
        with self._lock:
            refused = changing and session in self.paused
            if not refused:
                overlay = self.overlays.setdefault(inode, opened)
                self.bases[inode] = base
                self._sessions[inode] = session
        if refused:
            opened.close()
            raise paused_error(session)
        if overlay is not opened:
            opened.close()
        assert overlay is not None
        return overlay

    def scratch_fd(self, inode: int, session: str, path: Path) -> int:
        """The plain file's descriptor, opened if need be."""
        fd = self._fds.get(inode)
        if fd is not None:
            return fd
        opened = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        with self._lock:
            fd = self._fds.setdefault(inode, opened)
            self._sessions[inode] = session
        if fd != opened:
            os.close(opened)
        return fd

    @contextlib.contextmanager
    def session_paused(self, name: str) -> Iterator[None]:
        """Refuse the session's changes and release its files while the block runs (see the module doc)."""
        with self._lock:
            if name in self.paused:
                raise SessionBusy(f"session {name!r} is already being committed or removed")
            self.paused.add(name)
        try:
            self._release(name)
            yield
        finally:
            try:
                self._release(name)  # files reads opened meanwhile: none outlives a removal
            finally:
                with self._lock:
                    self.paused.discard(name)

    def forget(self, inode: int) -> Overlay | None:
        """A removed file: its descriptor is closed; its overlay, if open, is the caller's to discard."""
        with self._lock:
            fd = self._fds.pop(inode, None)
            overlay = self.overlays.pop(inode, None)
            self.bases.pop(inode, None)
            self._sessions.pop(inode, None)
        if fd is not None:
            os.close(fd)
        return overlay

    def close(self) -> None:
        """Flush and close everything (the datastore is closing)."""
        with self._lock:
            overlays, self.overlays = list(self.overlays.values()), {}
            fds, self._fds = list(self._fds.values()), {}
            self._sessions.clear()
        for overlay in overlays:
            overlay.close()
        for fd in fds:
            os.close(fd)

    def _release(self, name: str) -> None:
        with self._lock:
            inodes = [inode for inode, session in self._sessions.items() if session == name]
            overlays = [self.overlays.pop(inode) for inode in inodes if inode in self.overlays]
            fds = [self._fds.pop(inode) for inode in inodes if inode in self._fds]
            for inode in inodes:
                del self._sessions[inode]
        for overlay in overlays:
            overlay.close()  # flushes first
        for fd in fds:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
