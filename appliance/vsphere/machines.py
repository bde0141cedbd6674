"""A session's VM in vSphere: register, identity, network, power, Storage vMotion, unregister.

Each function is one step of an instant boot with a plain undo, so the orchestration
can compose them and undo what it did in reverse order:

    register_vm        <->  unregister_vm
    move_nics          <->  set_nic_networks(previous)   (moot once the VM is unregistered)
    power_on           <->  power_off
    relocate_vm            (no undo: the VM now runs from production storage)

The steps are idempotent where a retry after a crash needs it: registering a session's
.vmx that is already registered under the same name returns that VM, powering on a
running VM or off a stopped one does nothing, unregistering a VM that is gone too.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from pyVmomi import vim, vmodl

from appliance.errors import AlreadyExists, NotFound, VsphereError
from appliance.vsphere.client import (
    Connection,
    collect,
    datacenter_of,
    faults,
    find_datastore,
    find_network,
    named,
    wait_for_task,
)

#: ESXi gives a VM whose .vmx was copied a new BIOS uuid without asking "moved or copied?".
FRESH_IDENTITY = vim.option.OptionValue(key="uuid.action", value="create")


def vmx_path(connection: Connection, session: str, vm: str) -> str:
    """Where ESXi finds a session's .vmx: `[datastore] sessions/<session>/<vm>.vmx`."""
    return f"[{connection.settings.datastore_name}] sessions/{session}/{vm}.vmx"


def register_vm(connection: Connection, host: vim.HostSystem, session: str, vm: str, name: str, *,
                fresh_identity: bool, timeout: float | None = None) -> vim.VirtualMachine:
    """Register the session's .vmx on `host` as `name`, in its datacenter's VM folder and its resource pool.

    `fresh_identity` is for when the original VM still exists (`vm_with_uuid` of the
    backed-up .vmx's `uuid.bios`, or a VM of the original's name): the copy gets a new
    uuid and instanceUuid (vCenter, backup tools and licences tell VMs apart by them)
    and `uuid.action = create`, so ESXi never stops at power-on to ask whether it
    was moved or copied. The appliance's datastore must be mounted on `host` first.
    """
    path = vmx_path(connection, session, vm)
    what = f"register {path} as VM {name!r} on host {host.name}"
    datastore = find_datastore(connection, connection.settings.datastore_name)
    with faults(what):
        if datastore not in host.datastore:
            raise VsphereError(f"{what}: datastore {datastore.name!r} is not mounted on the host")
        datacenter = datacenter_of(host)
        existing = connection.content.searchIndex.FindByDatastorePath(datacenter, path)
    if existing is None:
        clash = named(connection, vim.VirtualMachine, name)
        if clash is not None:
            raise AlreadyExists(f"{what}: vSphere already has a VM named {name!r}")
        with faults(what):
            task = datacenter.vmFolder.RegisterVM_Task(path=path, name=name, asTemplate=False,
                                                       pool=host.parent.resourcePool, host=host)
        machine: vim.VirtualMachine = wait_for_task(task, what, _timeout(connection, timeout))
    else:
        with faults(what):
            if existing.name != name:
                raise AlreadyExists(f"{what}: already registered as VM {existing.name!r}")
        machine = existing
    if fresh_identity and not _has_fresh_identity(machine):
        try:
            give_fresh_identity(connection, machine, timeout)
        except VsphereError:
            unregister_vm(connection, machine)
            raise
    return machine


def give_fresh_identity(connection: Connection, machine: vim.VirtualMachine, timeout: float | None = None) -> None:
    """New uuid and instanceUuid, and `uuid.action = create` (see `register_vm`)."""
    spec = vim.vm.ConfigSpec(uuid=str(uuid.uuid4()), instanceUuid=str(uuid.uuid4()), extraConfig=[FRESH_IDENTITY])
    what = f"give VM {machine.name!r} a fresh identity"
    with faults(what):
        task = machine.ReconfigVM_Task(spec)
    wait_for_task(task, what, _timeout(connection, timeout))


def _has_fresh_identity(machine: vim.VirtualMachine) -> bool:
    with faults(f"read the configuration of VM {machine.name!r}"):
        options = machine.config.extraConfig
    return any(option.key == FRESH_IDENTITY.key and option.value == FRESH_IDENTITY.value for option in options)


def unregister_vm(connection: Connection, machine: vim.VirtualMachine) -> bool:
    """Remove the VM from the inventory, leaving its files; False when it was already gone.

    A running VM is refused: power it off first (the undo order does).
    """
    try:
        name, state = machine.name, machine.runtime.powerState
    except vmodl.fault.ManagedObjectNotFound:
        return False
    if state != vim.VirtualMachine.PowerState.poweredOff:
        raise VsphereError(f"unregister VM {name!r}: it is {state}; power it off first")
    with faults(f"unregister VM {name!r}"):
        try:
            machine.UnregisterVM()
        except vmodl.fault.ManagedObjectNotFound:
            return False
    return True


