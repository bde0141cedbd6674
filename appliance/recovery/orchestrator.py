"""Instant boot, migrate, stop and recovery groups as job work, over a boot target.

Each function runs in a job's worker thread and records its steps on the job. A target
(`VsphereTarget`, `QemuTarget`) does the hypervisor's part of each; this module owns the
order and the undo: every step that changes something pushes how to take it back, and
a failure (or a cancel) unwinds them newest first, unless the caller keeps the wreck
for inspection. Undo steps are recorded too, and one failing does not stop the others.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from appliance.config import PolicyConfig, ProtectionConfig, default_policy
from appliance.control import Control
from appliance.datastore.sessions import SessionInfo
from appliance.errors import ApplianceError, LimitReached, NotFound, UsageError
from appliance.jobs import Job, JobCancelled
from appliance.protection.policy import policy_for
from appliance.recovery.plan import RecoveryPlan, boot_order
from appliance.verification import Verification, check_offered
from appliance.vsphere.inventory import VmInfo
from appliance.recovery.records import BootRecord, load_record, new_record, save_record


@dataclass(frozen=True)
class BootRequest:
    vm: str
    target: str  # "vsphere" | "qemu"
    point: str = "latest"
    session: str | None = None  # default: <vm>-<UTC time>
    host: str | None = None
    network: str | None = None
    connection: str | None = None
    power_on: bool = True
    verify: Verification = Verification("none")
    timeout: float = 600.0
    memory_mib: int = 512
    accel: str | None = None  # qemu: "auto", "kvm" or "tcg"; None: the configuration's qemu.accel
    keep: bool = False  # on failure, leave what was done for inspection
    expires_hours: float | None = None  # end the session (stop or migrate, per limits) after this long

    def __post_init__(self) -> None:
        check_offered(self.target, self.verify)

    def session_name(self) -> str:
        return self.session or f"{self.vm}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


class UndoStack:
    """How to take back what a job did, run newest first when it fails."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def push(self, description: str, action: Callable[[], object]) -> None:
        self._actions.append((description, action))

    def unwind(self) -> None:
        while self._actions:
            description, action = self._actions.pop()
            try:
                with self._job.step(f"undo: {description}", undo=True):
                    action()
            except (ApplianceError, OSError):
                continue  # recorded as a failed step; the remaining undos still run


class Target(Protocol):
    """A hypervisor that runs a session's VM; one per kind."""

    kind: str

    def boot(self, job: Job, session: SessionInfo, request: BootRequest, undo: UndoStack) -> dict[str, Any]:
        """Make the VM run from the session (pushing an undo per change); returns record details."""

    def verify(self, job: Job, record: BootRecord, check: Verification, timeout: float) -> dict[str, Any]:
        """Wait until `check` passes; returns what was learnt (e.g. the guest's IP)."""

    def migrate(self, job: Job, record: BootRecord, destination: str) -> dict[str, Any]:
        """Move the running VM's disks off the appliance to `destination`."""

    def stop(self, job: Job, record: BootRecord) -> None:
        """Power the VM off and take it off the hypervisor (and the datastore off a host no one uses)."""

    def release(self, job: Job, record: BootRecord) -> None:
        """After a migration and the session's removal: drop what only served the session."""


class Targets(Protocol):
    """The hypervisors a serving appliance is configured for."""

    def make(self, kind: str, details: dict[str, Any]) -> Target:
        """The target of `kind` ("vsphere", "qemu"); `details` names its connection (request or record)."""

    def inventory(self, connection: str | None) -> list[VmInfo]:
        """Every VM a vSphere connection knows (for discovery)."""


