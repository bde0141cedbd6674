"""Which hypervisor runs a session's VM: the target factory a serving appliance uses."""

from __future__ import annotations

import ipaddress
from typing import Any

from appliance.control import Control
from appliance.errors import NotSupported
from appliance.recovery.orchestrator import Target, TargetFactory
from appliance.recovery.qemu_target import QemuSettings, QemuTarget


def local_address(bind: str) -> str:
    """The address a process on this host reaches a listener bound to `bind` at."""
    address = ipaddress.ip_address(bind)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return str(address)


def target_factory(control: Control, nfs_bind: str, export_path: str) -> TargetFactory:
    qemu = QemuSettings(nfs_host=local_address(nfs_bind), export_path=export_path,
                        guests=control.store.path / "guests")

    def make(kind: str, details: dict[str, Any]) -> Target:
        if kind == "qemu":
            return QemuTarget(control, qemu)
        raise NotSupported(f"no boot target {kind!r} is configured")

    return make


