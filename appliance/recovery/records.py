"""What runs from a session: its boot record, kept in the session's own area.

``STORE/sessions/<inode>/boot.json`` says where the session's VM was booted (vSphere or
QEMU) with what the target needs to find it again (VM reference, host, datastore; or
the QEMU run directory), so `migrate` and `stop` work from a later process, and it
disappears with the session. A session without a record is just a session.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from appliance.datastore.layout import area_of
from appliance.datastore.sessions import SessionInfo
from appliance.durable import write_durably
from appliance.store.repository import Store

RECORD_NAME = "boot.json"


@dataclass(frozen=True)
class BootRecord:
    session: str
    vm: str
    target: str  # "vsphere" | "qemu"
    state: str  # "running" | "migrated"
    created: float
    details: dict[str, Any] = field(default_factory=dict)

    def with_state(self, state: str, **details: Any) -> BootRecord:
        return replace(self, state=state, details={**self.details, **details})


def new_record(info: SessionInfo, target: str, details: dict[str, Any]) -> BootRecord:
    return BootRecord(info.name, info.vm, target, "running", time.time(), details)


def save_record(store: Store, info: SessionInfo, record: BootRecord) -> None:
    write_durably(area_of(store, info.inode) / RECORD_NAME, json.dumps(asdict(record)).encode())


def load_record(store: Store, info: SessionInfo) -> BootRecord | None:
    try:
        doc = json.loads((area_of(store, info.inode) / RECORD_NAME).read_bytes())
    except FileNotFoundError:
        return None
    return BootRecord(**doc)
