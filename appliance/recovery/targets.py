"""Which hypervisor runs a session's VM: the target factory a serving appliance uses."""

from __future__ import annotations

import ipaddress
from typing import Any

from appliance.config import QemuConfig, VsphereConnection
from appliance.control import Control
from appliance.errors import NotConfigured, NotFound, NotSupported
from appliance.recovery.orchestrator import Target
from appliance.recovery.qemu_target import QemuSettings, QemuTarget
from appliance.recovery.vsphere_target import VsphereTarget
from appliance.vsphere.inventory import VmInfo
from appliance.vsphere.settings import VsphereSettings, settings_for


def local_address(bind: str) -> str:
    """The address a process on this host reaches a listener bound to `bind` at."""
    address = ipaddress.ip_address(bind)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return str(address)


class ConfiguredTargets:
    """QEMU on this host, and the configured vSphere connections, for a serving appliance.

    The NFS server listens on `nfs_bind` and exports the datastore at `export_path`.
    """

    def __init__(self, control: Control, nfs_bind: str, export_path: str,
                 connections: tuple[VsphereConnection, ...] = (), qemu: QemuConfig = QemuConfig()) -> None:
        self.control = control
        self.nfs_bind = nfs_bind
        self.export_path = export_path
        self.qemu = QemuSettings(nfs_host=local_address(nfs_bind), export_path=export_path,
                                 guests=control.store.path / "guests", accel=qemu.accel, binary=qemu.binary)
        self.connections = {connection.name: connection for connection in connections}

    def make(self, kind: str, details: dict[str, Any]) -> Target:
        if kind == "qemu":
            return QemuTarget(self.control, self.qemu)
        if kind == "vsphere":
            return self.vsphere(details.get("connection"))
        raise NotSupported(f"no boot target {kind!r}")

    def vsphere(self, name: str | None) -> VsphereTarget:
        name, settings = self.vsphere_settings(name)
        return VsphereTarget(self.control, name, settings)

    def vsphere_settings(self, name: str | None) -> tuple[str, VsphereSettings]:
        """A connection's name and settings; with no name, the only connection configured."""
        if name is None:
            if len(self.connections) != 1:
                raise NotConfigured(f"{len(self.connections)} vSphere connections are configured: name one (connection)"
                                 if self.connections else "no vSphere connection is configured ([[vsphere.connections]])")
            name = next(iter(self.connections))
        connection = self.connections.get(name)
        if connection is None:
            raise NotFound(f"no vSphere connection named {name!r} (configured: {', '.join(self.connections) or 'none'})")
        return name, settings_for(connection, connection.nfs_server_address or self.nfs_bind, self.export_path)

    def inventory(self, connection: str | None) -> list[VmInfo]:
        return self.vsphere(connection).inventory()
