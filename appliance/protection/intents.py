"""Intent records: a backup says which snapshot it is about to take before it takes it.

A process killed between the snapshot and its removal (power loss, kill -9) would
otherwise leave a snapshot whose delta grows until the datastore fills. The record
(`STORE/backup-intents/<job>.json`) is written durably before `CreateSnapshot` and
removed after the snapshot is gone; the next start finds the records left and removes
those snapshots. The snapshot's own tag catches what the records miss (a record lost
with the disk), so the two together leave nothing behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.durable import write_durably
from appliance.names import JOB_ID


@dataclass(frozen=True)
class Intent:
    job: str
    vm: str
    connection: str  # the [[vsphere.connections]] name the snapshot was taken through
    snapshot: str  # the snapshot's tagged name
    started: float


class Intents:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(exist_ok=True)

    def record(self, vm: str, connection: str, job: str, snapshot: str) -> Intent:
        intent = Intent(JOB_ID.check(job), vm, connection, snapshot, time.time())
        write_durably(self._path(job), json.dumps(asdict(intent)).encode())
        return intent

    def done(self, intent: Intent) -> None:
        self._path(intent.job).unlink(missing_ok=True)

    def left(self) -> list[Intent]:
        """Records of backups that never finished their cleanup; torn records are dropped (the tag sweep
        still finds their snapshots)."""
        found = []
        for path in sorted(self._directory.glob("*.json")):
            try:
                found.append(Intent(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)
        return found

    def _path(self, job: str) -> Path:
        return self._directory / f"{JOB_ID.check(job)}.json"
