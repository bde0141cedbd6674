"""Backups of vSphere VMs over the API: each one a job, like instant boots."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from appliance import errors
from appliance.api.access import PREFIX
from appliance.api.models import BackupCreate
from appliance.api.responses import documented
from appliance.protection.job import BackupOptions
from appliance.protection.service import BackupService


def backup_routes(app: FastAPI, service: BackupService) -> None:
    @app.post(f"{PREFIX}/backups", status_code=202,
              responses=documented(errors.NotFound, errors.NotConfigured, errors.TryAgain))
    async def start(body: BackupCreate) -> dict[str, Any]:
        """Back up a VM from vSphere now (snapshot, CBT, read, ingest, snapshot removed); poll the job."""
        options = BackupOptions(quiesce=body.quiesce, enable_cbt=body.enable_cbt, streams=body.streams)
        return service.submit(body.vm, body.connection, options).to_dict()

    @app.get(f"{PREFIX}/backups", responses=documented(takes_input=False))
    def backups() -> list[dict[str, Any]]:
        """Backup jobs, oldest first: running ones and the finished ones still remembered."""
        return [job.to_dict() for job in service.jobs() if job.kind == "backup"]
