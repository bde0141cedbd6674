"""Replication inside a serving appliance: jobs on demand and on each remote's schedule.

A job is the same `replicate` the CLI runs, in a worker thread of the job runner, so it
shows in the API, the CLI (`appliance jobs`) and the metrics like an instant boot.
Per remote and direction one job runs at a time: a second would only race the first
for the same chunks. A cancel takes effect between batches; what was not committed
stays invisible, and the next run resumes.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from appliance.config import RemoteConfig
from appliance.config_checks import Invalid
from appliance.errors import ConfigError, NotFound, TryAgain
from appliance.jobs import Job, JobRunner
from appliance.replication.remote import Link, RemoteSettings, link_for
from appliance.replication.run import ReplicationReport, replicate
from appliance.schedule import parse_window
from appliance.store.catalog import RestorePoint
from appliance.store.repository import Store

#: How often the scheduler looks at the clock; a schedule is kept to within this.
SCHEDULE_CHECK_SECONDS = 30.0


class ReplicationObserver(Protocol):
    """Hears each finished (or failed) job's figures: the metrics implement it."""

    def replicated(self, remote: str, direction: str, report: ReplicationReport, link: Link,
                   succeeded: bool) -> None: ...


def settings_of(remote: RemoteConfig) -> RemoteSettings:
    """What a job needs of a remote: its token is read now (it may have been rotated since start)."""
    try:
        token = remote.read_token().reveal()
    except Invalid as exc:
        raise ConfigError(f"remote {remote.name!r}", exc.reason, exc.key) from None
    rate = None if remote.rate_limit_mib is None else remote.rate_limit_mib * (1 << 20)
    return RemoteSettings(remote.name, remote.url, token, remote.fingerprint, rate, remote.streams)


class ReplicationService:
    def __init__(self, store: Store, jobs: JobRunner, remotes: tuple[RemoteConfig, ...],
                 observer: ReplicationObserver | None = None) -> None:
        self._store, self._jobs, self._observer = store, jobs, observer
        self._remotes = {remote.name: remote for remote in remotes}
        self._running: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._last_start: dict[str, float] = {}

    def remotes(self) -> list[dict[str, Any]]:
        """The configured remotes as an operator may see them (never their tokens)."""
        return [{"name": remote.name, "url": remote.url, "fingerprint": remote.fingerprint,
                 "rate_limit_mib": remote.rate_limit_mib, "streams": remote.streams,
                 "schedule": None if remote.every_hours is None else {
                     "direction": remote.direction, "every_hours": remote.every_hours, "window": remote.window,
                     "vms": list(remote.vms) if remote.vms else None, "remove_vanished": remote.remove_vanished}}
                for remote in self._remotes.values()]

    def submit(self, remote_name: str, direction: str, vms: list[str] | None, remove_vanished: bool = False) -> Job:
        """Start a job (from the trio loop); TryAgain while the same remote and direction is running."""
        remote = self._remotes.get(remote_name)
        if remote is None:
            known = ", ".join(self._remotes) or "none is configured"
            raise NotFound(f"no remote named {remote_name!r} ({known})")
        key = (remote_name, direction)
        with self._lock:
            if key in self._running:
                raise TryAgain(f"a {direction} with remote {remote_name!r} is already running")
            self._running.add(key)
        self._last_start[remote_name] = time.time()
        try:
            params = {"remote": remote_name, "direction": direction, "vms": vms, "remove_vanished": remove_vanished}
            return self._jobs.submit("replicate", params,
                                     lambda job: self._run(job, remote, direction, vms, remove_vanished))
        except BaseException:
            with self._lock:
                self._running.discard(key)
            raise

    def _run(self, job: Job, remote: RemoteConfig, direction: str, vms: list[str] | None,
             remove_vanished: bool) -> dict[str, Any]:
        settings = settings_of(remote)
        link = link_for(settings)
        progress = ReplicationReport()
        succeeded = False

        def on_point(point: RestorePoint, report: ReplicationReport) -> None:
            nonlocal progress
            progress = report
            job.note("replication.point", vm=point.vm, point=point.id, chunks_sent=report.chunks_sent)

        try:
            with job.step("replicate", remote=remote.name, direction=direction):
                progress = replicate(self._store, settings, direction, vms, link, on_point, job.check_cancelled,
                                     remove_vanished)
            succeeded = True
            return {**progress.to_json(), "wire_bytes_sent": link.sent, "wire_bytes_received": link.received}
        finally:
            with self._lock:
                self._running.discard((remote.name, direction))
            if self._observer is not None:
                self._observer.replicated(remote.name, direction, progress, link, succeeded)

    def due(self, now: float, local: datetime.time) -> list[RemoteConfig]:
        """Remotes whose schedule says a job should start now."""
        found = []
        for remote in self._remotes.values():
            if remote.every_hours is None:
                continue
            if remote.window is not None and not parse_window(remote.window).holds(local):
                continue
            last = self._last_start.get(remote.name)
            if last is None or now - last >= remote.every_hours * 3600:
                found.append(remote)
        return found

    def start_due(self, clock: Callable[[], float] = time.time) -> list[Job]:
        """Submit each remote's scheduled job that is due (call from the trio loop)."""
        now = clock()
        started = []
        for remote in self.due(now, datetime.datetime.fromtimestamp(now).time()):
            try:
                started.append(self.submit(remote.name, remote.direction, list(remote.vms) or None,
                                           remote.remove_vanished))
            except TryAgain:
                continue
        return started

