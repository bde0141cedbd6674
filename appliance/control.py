"""The control plane of a serving appliance: what the HTTP API (and the CLI through it) does.

One `Control` per `appliance serve` process, over the same `Datastore` the NFS server
and the FUSE mount use, so a session made here is visible to clients at once and a
session committed or removed here is first let go of by the datastore itself
(`Datastore.session_paused`), which the offline CLI cannot do while a server runs.
Limits are enforced here, in one place, whichever way a request arrives; expired
sessions are ended by `expire_sessions`, which the server calls periodically.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.activities import VmActivities
from appliance.config import LimitsConfig
from appliance import session_commit
from appliance.datastore import sessions
from appliance.datastore.datastore import Datastore
from appliance.datastore.layout import scratch_path
from appliance.datastore.sessions import SessionInfo
from appliance.errors import LimitReached, UsageError
from appliance.events import event
from appliance.jobs import Job, JobRunner
from appliance.store.catalog import RestorePoint
from appliance.store.repository import Store

#: How often a serving appliance looks for expired sessions (a read of at most a few hundred records).
EXPIRY_CHECK_SECONDS = 1.0

#: What ends a session that expired (or is stopped): given the session's name.
SessionEnder = Callable[[str], None]


@dataclass(frozen=True)
class VmSummary:
    name: str
    points: int
    newest_point: str
    newest_created: float


class Control:
    """Operations on the served datastore, each one safe to call from any worker thread."""

    def __init__(self, datastore: Datastore, limits: LimitsConfig, jobs: JobRunner) -> None:
        self.datastore = datastore
        self.limits = limits
        self.jobs = jobs
        self.activities = VmActivities()  # backups and migrations back to production, one at a time per VM
        self._sessions_lock = threading.Lock()  # the limit check and the creation are one step
        self._end_session: SessionEnder = self.delete_session
        self._ending: set[tuple[str, float]] = set()  # (name, created) of sessions already being ended

    @property
    def store(self) -> Store:
        return self.datastore.store

    # ----- restore points ----------------------------------------------------------------

    def vms(self) -> list[VmSummary]:
        """One pass over the catalog's points: asking for each VM's points reads every point once per VM."""
        with self.store.env.begin() as txn:
            names = self.store.catalog.vms(txn)
            points = self.store.catalog.points(txn)
        counts: dict[str, int] = {}
        newest: dict[str, RestorePoint] = {}
        for point in points:  # oldest first: the last one seen of a VM is its newest
            counts[point.vm] = counts.get(point.vm, 0) + 1
            newest[point.vm] = point
        return [VmSummary(vm, counts[vm], newest[vm].id, newest[vm].created) for vm in names if vm in newest]

    def points(self, vm: str | None = None) -> list[RestorePoint]:
        with self.store.env.begin() as txn:
            return self.store.catalog.vm_points(txn, vm) if vm else self.store.catalog.points(txn)

    def resolve(self, vm: str, point_ref: str) -> RestorePoint:
        with self.store.env.begin() as txn:
            return self.store.catalog.resolve(txn, vm, point_ref)

    # ----- sessions ----------------------------------------------------------------------

    def list_sessions(self) -> list[SessionInfo]:
        return sessions.list_sessions(self.datastore.namespace)

    def get_session(self, name: str) -> SessionInfo:
        return sessions.get_session(self.datastore.namespace, name)

    def session_file(self, name: str, file_name: str) -> bytes | None:
        """A plain file of a session as it is now (e.g. the .vmx ESXi reads), or None."""
        info = self.get_session(name)
        with self.store.env.begin() as txn:
            inode = self.datastore.namespace.child(txn, info.inode, file_name)
        if inode is None:
            return None
        return scratch_path(self.store, info.inode, inode).read_bytes()

    def create_session(self, vm: str, point_ref: str, name: str, expires_hours: float | None = None) -> SessionInfo:
        """A new session, refused past `limits.max_sessions`; expiry defaults to the configured one."""
        hours = expires_hours if expires_hours is not None else self.limits.session_expiry_hours
        with self._sessions_lock:
            count = len(self.list_sessions())
            if count >= self.limits.max_sessions:
                raise LimitReached(
                    f"cannot create session {name!r}: {count} sessions exist and limits.max_sessions is "
                    f"{self.limits.max_sessions} (every session served at once shares this store's disks "
                    "and cache; commit or delete one first)")
            expires = None if hours is None else time.time() + hours * 3600
            info = sessions.create_session(self.store, self.datastore.namespace, self.datastore.read_path, vm,
                                           point_ref, name, expires)
        event("session.created", session=info.name, vm=info.vm, point=info.point,
              expires=None if expires is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)))
        return info

    def commit_session(self, name: str) -> RestorePoint:
        with self.datastore.session_paused(name):
            point = session_commit.commit_released_session(self.store, self.datastore.namespace,
                                                     self.datastore.read_path, name)
        event("session.committed", session=name, vm=point.vm, point=point.id)
        return point

    def export_session_disk(self, name: str, disk: int, output: Path) -> None:
        if not output.is_absolute():
            raise UsageError(f"export output must be an absolute path on the appliance host, not {output}")
        with self.datastore.session_paused(name):
            session_commit.export_released_session_disk(self.store, self.datastore.namespace, self.datastore.read_path,
                                                  name, disk, output)
        event("session.exported", session=name, disk=disk, output=str(output))

    def delete_session(self, name: str) -> None:
        with self.datastore.session_paused(name):
            sessions.remove_released_session(self.store, self.datastore.namespace, name)
        event("session.deleted", session=name)

    # ----- expiry --------------------------------------------------------------------------

    def set_session_ender(self, ender: SessionEnder) -> None:
        """What ends an expired session (default: delete it); instant boot installs stop-or-migrate."""
        self._end_session = ender

    def expire_sessions(self, now: float | None = None) -> list[str]:
        """End every session past its expiry, once each; returns their names.

        A failure to end one is logged and not retried (an operator looks at it), and
        does not stop the others.
        """
        now = time.time() if now is None else now
        ended = []
        for info in self.list_sessions():
            key = (info.name, info.created)
            if info.expires is None or info.expires > now or key in self._ending:
                continue
            self._ending.add(key)
            event("session.expired", session=info.name, vm=info.vm)
            try:
                self._end_session(info.name)
            except Exception as exc:  # logged; the other sessions still expire
                event("session.expiry_failed", session=info.name, reason=str(exc))
                continue
            ended.append(info.name)
        return ended

    # ----- jobs ----------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)
