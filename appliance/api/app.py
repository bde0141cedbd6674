"""The HTTP API: JSON over HTTP, served by `appliance serve` in its own trio loop.

Why FastAPI: request bodies are validated from typed models and the OpenAPI document
(``/api/v1/openapi.json``) is generated from the same code, so the document cannot
drift from what the server accepts; it runs on trio through hypercorn.

Every path, the OpenAPI document included, needs ``Authorization: Bearer <token>``;
the token is compared in constant time. Every error answers with a JSON body
``{"error": <kind>, "message": <reason>}`` and a status from one table
(`appliance.api.responses.STATUSES`); each operation's document lists the errors it
can answer with, built from that table.
"""

from __future__ import annotations

import hmac
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import errors
from appliance.api.access import PREFIX
from appliance.api.files import file_routes
from appliance.api.models import (
    InstantBootCreate,
    JobId,
    MigrationCreate,
    RecoveryGroupRun,
    SessionCreate,
    SessionExport,
    SessionName,
    StopRequest,
    VmName,
)
from appliance.api.backups import backup_routes
from appliance.api.replication import replication_routes
from appliance.api.responses import MethodCheck, documented, error_response, install_error_handlers
from appliance.control import Control
from appliance.jobs import Job
from appliance.recovery.orchestrator import BootRequest, Recovery
from appliance.recovery.plan import plan_from_table
from appliance.protection.service import BackupService
from appliance.replication.service import ReplicationService
from appliance.verification import parse_verification

VERSION = "0.1.0"


class TokenAuth:
    """ASGI middleware: no token, no access, for every path."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                refusal = errors.Unauthorized("a valid bearer token is required")
                await error_response(refusal, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def boot_request(body: InstantBootCreate) -> BootRequest:
    return BootRequest(vm=body.vm, target=body.target, point=body.point, session=body.session, host=body.host,
                       network=body.network, connection=body.connection, power_on=body.power_on,
                       verify=parse_verification(body.verify), timeout=body.timeout, memory_mib=body.memory_mib, accel=body.accel,
                       keep=body.keep, expires_hours=body.expires_hours)


def build_app(control: Control, token: str, recovery: Recovery | None = None,
              replication: ReplicationService | None = None, started: float | None = None,
              backups: BackupService | None = None) -> ASGIApp:
    """The API of one serving appliance, behind the method check and token authentication."""
    app = FastAPI(title="Instant-recovery appliance", version=VERSION, openapi_url=f"{PREFIX}/openapi.json",
                  docs_url=None, redoc_url=None)
    started = time.time() if started is None else started
    install_error_handlers(app)
    busy = (errors.NotFound, errors.SessionBusy, errors.TryAgain)

    @app.get(f"{PREFIX}/status", responses=documented(takes_input=False))
    def status() -> dict[str, Any]:
        """Version, uptime, limits and what is in use."""
        return {"version": VERSION, "pid": os.getpid(), "started": started,
                "uptime_seconds": round(time.time() - started, 3),
                "sessions": len(control.list_sessions()), "limits": asdict(control.limits),
                "jobs_running": sum(1 for job in control.jobs.all() if job.finished is None)}

    @app.get(f"{PREFIX}/vms", responses=documented(takes_input=False))
    def vms() -> list[dict[str, Any]]:
        """Every backed-up VM with its number of restore points and the newest."""
        return [asdict(vm) for vm in control.vms()]

    @app.get(f"{PREFIX}/vms/{{vm}}/points", responses=documented(errors.NotFound))
    def points(vm: VmName) -> list[dict[str, Any]]:
        """A VM's restore points, oldest first."""
        found = control.points(vm)
        if not found:
            raise errors.NotFound(f"no restore points of VM {vm!r}")
        return [point.to_json() for point in found]

    @app.get(f"{PREFIX}/points", responses=documented(takes_input=False))
    def all_points() -> list[dict[str, Any]]:
        return [point.to_json() for point in control.points()]

    @app.get(f"{PREFIX}/sessions", responses=documented(takes_input=False))
    def list_sessions() -> list[dict[str, Any]]:
        return [asdict(info) for info in control.list_sessions()]

    @app.post(f"{PREFIX}/sessions", status_code=201,
              responses=documented(errors.NotFound, errors.AlreadyExists, errors.LimitReached))
    def create_session(body: SessionCreate) -> dict[str, Any]:
        """A writable session of a restore point, visible over NFS and FUSE at once."""
        return asdict(control.create_session(body.vm, body.point, body.name, body.expires_hours))

    @app.get(f"{PREFIX}/sessions/{{name}}", responses=documented(errors.NotFound))
    def get_session(name: SessionName) -> dict[str, Any]:
        return asdict(control.get_session(name))

    @app.post(f"{PREFIX}/sessions/{{name}}/commit", responses=documented(*busy))
    def commit_session(name: SessionName) -> dict[str, Any]:
        """Store the session's disks as a new restore point (writes pause meanwhile)."""
        return control.commit_session(name).to_json()

    @app.post(f"{PREFIX}/sessions/{{name}}/export", status_code=204,
              responses=documented(*busy, errors.OutputRefused))
    def export_session(name: SessionName, body: SessionExport) -> None:
        """Write a session disk's merged view to a new sparse file on the appliance host."""
        control.export_session_disk(name, body.disk, Path(body.output))

    @app.delete(f"{PREFIX}/sessions/{{name}}", status_code=204, responses=documented(*busy))
    def delete_session(name: SessionName) -> None:
        """Drop the session and its overlay; its NFS handles become stale."""
        control.delete_session(name)

    @app.get(f"{PREFIX}/jobs", responses=documented(takes_input=False))
    def list_jobs() -> list[dict[str, Any]]:
        return [job.to_dict() for job in control.jobs.all()]

    @app.get(f"{PREFIX}/jobs/{{job_id}}", responses=documented(errors.NotFound))
    def get_job(job_id: JobId) -> dict[str, Any]:
        """A job's state, steps (time, verdict), log and result."""
        return control.job(job_id).to_dict()

    @app.post(f"{PREFIX}/jobs/{{job_id}}/cancel", status_code=202, responses=documented(errors.NotFound))
    def cancel_job(job_id: JobId) -> dict[str, Any]:
        """Ask a job to stop; it undoes what it did, as on any failure."""
        job = control.job(job_id)
        job.cancel()
        return job.to_dict()

    file_routes(app, control)
    replication_routes(app, control, replication)
    if recovery is not None:
        _recovery_routes(app, recovery)
    if backups is not None:
        backup_routes(app, backups)
    return TokenAuth(MethodCheck(app), token)


