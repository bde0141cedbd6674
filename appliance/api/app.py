"""The HTTP API: JSON over HTTP, served by `appliance serve` in its own trio loop.

Why FastAPI: request bodies are validated from typed models and the OpenAPI document
(``/api/v1/openapi.json``) is generated from the same code, so the document cannot
drift from what the server accepts; it runs on trio through hypercorn.

Every path, the OpenAPI document included, needs ``Authorization: Bearer <token>``;
the token is compared in constant time. Appliance errors become HTTP statuses in one
table (`STATUSES`), with a JSON body ``{"error": <kind>, "message": <reason>}``.
"""

from __future__ import annotations

import hmac
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import errors
from appliance.api.access import PREFIX
from appliance.control import Control
from appliance.jobs import Job
from appliance.recovery.orchestrator import BootRequest, Recovery
from appliance.recovery.plan import plan_from_table
from appliance.verification import parse_verification

VERSION = "0.1.0"

#: Appliance errors -> HTTP status, first match wins (subclasses before their bases).
STATUSES: tuple[tuple[type[errors.ApplianceError], int], ...] = (
    (errors.Unauthorized, 401),
    (errors.NotFound, 404),
    (errors.AlreadyExists, 409),
    (errors.SessionBusy, 409),
    (errors.TryAgain, 409),
    (errors.LimitReached, 429),
    (errors.InvalidName, 400),
    (errors.UsageError, 400),
    (errors.ConfigError, 400),
    (errors.ReadOnly, 403),
)


def status_of(exc: errors.ApplianceError) -> int:
    return next((status for kind, status in STATUSES if isinstance(exc, kind)), 500)


def error_body(kind: str, message: str) -> dict[str, str]:
    return {"error": kind, "message": message}