def nic_networks(connection: Connection, machine: vim.VirtualMachine) -> dict[int, str]:
    """Each NIC's device key and the name of the network it is on.

    Keyed by device key, which is unique in a VM; labels ("Network adapter 1") are not
    always (vcsim repeats them).
    """
    portgroups = {properties["key"]: properties["name"]
                  for _pg, properties in collect(connection, vim.dvs.DistributedVirtualPortgroup, ["key", "name"])}
    networks = {}
    for nic in _nics(machine):
        backing = nic.backing
        if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            networks[nic.key] = portgroups.get(backing.port.portgroupKey, backing.port.portgroupKey)
        else:
            networks[nic.key] = getattr(backing, "deviceName", "") or ""
    return networks


def move_nics(connection: Connection, machine: vim.VirtualMachine, network: str,
              timeout: float | None = None) -> dict[int, str]:
    """Put every NIC on `network` (an isolated port group); returns where they were, for the undo."""
    previous = nic_networks(connection, machine)
    set_nic_networks(connection, machine, {key: network for key in previous}, timeout)
    return previous


def set_nic_networks(connection: Connection, machine: vim.VirtualMachine, networks: Mapping[int, str],
                     timeout: float | None = None) -> None:
    """Put the NICs (by device key) on the given networks (standard or distributed port groups)."""
    what = f"move the NICs of VM {machine.name!r}"
    nics = {nic.key: nic for nic in _nics(machine)}
    changes = []
    for key, network in networks.items():
        if key not in nics:
            raise NotFound(f"{what}: VM has no NIC with device key {key} (it has: {', '.join(map(str, nics)) or 'none'})")
        nic = nics[key]
        nic.backing = _backing(find_network(connection, network))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.edit,
                                                       device=nic))
    if not changes:
        return
    with faults(what):
        task = machine.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=changes))
    wait_for_task(task, what, _timeout(connection, timeout))


def _nics(machine: vim.VirtualMachine) -> list[vim.vm.device.VirtualEthernetCard]:
    with faults(f"read the devices of VM {machine.name!r}"):
        devices = machine.config.hardware.device
    return [device for device in devices if isinstance(device, vim.vm.device.VirtualEthernetCard)]


def _backing(network: vim.Network) -> vim.vm.device.VirtualDevice.BackingInfo:
    with faults(f"read network {network.name!r}"):
        if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
            port = vim.dvs.PortConnection(portgroupKey=network.key,
                                          switchUuid=network.config.distributedVirtualSwitch.uuid)
            return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
        if isinstance(network, vim.OpaqueNetwork):
            raise VsphereError(f"network {network.name!r} is an NSX opaque network; give a port group")
        return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network.name, network=network)


def power_on(connection: Connection, machine: vim.VirtualMachine, timeout: float | None = None) -> bool:
    """Power the VM on; False when it already ran."""
    return _power(connection, machine, vim.VirtualMachine.PowerState.poweredOn, timeout)


def power_off(connection: Connection, machine: vim.VirtualMachine, timeout: float | None = None) -> bool:
    """Power the VM off hard (the undo of a boot cannot wait on a guest that may hang); False when it was off."""
    return _power(connection, machine, vim.VirtualMachine.PowerState.poweredOff, timeout)


def _power(connection: Connection, machine: vim.VirtualMachine, state: str, timeout: float | None) -> bool:
    verb = "on" if state == vim.VirtualMachine.PowerState.poweredOn else "off"
    what = f"power {verb} VM {machine.name!r}"
    with faults(what):
        if machine.runtime.powerState == state:
            return False
        task = machine.PowerOnVM_Task() if verb == "on" else machine.PowerOffVM_Task()
    wait_for_task(task, what, _timeout(connection, timeout))
    return True


def relocate_vm(connection: Connection, machine: vim.VirtualMachine, datastore: str, *, timeout: float) -> None:
    """Storage vMotion: move all the VM's files to `datastore` while it runs, and wait.

    Afterwards the VM must use no other datastore; only then may the session behind the
    appliance's datastore go. Already being there is success.
    """
    target = find_datastore(connection, datastore)
    what = f"move VM {machine.name!r} to datastore {datastore!r}"
    with faults(what):
        if list(machine.datastore) == [target]:
            return
        host = machine.runtime.host
        if target not in host.datastore:
            raise VsphereError(f"{what}: the datastore is not mounted on host {host.name}")
        task = machine.RelocateVM_Task(vim.vm.RelocateSpec(datastore=target),
                                       vim.VirtualMachine.MovePriority.defaultPriority)
    wait_for_task(task, what, timeout)
    with faults(what):
        left = [other.name for other in machine.datastore if other != target]
    if left:
        raise VsphereError(f"{what}: files remain on {', '.join(left)}")


def _timeout(connection: Connection, timeout: float | None) -> float:
    return connection.settings.timeout if timeout is None else timeout