def _recovery_routes(app: FastAPI, recovery: Recovery) -> None:
    """Instant boots, migrations, stops and recovery groups: each one a job (202 + its record)."""
    jobs = recovery.control.jobs

    @app.post(f"{PREFIX}/instant-boots", status_code=202, responses=documented(errors.LimitReached))
    async def instant_boot(body: InstantBootCreate) -> dict[str, Any]:
        """Create a session and run its VM from it; poll the job for steps and verdict."""
        request = boot_request(body)
        recovery.check_boot_capacity()
        job = jobs.submit("instant-boot", body.model_dump(), partial_work(recovery.instant_boot, request))
        return job.to_dict()

    @app.get(f"{PREFIX}/instant-boots", responses=documented(takes_input=False))
    def running_boots() -> list[dict[str, Any]]:
        """VMs running from sessions (or migrated off them but not yet stopped)."""
        return [asdict(record) for record in recovery.running_boots()]

    @app.post(f"{PREFIX}/migrations", status_code=202, responses=documented(errors.NotFound))
    async def migrate(body: MigrationCreate) -> dict[str, Any]:
        """Move a running VM's disks to production, then remove its session."""
        recovery.control.get_session(body.session)
        job = jobs.submit("migrate", body.model_dump(), partial_work(recovery.migrate, body.session, body.destination))
        return job.to_dict()

    @app.post(f"{PREFIX}/sessions/{{name}}/stop", status_code=202, responses=documented(errors.NotFound))
    async def stop(name: SessionName, body: StopRequest) -> dict[str, Any]:
        """Power off and unregister the session's VM, then drop (or commit) the session."""
        recovery.control.get_session(name)
        job = jobs.submit("stop", {"session": name, **body.model_dump()}, partial_work(recovery.stop, name, body.commit))
        return job.to_dict()

    @app.get(f"{PREFIX}/discover", responses=documented(errors.NotFound, errors.NotConfigured, errors.VsphereError))
    def discover(connection: str | None = None) -> list[dict[str, Any]]:
        """Every VM of a vSphere connection with its policy: unprotected first, then stale, then protected."""
        return recovery.discover(connection)

    @app.post(f"{PREFIX}/recovery-groups", status_code=202, responses=documented(errors.ConfigError, errors.LimitReached))
    async def run_group(body: RecoveryGroupRun) -> dict[str, Any]:
        """Boot a plan's VMs in dependency order, verify each, report; tear down unless kept."""
        try:
            table = tomllib.loads(body.plan)
        except tomllib.TOMLDecodeError as exc:
            raise errors.ConfigError(body.source, f"not valid TOML: {exc}") from None
        plan = plan_from_table(table, body.source)
        recovery.check_boot_capacity(len(plan.vms))
        job = jobs.submit("recovery-group", {"group": plan.group.name, "keep": body.keep, "vms": len(plan.vms)},
                          partial_work(recovery.run_group, plan, body.keep))
        return job.to_dict()


def partial_work(function: Callable[..., dict[str, Any]], *args: Any) -> Callable[[Job], dict[str, Any]]:
    """Job work: `function(job, *args)`."""
    return lambda job: function(job, *args)