class Recovery:
    """The orchestrator of one serving appliance."""

    def __init__(self, control: Control, targets: Targets, protection: ProtectionConfig,
                 policies: tuple[PolicyConfig, ...] = ()) -> None:
        self.control = control
        self.targets = targets
        self.protection = protection
        self.policies = policies
        self._boots_lock = threading.Lock()
        self._booting = 0  # VMs between "limit checked" and "boot record saved"

    # ----- limits ------------------------------------------------------------------------

    def running_boots(self) -> list[BootRecord]:
        records = []
        for info in self.control.list_sessions():
            record = load_record(self.control.store, info)
            if record is not None and record.state == "running":
                records.append(record)
        return records

    @contextlib.contextmanager
    def _boot_slot(self, count: int = 1) -> Iterator[None]:
        """Hold `count` of limits.max_instant_boots while VMs are being booted."""
        limit = self.control.limits.max_instant_boots
        with self._boots_lock:
            in_use = len(self.running_boots()) + self._booting
            if in_use + count > limit:
                raise LimitReached(
                    f"cannot boot {count} more VM{'s' if count > 1 else ''}: {in_use} run or are booting from "
                    f"this appliance and limits.max_instant_boots is {limit} (each one reads its disks from this "
                    "store, and all of them slow down together; migrate or stop one first)")
            self._booting += count
        try:
            yield
        finally:
            with self._boots_lock:
                self._booting -= count

    def check_boot_capacity(self, count: int = 1) -> None:
        """Refuse at once, before a job is made, when the boots would exceed the limit."""
        with self._boot_slot(count):
            pass

    # ----- instant boot ------------------------------------------------------------------

    def instant_boot(self, job: Job, request: BootRequest) -> dict[str, Any]:
        with self._boot_slot():
            return self._instant_boot(job, request)

    def _instant_boot(self, job: Job, request: BootRequest) -> dict[str, Any]:
        name = request.session_name()
        undo = UndoStack(job)
        target = self.targets.make(request.target, {"host": request.host, "connection": request.connection})
        try:
            with job.step("create session", session=name, vm=request.vm, point=request.point) as step:
                info = self.control.create_session(request.vm, request.point, name, request.expires_hours)
                step.detail = f"session {name} of point {info.point}"
            undo.push(f"delete session {name}", lambda: self.control.delete_session(name))
            details = target.boot(job, info, request, undo)
            record = new_record(info, target.kind, details)
            save_record(self.control.store, info, record)
            learnt: dict[str, Any] = {}
            if request.power_on and request.verify.kind != "none":
                with job.step("verify", how=str(request.verify), timeout=request.timeout) as step:
                    learnt = target.verify(job, record, request.verify, request.timeout)
                    step.detail = ", ".join(f"{key}={value}" for key, value in learnt.items())
                save_record(self.control.store, info, record.with_state("running", **learnt))
        except BaseException as exc:
            if request.keep:
                job.note("instant_boot.kept", session=name, reason=str(exc))
            else:
                undo.unwind()
            raise
        return {"session": name, "vm": request.vm, "point": info.point, "target": target.kind,
                **details, **learnt}

    # ----- migrate, stop -----------------------------------------------------------------

    def _record(self, session: str) -> tuple[SessionInfo, BootRecord]:
        info = self.control.get_session(session)
        record = load_record(self.control.store, info)
        if record is None:
            raise NotFound(f"session {session!r} has no VM booted from it (see `appliance instant-boot`)")
        return info, record

    def migrate(self, job: Job, session: str, destination: str) -> dict[str, Any]:
        """Move the running VM's disks to production, then remove the session it no longer needs."""
        info, record = self._record(session)
        if record.state != "running":
            raise UsageError(f"session {session!r} is {record.state}, not running")
        target = self.targets.make(record.target, record.details)
        with (self.control.activities.holding(record.vm, f"its instant boot (session {session}) is being migrated"),
              job.step("migrate", session=session, destination=destination) as step):
            moved = target.migrate(job, record, destination)
            step.detail = ", ".join(f"{key}={value}" for key, value in moved.items())
        record = record.with_state("migrated", **moved)
        save_record(self.control.store, info, record)
        with job.step("delete session", session=session):
            self.control.delete_session(session)
        target.release(job, record)
        return {"session": session, "vm": record.vm, "target": record.target, **moved}

    def stop(self, job: Job, session: str, commit: bool = False) -> dict[str, Any]:
        """Power off and unregister the session's VM, then drop (or first commit) the session."""
        info = self.control.get_session(session)
        record = load_record(self.control.store, info)
        result: dict[str, Any] = {"session": session, "vm": info.vm}
        running = record if record is not None and record.state == "running" else None
        target = None if running is None else self.targets.make(running.target, running.details)
        if target is not None and running is not None:
            target.stop(job, running)
        if commit:
            with job.step("commit session", session=session) as step:
                point = self.control.commit_session(session)
                step.detail = f"point {point.id}"
            result["point"] = point.id
        with job.step("delete session", session=session):
            self.control.delete_session(session)
        if target is not None and running is not None:
            target.release(job, running)
        return result

    def end_expired(self, session: str) -> None:
        """The control plane's ender of expired sessions: a stop or migrate job, per limits.expiry_action.

        Called from the expiry worker thread; the job is started on the trio loop.
        """
        limits = self.control.limits
        record = load_record(self.control.store, self.control.get_session(session))
        work: Callable[[Job], dict[str, Any]]
        if limits.expiry_action == "migrate" and record is not None and record.state == "running":
            destination = str(limits.expiry_migrate_to)
            kind, work = "migrate", lambda job: self.migrate(job, session, destination)
        else:
            kind, work = "stop", lambda job: self.stop(job, session)
        trio.from_thread.run_sync(self.control.jobs.submit, kind, {"session": session, "reason": "expired"}, work)

    # ----- discovery ---------------------------------------------------------------------

    def discover(self, connection: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
        """Every VM of vCenter against the catalog: unprotected first, then stale, then protected; each with its policy.

        A VM counts as protected when the store holds restore points under its name. A VM
        no policy selects is under the default policy, so every row names one.
        """
        now = time.time() if now is None else now
        backed_up = {vm.name: vm for vm in self.control.vms()}
        stale_after = self.protection.stale_after_hours * 3600
        default = default_policy(self.protection, self.policies)
        found = []
        for vm in self.targets.inventory(connection):
            policy = policy_for(vm, self.policies, default, connection)
            if policy is None:
                continue
            summary = backed_up.get(vm.name)
            row: dict[str, Any] = {"vm": vm.name, "uuid": vm.uuid, "power_state": vm.power_state, "host": vm.host,
                                   "policy": policy.name}
            if summary is None:
                row.update(status="unprotected", newest_point=None, age_hours=None)
            else:
                age = now - summary.newest_created
                row.update(status="stale" if age > stale_after else "protected",
                           newest_point=summary.newest_point, age_hours=round(age / 3600, 1), points=summary.points)
            found.append(row)
        order = {"unprotected": 0, "stale": 1, "protected": 2}
        return sorted(found, key=lambda row: (order[row["status"]], row["vm"]))

    # ----- recovery groups ---------------------------------------------------------------

    def run_group(self, job: Job, plan: RecoveryPlan, keep: bool = False) -> dict[str, Any]:
        """Boot the plan's VMs in dependency order, verify each, report, then stop them all.

        A VM whose dependency failed is skipped. With `keep`, VMs that booted keep running
        (to be stopped or migrated later); otherwise the whole group is torn down, which
        is what a scheduled recovery test wants.
        """
        group = plan.group
        self.check_boot_capacity(len(plan.vms))
        report: list[dict[str, Any]] = []
        verdicts: dict[str, str] = {}
        booted: list[str] = []
        try:
            for vm in boot_order(plan):
                blocked = [name for name in vm.after if verdicts.get(name) != "ok"]
                if blocked:
                    verdicts[vm.name] = "skipped"
                    report.append({"vm": vm.name, "verdict": "skipped",
                                   "reason": f"dependency {', '.join(blocked)} did not come up", "steps": []})
                    job.note("recovery_group.skipped", group=group.name, vm=vm.name, blocked=",".join(blocked))
                    continue
                request = BootRequest(
                    vm=vm.name, target="qemu" if group.qemu else "vsphere", point=vm.point,
                    session=f"{group.name}-{vm.name}", host=vm.host or group.host, network=group.network,
                    connection=group.connection, verify=vm.verify, timeout=vm.timeout, memory_mib=vm.memory_mib)
                first_step = len(job.steps)
                started = time.time()
                try:
                    result = self.instant_boot(job, request)
                except JobCancelled:
                    raise
                except ApplianceError as exc:
                    verdicts[vm.name] = "failed"
                    report.append(self._vm_report(job, vm.name, "failed", started, first_step, reason=str(exc)))
                    continue
                verdicts[vm.name] = "ok"
                booted.append(result["session"])
                report.append(self._vm_report(job, vm.name, "ok", started, first_step, session=result["session"]))
        finally:
            if not keep:
                for session in reversed(booted):
                    try:
                        self.stop(job, session)
                    except ApplianceError as exc:
                        job.note("recovery_group.teardown_failed", session=session, reason=str(exc))
        failed = [name for name, verdict in verdicts.items() if verdict != "ok"]
        job.result = {"group": group.name, "verdict": "failed" if failed else "ok", "kept": keep, "vms": report}
        if failed:  # the job fails, and its result still holds the report
            raise ApplianceError(f"recovery group {group.name}: not every VM came up ({', '.join(failed)})")
        return job.result

    @staticmethod
    def _vm_report(job: Job, vm: str, verdict: str, started: float, first_step: int, **extra: Any) -> dict[str, Any]:
        steps = [{"name": step.name, "seconds": step.seconds, "verdict": step.verdict, "detail": step.detail}
                 for step in job.steps[first_step:]]
        return {"vm": vm, "verdict": verdict, "seconds": round(time.time() - started, 3), "steps": steps, **extra}

