"""Which hypervisor runs a session's VM: the target factory a serving appliance uses."""

from __future__ import annotations

import ipaddress
from typing import Any

from appliance.config import VsphereConnection
from appliance.control import Control
from appliance.errors import NotFound, NotSupported, UsageError
from appliance.recovery.orchestrator import Target, TargetFactory
from appliance.recovery.qemu_target import QemuSettings, QemuTarget
from appliance.recovery.vsphere_target import VsphereTarget
from appliance.vsphere.settings import settings_for


def local_address(bind: str) -> str:
    """The address a process on this host reaches a listener bound to `bind` at."""
    address = ipaddress.ip_address(bind)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return str(address)


def target_factory(control: Control, nfs_bind: str, export_path: str,
                   connections: tuple[VsphereConnection, ...] = ()) -> TargetFactory:
    """Targets for a server whose NFS listens on `nfs_bind` and exports the datastore at `export_path`."""
    qemu = QemuSettings(nfs_host=local_address(nfs_bind), export_path=export_path,
                        guests=control.store.path / "guests")
    by_name = {connection.name: connection for connection in connections}

    def vsphere(name: str | None) -> Target:
        if name is None:
            if len(by_name) != 1:
                raise UsageError(f"{len(by_name)} vSphere connections are configured: name one (connection)"
                                 if by_name else "no vSphere connection is configured ([[vsphere.connections]])")
            name = next(iter(by_name))
        connection = by_name.get(name)
        if connection is None:
            raise NotFound(f"no vSphere connection named {name!r} (configured: {', '.join(by_name) or 'none'})")
        settings = settings_for(connection, connection.nfs_server_address or nfs_bind, export_path)
        return VsphereTarget(control, name, settings)

    def make(kind: str, details: dict[str, Any]) -> Target:
        if kind == "qemu":
            return QemuTarget(control, qemu)
        if kind == "vsphere":
            return vsphere(details.get("connection"))
        raise NotSupported(f"no boot target {kind!r}")

    return make
