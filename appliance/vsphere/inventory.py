"""Every VM vSphere knows, for discovery: which are protected is decided against the catalog elsewhere.

Read in three property-collector calls whatever the size of the vCenter (VMs, hosts,
datastores), so discovery stays cheap enough to run before every report.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def inventory(connection: Connection) -> list[VmInfo]:
    """All VMs and templates, sorted by name; a VM without a readable configuration (orphaned) has empty uuids."""
    hosts = {host._moId: properties.get("name", "")
             for host, properties in collect(connection, vim.HostSystem, ["name"])}
    datastores = {datastore._moId: properties.get("name", "")
                  for datastore, properties in collect(connection, vim.Datastore, ["name"])}
    machines = collect(connection, vim.VirtualMachine, ["name", "config.uuid", "config.instanceUuid",
                                                        "config.template", "runtime.powerState", "runtime.host",
                                                        "datastore"])
    found = []
    for _vm, properties in machines:
        host = properties.get("runtime.host")
        found.append(VmInfo(
            name=properties.get("name", ""),
            uuid=properties.get("config.uuid", ""),
            instance_uuid=properties.get("config.instanceUuid", ""),
            power_state=str(properties.get("runtime.powerState", "")),
            host=hosts.get(host._moId, "") if host is not None else "",
            datastores=tuple(sorted(datastores.get(ds._moId, ds._moId) for ds in properties.get("datastore", []))),
            template=bool(properties.get("config.template", False)),
        ))
    return sorted(found, key=lambda info: info.name)