class TokenAuth:
    """ASGI middleware: no token, no access, for every path."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = JSONResponse(error_body("Unauthorized", "a valid bearer token is required"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class SessionCreate(BaseModel):
    vm: str = Field(description="VM whose restore point the session opens")
    point: str = Field("latest", description="restore point id, or 'latest'")
    name: str = Field(description="session name: a directory under /sessions of the datastore")
    expires_hours: float | None = Field(None, gt=0, description="end the session after this long "
                                        "(default: limits.session_expiry_hours)")


class SessionExport(BaseModel):
    disk: int = Field(0, ge=0, description="disk number, 0 first")
    output: str = Field(description="absolute path of a new file on the appliance host")


class InstantBootCreate(BaseModel):
    vm: str
    point: str = "latest"
    target: Literal["vsphere", "qemu"] = "vsphere"
    session: str | None = Field(None, description="session name (default: <vm>-<UTC time>)")
    host: str | None = Field(None, description="ESXi host to register the VM on (vsphere)")
    network: str | None = Field(None, description="port group every NIC is moved to (isolation)")
    connection: str | None = Field(None, description="vSphere connection name (default: the only one)")
    power_on: bool = True
    verify: str = Field("none", description="tools | ip | script:CMD | console:TEXT | none")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for the verification")
    memory_mib: int = Field(512, ge=64, description="guest memory (qemu)")
    accel: Literal["auto", "kvm", "tcg"] | None = Field(None, description="QEMU accelerator (qemu; default: the "
                                                        "configuration's qemu.accel)")
    keep: bool = Field(False, description="on failure keep what was done, for inspection")
    expires_hours: float | None = Field(None, gt=0, description="stop (or migrate, per limits.expiry_action) "
                                        "after this long (default: limits.session_expiry_hours)")


class MigrationCreate(BaseModel):
    session: str
    destination: str = Field(description="production datastore (vsphere) or directory on the appliance host (qemu)")


class StopRequest(BaseModel):
    commit: bool = Field(False, description="store the session's disks as a new restore point before dropping it")


class RecoveryGroupRun(BaseModel):
    plan: str = Field(description="the plan, TOML text")
    source: str = Field("plan", description="the plan's file name, for error messages")
    keep: bool = Field(False, description="leave the VMs running after the report")


def boot_request(body: InstantBootCreate) -> BootRequest:
    if body.target == "vsphere" and not body.host:
        raise errors.UsageError("a vSphere instant boot needs the ESXi host (host)")
    return BootRequest(vm=body.vm, target=body.target, point=body.point, session=body.session, host=body.host,
                       network=body.network, connection=body.connection, power_on=body.power_on,
                       verify=parse_verification(body.verify), timeout=body.timeout, memory_mib=body.memory_mib, accel=body.accel,
                       keep=body.keep, expires_hours=body.expires_hours)


def build_app(control: Control, token: str, recovery: Recovery | None = None, started: float | None = None) -> ASGIApp:
    """The API of one serving appliance, wrapped in token authentication."""
    app = FastAPI(title="Instant-recovery appliance", version=VERSION, openapi_url=f"{PREFIX}/openapi.json",
                  docs_url=None, redoc_url=None)
    started = time.time() if started is None else started

    @app.exception_handler(errors.ApplianceError)
    async def appliance_error(request: Request, exc: errors.ApplianceError) -> JSONResponse:
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=status_of(exc))

    @app.get(f"{PREFIX}/status")
    def status() -> dict[str, Any]:
        """Version, uptime, limits and what is in use."""
        return {"version": VERSION, "pid": os.getpid(), "started": started,
                "uptime_seconds": round(time.time() - started, 3),
                "sessions": len(control.list_sessions()), "limits": asdict(control.limits),
                "jobs_running": sum(1 for job in control.jobs.all() if job.finished is None)}

    @app.get(f"{PREFIX}/vms")
    def vms() -> list[dict[str, Any]]:
        """Every backed-up VM with its number of restore points and the newest."""
        return [asdict(vm) for vm in control.vms()]

    @app.get(f"{PREFIX}/vms/{{vm}}/points")
    def points(vm: str) -> list[dict[str, Any]]:
        """A VM's restore points, oldest first."""
        found = control.points(vm)
        if not found:
            raise errors.NotFound(f"no restore points of VM {vm!r}")
        return [point.to_json() for point in found]

    @app.get(f"{PREFIX}/points")
    def all_points() -> list[dict[str, Any]]:
        return [point.to_json() for point in control.points()]

    @app.get(f"{PREFIX}/sessions")
    def list_sessions() -> list[dict[str, Any]]:
        return [asdict(info) for info in control.list_sessions()]

    @app.post(f"{PREFIX}/sessions", status_code=201)
    def create_session(body: SessionCreate) -> dict[str, Any]:
        """A writable session of a restore point, visible over NFS and FUSE at once."""
        return asdict(control.create_session(body.vm, body.point, body.name, body.expires_hours))

    @app.get(f"{PREFIX}/sessions/{{name}}")
    def get_session(name: str) -> dict[str, Any]:
        return asdict(control.get_session(name))

    @app.post(f"{PREFIX}/sessions/{{name}}/commit")
    def commit_session(name: str) -> dict[str, Any]:
        """Store the session's disks as a new restore point (writes pause meanwhile)."""
        return control.commit_session(name).to_json()

    @app.post(f"{PREFIX}/sessions/{{name}}/export", status_code=204)
    def export_session(name: str, body: SessionExport) -> None:
        """Write a session disk's merged view to a new sparse file on the appliance host."""
        control.export_session_disk(name, body.disk, Path(body.output))

    @app.delete(f"{PREFIX}/sessions/{{name}}", status_code=204)
    def delete_session(name: str) -> None:
        """Drop the session and its overlay; its NFS handles become stale."""
        control.delete_session(name)

    @app.get(f"{PREFIX}/jobs")
    def list_jobs() -> list[dict[str, Any]]:
        return [job.to_dict() for job in control.jobs.all()]

    @app.get(f"{PREFIX}/jobs/{{job_id}}")
    def get_job(job_id: str) -> dict[str, Any]:
        """A job's state, steps (time, verdict), log and result."""
        return control.job(job_id).to_dict()

    @app.post(f"{PREFIX}/jobs/{{job_id}}/cancel", status_code=202)
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Ask a job to stop; it undoes what it did, as on any failure."""
        job = control.job(job_id)
        job.cancel()
        return job.to_dict()

    if recovery is not None:
        _recovery_routes(app, recovery)
    return TokenAuth(app, token)


def _recovery_routes(app: FastAPI, recovery: Recovery) -> None:
    """Instant boots, migrations, stops and recovery groups: each one a job (202 + its record)."""
    jobs = recovery.control.jobs

    @app.post(f"{PREFIX}/instant-boots", status_code=202)
    async def instant_boot(body: InstantBootCreate) -> dict[str, Any]:
        """Create a session and run its VM from it; poll the job for steps and verdict."""
        request = boot_request(body)
        recovery.check_boot_capacity()
        job = jobs.submit("instant-boot", body.model_dump(), partial_work(recovery.instant_boot, request))
        return job.to_dict()

    @app.get(f"{PREFIX}/instant-boots")
    def running_boots() -> list[dict[str, Any]]:
        """VMs running from sessions (or migrated off them but not yet stopped)."""
        return [asdict(record) for record in recovery.running_boots()]

    @app.post(f"{PREFIX}/migrations", status_code=202)
    async def migrate(body: MigrationCreate) -> dict[str, Any]:
        """Move a running VM's disks to production, then remove its session."""
        recovery.control.get_session(body.session)
        job = jobs.submit("migrate", body.model_dump(), partial_work(recovery.migrate, body.session, body.destination))
        return job.to_dict()

    @app.post(f"{PREFIX}/sessions/{{name}}/stop", status_code=202)
    async def stop(name: str, body: StopRequest) -> dict[str, Any]:
        """Power off and unregister the session's VM, then drop (or commit) the session."""
        recovery.control.get_session(name)
        job = jobs.submit("stop", {"session": name, **body.model_dump()}, partial_work(recovery.stop, name, body.commit))
        return job.to_dict()

    @app.get(f"{PREFIX}/discover")
    def discover(connection: str | None = None) -> list[dict[str, Any]]:
        """Every VM of a vSphere connection: unprotected (with the default policy) first, then stale, then protected."""
        return recovery.discover(connection)

    @app.post(f"{PREFIX}/recovery-groups", status_code=202)
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
