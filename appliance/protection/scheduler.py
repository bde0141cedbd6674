"""When each VM's backup is due under its policy, starting those backups, and applying retention after one.

The scheduler keeps no state that matters across restarts: a VM is due when its policy's
schedule has come round since the VM's newest restore point (so a backup missed while
the appliance was down runs as soon as it is back, inside the window), which the
catalog knows. What it remembers in memory only throttles: a backup it started is not
started again for `RETRY_AFTER_SECONDS`, so one that failed is retried, but not on every
tick of the clock.

It decides and calls a `BackupStarter`; `PolicyBackups` is the one a serving appliance
uses: the backup service's job (one at a time per VM, the snapshot, the transfer) with
the policy's options, and the policy's retention once the point is committed.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from appliance.events import event
from appliance.config import PolicyConfig
from appliance.errors import StoreBusy, TryAgain
from appliance.jobs import Job
from appliance.protection.job import BackupOptions, BackupResult
from appliance.protection.policy import conflict, policy_for
from appliance.protection.retention import Retention, dropped
from appliance.schedule import Cron, Window, parse_cron, parse_window
from appliance.store.catalog import RestorePoint
from appliance.store.gc import GcReport, prune
from appliance.protection.service import BackupService
from appliance.store.repository import Store
from appliance.vsphere.inventory import VmInfo


#: How long after starting a VM's backup the scheduler waits before it may start it again (if still due).
RETRY_AFTER_SECONDS = 15 * 60

#: The newest restore point's creation time (UNIX seconds) of a VM, None for a VM without one.
Newest = Callable[[str], float | None]


class BackupStarter(Protocol):
    """Starts one VM's backup under a policy; raises TryAgain when that VM's backup is already running."""

    def start_backup(self, vm: str, connection: str, policy: PolicyConfig, reason: str) -> object: ...


class BackupScheduler:
    def __init__(self, policies: Sequence[PolicyConfig], default: PolicyConfig, starter: BackupStarter,
                 clock: Callable[[], float] = time.time) -> None:
        self._policies, self._default, self._starter, self._clock = tuple(policies), default, starter, clock
        #: Cron schedules count from here for a VM without any point: the first named minute after the start.
        self._since = clock()
        self._started: dict[tuple[str, str], float] = {}
        self._reported: set[str] = set()
        self._crons: dict[str, Cron] = {}
        self._windows: dict[str, Window] = {}
        for policy in (*self._policies, default):
            if policy.cron is not None:
                self._crons[policy.name] = parse_cron(policy.cron)
            if policy.window is not None:
                self._windows[policy.name] = parse_window(policy.window)

    def due(self, now: float, vms: Sequence[VmInfo], newest: Newest,
            connection: str) -> list[tuple[VmInfo, PolicyConfig]]:
        """The VMs of `connection` (listed from it as `vms`) whose backup should start at `now`, with their policy."""
        local = datetime.datetime.fromtimestamp(now)
        found = []
        for vm in vms:
            policy = policy_for(vm, self._policies, self._default, connection)
            if policy is None:
                continue
            self._report_conflict(vm, connection)
            window = self._windows.get(policy.name)
            if window is not None and not window.holds(local.time()):
                continue
            started = self._started.get((connection, vm.name))
            if started is not None and now - started < RETRY_AFTER_SECONDS:
                continue
            if self._scheduled(policy, newest(vm.name), now):
                found.append((vm, policy))
        return found

    def start_due(self, inventories: Mapping[str, Sequence[VmInfo]], newest: Newest) -> list[object]:
        """Start every due backup of every connection's VMs (`inventories`: connection name -> its VMs).

        A VM whose backup is already running (the starter raises TryAgain) is skipped, and
        due again at the next call.
        """
        now = self._clock()
        started = []
        for connection, vms in inventories.items():
            for vm, policy in self.due(now, vms, newest, connection):
                try:
                    started.append(self._starter.start_backup(vm.name, connection, policy,
                                                              self._reason(policy, newest(vm.name), now)))
                except TryAgain:
                    continue
                self._started[(connection, vm.name)] = now
        return started

    def hydration_marks(self, inventories: Mapping[str, Sequence[VmInfo]]) -> dict[str, bool]:
        """Whether each listed VM's policy keeps its newest point hydrated (templates left out)."""
        return {vm.name: policy.hydrate for connection, vms in inventories.items() for vm in vms
                if (policy := policy_for(vm, self._policies, self._default, connection)) is not None}

    def _scheduled(self, policy: PolicyConfig, newest: float | None, now: float) -> bool:
        cron = self._crons.get(policy.name)
        if cron is None:
            assert policy.every_hours is not None  # PolicyConfig demands one of the two
            return newest is None or now - newest >= policy.every_hours * 3600
        reference = datetime.datetime.fromtimestamp(self._since if newest is None else newest)
        return cron.next_after(reference).timestamp() <= now

    @staticmethod
    def _reason(policy: PolicyConfig, newest: float | None, now: float) -> str:
        schedule = f"every {policy.every_hours:g} h" if policy.cron is None else f'cron "{policy.cron}"'
        age = "no restore point yet" if newest is None else f"newest point {(now - newest) / 3600:.1f} h old"
        return f"policy {policy.name}: {schedule}, {age}"

    def _report_conflict(self, vm: VmInfo, connection: str) -> None:
        """Log, once per appliance run, a VM that folders, tags or `all` put under more than one policy."""
        line = conflict(vm, self._policies, connection)
        if line is not None and line not in self._reported:
            self._reported.add(line)
            event("backup.policy_conflict", logging.WARNING, connection=connection, detail=line)


def retention_of(policy: PolicyConfig) -> Retention:
    return Retention(policy.keep_last, policy.keep_daily, policy.keep_weekly, policy.keep_monthly)


def retention_due(store: Store, vm: str, policy: PolicyConfig) -> list[RestorePoint]:
    """The points of `vm` its policy's retention would remove now (never a held one), oldest first."""
    with store.env.begin() as txn:
        points = store.catalog.vm_points(txn, vm)
        return [point for point in dropped(points, retention_of(policy))
                if not store.catalog.holders(txn, point.id)]


def apply_retention(store: Store, vm: str, policy: PolicyConfig) -> tuple[list[RestorePoint], GcReport | None]:
    """After a backup of `vm`: remove what its policy no longer keeps, then collect garbage (only if it removed any).

    StoreBusy while another backup, prune or GC holds the store's writer lock: retention is
    idempotent, so the caller may skip it and let the next backup's retention catch up.
    """
    if not retention_due(store, vm, policy):
        return [], None
    return prune(store, vm, retention_of(policy))


class PolicyBackups:
    """The `BackupStarter` of a serving appliance: a backup job with the policy's options, then its retention."""

    def __init__(self, service: BackupService, store: Store) -> None:
        self._service, self._store = service, store

    def start_backup(self, vm: str, connection: str, policy: PolicyConfig, reason: str) -> Job:
        options = BackupOptions(quiesce=policy.quiesce, enable_cbt=policy.enable_cbt, streams=policy.streams)
        return self._service.submit(vm, connection, options, reason,
                                    after=lambda result: self._retain(policy, result))

    def _retain(self, policy: PolicyConfig, result: BackupResult) -> None:
        """Runs in the backup's job once its point is committed; a busy store defers retention, never fails the job."""
        vm = result.point.vm
        try:
            removed, _ = apply_retention(self._store, vm, policy)
        except StoreBusy as exc:
            event("backup.retention_deferred", vm=vm, reason=str(exc))
            return
        if removed:
            event("backup.retention", vm=vm, policy=policy.name, removed=",".join(point.id for point in removed))
