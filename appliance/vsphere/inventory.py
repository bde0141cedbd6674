"""Every VM vSphere knows, for discovery and backup policies: which are protected is decided elsewhere.

Read in five property-collector calls whatever the size of the vCenter (VMs, hosts,
datastores, folders, datacenters), so discovery stays cheap enough to run before every
report and the scheduler can look at every VM each time it checks the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from appliance.vsphere.client import Connection, collect


@dataclass(frozen=True)
class VmInfo:
    name: str
    uuid: str  # BIOS uuid (config.uuid): what the guest sees, and what a .vmx backup carries
    instance_uuid: str  # vCenter's own id of the VM (config.instanceUuid)
    power_state: str  # "poweredOn", "poweredOff" or "suspended"
    host: str  # "" for a VM no host runs (orphaned, or being registered)
    datastores: tuple[str, ...]
    template: bool
    #: The inventory folder the VM is in, as vSphere paths show it ("/DC0/vm/prod"); "" outside any (a vApp's VM).
    folder: str = ""
    #: Its vSphere tags as "Category:Tag" (filled by `appliance.vsphere.tags.with_tags`, not by `inventory`).
    tags: tuple[str, ...] = ()
    #: vCenter's managed object id ("vm-42"): what tag associations name.
    moid: str = ""


def inventory(connection: Connection) -> list[VmInfo]:
    """All VMs and templates, sorted by name; a VM without a readable configuration (orphaned) has empty uuids."""
    hosts = {host._moId: properties.get("name", "")
             for host, properties in collect(connection, vim.HostSystem, ["name"])}
    datastores = {datastore._moId: properties.get("name", "")
                  for datastore, properties in collect(connection, vim.Datastore, ["name"])}
    machines = collect(connection, vim.VirtualMachine, ["name", "config.uuid", "config.instanceUuid",
                                                        "config.template", "runtime.powerState", "runtime.host",
                                                        "datastore", "parent"])
    containers = {item._moId: properties for kind in (vim.Folder, vim.Datacenter)
                  for item, properties in collect(connection, kind, ["name", "parent"])}
    found = []
    for vm, properties in machines:
        host = properties.get("runtime.host")
        found.append(VmInfo(
            name=properties.get("name", ""),
            uuid=properties.get("config.uuid", ""),
            instance_uuid=properties.get("config.instanceUuid", ""),
            power_state=str(properties.get("runtime.powerState", "")),
            host=hosts.get(host._moId, "") if host is not None else "",
            datastores=tuple(sorted(datastores.get(ds._moId, ds._moId) for ds in properties.get("datastore", []))),
            template=bool(properties.get("config.template", False)),
            folder=_path(properties.get("parent"), containers, connection.content.rootFolder._moId),
            moid=vm._moId,
        ))
    return sorted(found, key=lambda info: info.name)


def _path(parent: Any, containers: Mapping[str, Mapping[str, Any]], root: str) -> str:
    """The names from below the root folder down to `parent`, "/"-separated ("/" in a name is "%2f", as in vSphere)."""
    names: list[str] = []
    while parent is not None and parent._moId != root and parent._moId in containers:
        properties = containers[parent._moId]
        names.append(str(properties.get("name", "")).replace("%", "%25").replace("/", "%2f"))
        parent = properties.get("parent")
    return "".join(f"/{name}" for name in reversed(names))
