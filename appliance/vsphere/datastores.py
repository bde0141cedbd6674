"""The appliance's NFS datastore on ESXi hosts: mount unless mounted, unmount when unused.

There is one datastore per appliance, of the same name, NFS server and export path on
every host: vCenter then sees one datastore mounted on several hosts, and a VM booted
from a session can later run on (or be registered by) any of them. A datastore of
that name backed by anything else belongs to someone else: neither mounted over nor
unmounted.

Mounting is idempotent, so every instant boot simply mounts; unmounting is refused
while a VM registered on the host uses the datastore, so the undo of one session
never pulls the disks from under another.
"""

from __future__ import annotations

from pyVmomi import vim

from appliance.errors import DatastoreConflict, DatastoreInUse, VsphereError
from appliance.vsphere.client import Connection, collect, fault_text, faults, named

#: NFS version 3: the only one the appliance's server speaks.
NFS_TYPE = "NFS"


def mount_datastore(connection: Connection, host: vim.HostSystem) -> vim.Datastore:
    """The appliance's datastore on `host`, mounted now unless it already was."""
    settings = connection.settings
    name = settings.datastore_name
    existing = named(connection, vim.Datastore, name)
    if existing is not None:
        _check_ours(connection, existing)
        with faults(f"list the datastores of host {host.name}"):
            if existing in host.datastore:
                return existing
    spec = vim.host.NasVolume.Specification(remoteHost=settings.nfs_server, remotePath=settings.export_path,
                                            localPath=name, accessMode="readWrite", type=NFS_TYPE)
    what = f"mount {settings.nfs_server}:{settings.export_path} as datastore {name!r} on host {host.name}"
    with faults(what):
        try:
            return host.configManager.datastoreSystem.CreateNasDatastore(spec)
        except vim.fault.DuplicateName:
            pass
    # Another caller mounted it between our look and our mount: what it mounted must be ours.
    mounted = named(connection, vim.Datastore, name)
    if mounted is None:
        raise VsphereError(f"{what}: vSphere reports the name taken, yet no datastore has it")
    _check_ours(connection, mounted)
    return mounted


def unmount_datastore(connection: Connection, host: vim.HostSystem) -> bool:
    """Unmount the appliance's datastore from `host`; False when it was not mounted there.

    Refused (DatastoreInUse, naming the VMs) while a VM registered on the host has files
    on it; unregister them, or let Storage vMotion move them, first.
    """
    name = connection.settings.datastore_name
    datastore = named(connection, vim.Datastore, name)
    with faults(f"list the datastores of host {host.name}"):
        if datastore is None or datastore not in host.datastore:
            return False
    _check_ours(connection, datastore)
    users = datastore_users(connection, datastore, host)
    if users:
        raise DatastoreInUse(f"datastore {name!r} stays mounted on host {host.name}: "
                             f"used by VM{'s' if len(users) > 1 else ''} {', '.join(sorted(users))}")
    with faults(f"unmount datastore {name!r} from host {host.name}"):
        try:
            host.configManager.datastoreSystem.RemoveDatastore(datastore)
        except vim.fault.ResourceInUse as exc:
            # Something we cannot see (a VM being registered right now) holds it.
            raise DatastoreInUse(f"datastore {name!r} stays mounted on host {host.name}: "
                                 f"{fault_text(exc)}") from None
    return True


def datastore_users(connection: Connection, datastore: vim.Datastore,
                    host: vim.HostSystem | None = None) -> list[str]:
    """Names of the VMs with files on `datastore` (only those registered on `host`, if given).

    Read from each VM's own `datastore` list, which Storage vMotion keeps current,
    rather than the datastore's `vm` list.
    """
    names = []
    for _vm, properties in collect(connection, vim.VirtualMachine, ["name", "datastore", "runtime.host"]):
        if datastore in properties.get("datastore", []) and (host is None or properties.get("runtime.host") == host):
            names.append(properties["name"])
    return names


def _check_ours(connection: Connection, datastore: vim.Datastore) -> None:
    """Refuse a datastore of the appliance's name that another server or export backs."""
    settings = connection.settings
    with faults(f"read datastore {settings.datastore_name!r}"):
        info = datastore.info
    nas = getattr(info, "nas", None)
    if nas is None:
        raise DatastoreConflict(f"datastore {settings.datastore_name!r} exists and is not an NFS datastore; "
                                "give this appliance another datastore_name")
    if (nas.remoteHost.lower(), _normal(nas.remotePath)) != (settings.nfs_server.lower(),
                                                             _normal(settings.export_path)):
        raise DatastoreConflict(f"datastore {settings.datastore_name!r} is {nas.remoteHost}:{nas.remotePath}, "
                                f"not this appliance's {settings.nfs_server}:{settings.export_path}; "
                                "give this appliance another datastore_name")


def _normal(path: str) -> str:
    """An export path as ESXi may echo it back ("/a/" for "/a")."""
    return "/" + path.strip("/")
