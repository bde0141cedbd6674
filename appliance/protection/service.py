"""Backups of vSphere VMs as jobs of a serving appliance.

One backup per VM at a time, and none while the VM's instant boot is being migrated
back (both hold the VM in `Control.activities` for as long as they run). The job's
thread does the work (`appliance.protection.job`); shutdown reaches it through the
job's cancellation, and the snapshot is removed on the way out. At start, `reconcile`
removes what backups killed mid-way left: the snapshots named in intent records, and
any snapshot carrying this appliance's tag.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, Protocol

from pyVmomi import vim

from appliance.activities import VmActivities
from appliance.errors import ApplianceError
from appliance.jobs import Job, JobRunner
from appliance.protection.intents import Intents
from appliance.protection.job import BackupOptions, BackupResult, back_up_vm
from appliance.store.repository import Store
from appliance.vsphere.client import Session, collect
from appliance.vsphere.settings import VsphereSettings
from appliance.vsphere.snapshots import owner_prefix, snapshot_trees, sweep

#: How often a backup waiting for its turn at the store checks whether it was cancelled.
TURN_POLL_SECONDS = 0.5
#: Resolves a connection name (None: the only one) to its name and settings.
SettingsOf = Callable[[str | None], tuple[str, VsphereSettings]]


class BackupObserver(Protocol):
    def backed_up(self, vm: str, result: BackupResult | None, seconds: float, bytes_read: int) -> None: ...


class BackupService:
    def __init__(self, store: Store, jobs: JobRunner, activities: VmActivities, settings_of: SettingsOf,
                 observer: BackupObserver | None = None,
                 committed: Callable[[BackupResult], None] | None = None) -> None:
        """`committed` runs in each backup's job once its point is committed (before the policy's `after`):
        the hydrator's cue to keep the new point hydrated."""
        self._store, self._jobs, self._activities = store, jobs, activities
        self._settings_of, self._observer, self._committed = settings_of, observer, committed
        self.intents = Intents(store.path / "backup-intents")
        self._ingesting = threading.Lock()

    def submit(self, vm: str, connection: str | None = None, options: BackupOptions = BackupOptions(),
               reason: str = "requested", after: Callable[[BackupResult], None] | None = None) -> Job:
        """Start a backup job (from the trio loop); TryAgain while the VM is being backed up or migrated.

        `after` runs in the job once its point is committed (a policy's retention)."""
        name, settings = self._settings_of(connection)
        self._activities.claim(vm, "a backup of it is running")
        try:
            params = {"vm": vm, "connection": name, "reason": reason, **asdict(options)}
            return self._jobs.submit("backup", params, lambda job: self._run(job, vm, name, settings, options, after))
        except BaseException:
            self._activities.release(vm)
            raise

    def _run(self, job: Job, vm: str, connection: str, settings: VsphereSettings, options: BackupOptions,
             after: Callable[[BackupResult], None] | None) -> dict[str, Any]:
        started, result, read = time.monotonic(), None, 0

        def count(size: int) -> None:
            nonlocal read
            read += size

        try:
            with self._store_turn(job):
                session = Session(settings)
                try:
                    result = back_up_vm(self._store, session, connection, vm, options, job, self.intents, count)
                finally:
                    session.close()
            if self._committed is not None:
                self._committed(result)
            if after is not None:
                after(result)
            return result.to_json()
        finally:
            self._activities.release(vm)
            if self._observer is not None:
                self._observer.backed_up(vm, result, time.monotonic() - started, read)

    @contextlib.contextmanager
    def _store_turn(self, job: Job) -> Iterator[None]:
        """Backups ingest one at a time (the store has one writer); the others wait here, before their
        snapshot, so no snapshot grows while its backup waits."""
        if not self._ingesting.acquire(blocking=False):
            with job.step("wait for the store"):
                while not self._ingesting.acquire(timeout=TURN_POLL_SECONDS):
                    job.check_cancelled()
        try:
            yield
        finally:
            self._ingesting.release()

    def jobs(self) -> list[Job]:
        return self._jobs.all()

    def reconcile(self, connections: list[str]) -> Job:
        """A job that removes the snapshots backups killed mid-way left behind, on every connection.

        `serve` starts it when backups run on schedule or intent records were left: an intent is
        written durably before every snapshot, so with neither, no backup was cut short."""
        return self._jobs.submit("backup-reconcile", {"connections": connections},
                                 lambda job: self._reconcile(job, connections))

    def _reconcile(self, job: Job, connections: list[str]) -> dict[str, Any]:
        prefix = owner_prefix(self._store.config.store_id)
        removed: dict[str, list[str]] = {}
        failed = []
        for name in connections:
            _, settings = self._settings_of(name)
            try:
                with job.step("sweep", connection=name):
                    session = Session(settings)
                    try:
                        for vm in _vms_with_snapshots(session, prefix):
                            removed[vm.name] = sweep(session.connection, vm, prefix, settings.timeout)
                    finally:
                        session.close()
            except ApplianceError as exc:
                failed.append(f"{name}: {exc}")
                continue
            for intent in self.intents.left():
                if intent.connection == name:
                    self.intents.done(intent)
        if failed:
            job.note("backup.reconcile_failed", logging.WARNING, reasons=failed)
            raise ApplianceError("left-over backup snapshots could not be checked on " + "; ".join(failed))
        return {"removed": removed}


def _vms_with_snapshots(session: Session, prefix: str) -> list[vim.VirtualMachine]:
    """VMs with a snapshot whose name starts with `prefix`, found in one property-collector call."""
    return [vm for vm, properties in collect(session.connection, vim.VirtualMachine, ["snapshot"])
            if any(tree.name.startswith(prefix) for tree in snapshot_trees(properties.get("snapshot")))]
