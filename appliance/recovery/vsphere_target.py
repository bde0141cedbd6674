"""Running a session's VM on vSphere: mount, register, isolate, power on; Storage vMotion back.

Every call opens its own vCenter session (an undo may run long after the boot's session
ended, and a migration days later), so nothing here outlives a job. The VM is
registered under the session's name; it gets a fresh identity (uuid, instanceUuid) when
the original VM still exists in the inventory, found by the .vmx's `uuid.bios` or, for
a backup without one, by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pyVmomi import vim

from appliance.control import Control
from appliance.datastore.sessions import SessionInfo
from appliance.errors import DatastoreInUse
from appliance.jobs import Job
from appliance.recovery.orchestrator import BootRequest, UndoStack
from appliance.recovery.records import BootRecord
from appliance.verification import Verification
from appliance.vsphere import (
    Connection,
    find_host,
    find_network,
    find_vm,
    inventory,
    mount_datastore,
    move_nics,
    open_connection,
    power_off,
    power_on,
    register_vm,
    relocate_vm,
    unmount_datastore,
    unregister_vm,
    verify_vm,
    vm_with_uuid,
)
from appliance.vsphere.client import named
from appliance.vsphere.inventory import VmInfo
from appliance.vsphere.settings import VsphereSettings

T = TypeVar("T")
#: Storage vMotion copies whole disks; the default task timeout is for short calls.
RELOCATE_TIMEOUT_SECONDS = 6 * 3600.0
_UUID_BIOS = re.compile(r'^\s*uuid\.bios\s*=\s*"([0-9a-fA-F \-]+)"\s*$', re.M)


def bios_uuid(vmx: bytes) -> str | None:
    """A .vmx's `uuid.bios` ("56 4d ... 1f-20 ...") in vSphere's form (564d...-....-....-....-............)."""
    found = _UUID_BIOS.search(vmx.decode(errors="replace"))
    if found is None:
        return None
    digits = re.sub(r"[^0-9a-fA-F]", "", found.group(1)).lower()
    if len(digits) != 32:
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class VsphereTarget:
    kind = "vsphere"

    def __init__(self, control: Control, connection_name: str, settings: VsphereSettings) -> None:
        self.control = control
        self.connection_name = connection_name
        self.settings = settings

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        with open_connection(self.settings, self.settings.password()) as connection:
            yield connection

    def _with_vm(self, name: str, action: Callable[[Connection, vim.VirtualMachine], T]) -> T:
        with self._connection() as connection:
            return action(connection, find_vm(connection, name))

    def _original_exists(self, connection: Connection, session: SessionInfo) -> bool:
        vmx = self.control.session_file(session.name, f"{session.vm}.vmx")
        uuid = None if vmx is None else bios_uuid(vmx)
        if uuid is not None:
            return vm_with_uuid(connection, uuid) is not None
        return named(connection, vim.VirtualMachine, session.vm) is not None

    def boot(self, job: Job, session: SessionInfo, request: BootRequest, undo: UndoStack) -> dict[str, Any]:
        assert request.host is not None  # the API refuses a vSphere boot without one
        name, host_name = session.name, request.host
        details = {"connection": self.connection_name, "host": host_name, "vm_name": name,
                   "datastore": self.settings.datastore_name}
        with self._connection() as connection:
            with job.step("mount datastore", host=host_name, datastore=self.settings.datastore_name) as step:
                host = find_host(connection, host_name)
                datastore = mount_datastore(connection, host)
                step.detail = f"{datastore.name} = {self.settings.nfs_server}:{self.settings.export_path}"
            job.note("datastore.mounted", via="vsphere", host=host_name, datastore=self.settings.datastore_name)
            undo.push(f"unmount datastore from {host_name} unless used", lambda: self._unmount_if_unused(host_name))
            with job.step("register VM", name=name) as step:
                fresh = self._original_exists(connection, session)
                machine = register_vm(connection, host, name, session.vm, name, fresh_identity=fresh)
                step.detail = f"{name} on {host_name}" + (" with a fresh identity (the original exists)" if fresh else "")
            undo.push(f"unregister VM {name}", lambda: self._with_vm(name, unregister_vm))
            if request.network:
                with job.step("isolate network", network=request.network) as step:
                    find_network(connection, request.network)
                    previous = move_nics(connection, machine, request.network)
                    step.detail = f"{len(previous)} NIC(s) moved to {request.network}"
            if request.power_on:
                with job.step("power on", vm=name):
                    power_on(connection, machine)
                job.note("vm.powered_on", session=name, vm=session.vm, target="vsphere", host=host_name)
                undo.push(f"power off VM {name}", lambda: self._with_vm(name, power_off))
        return details

    def verify(self, job: Job, record: BootRecord, check: Verification, timeout: float) -> dict[str, Any]:
        seen = self._with_vm(record.details["vm_name"],
                             lambda connection, machine: verify_vm(connection, machine, check, timeout,
                                                                   record.session, job.sleep))
        return {"verified": seen}

    def migrate(self, job: Job, record: BootRecord, destination: str) -> dict[str, Any]:
        def relocate(connection: Connection, machine: vim.VirtualMachine) -> None:
            relocate_vm(connection, machine, destination, timeout=RELOCATE_TIMEOUT_SECONDS)

        self._with_vm(record.details["vm_name"], relocate)
        job.note("vm.migrated", session=record.session, vm=record.vm, target="vsphere", to=destination)
        return {"datastore": destination}

    def stop(self, job: Job, record: BootRecord) -> None:
        name = record.details["vm_name"]
        with job.step("power off", vm=name):
            self._with_vm(name, power_off)
        job.note("vm.powered_off", session=record.session, vm=record.vm, target="vsphere")
        with job.step("unregister VM", vm=name):
            self._with_vm(name, unregister_vm)

    def release(self, job: Job, record: BootRecord) -> None:
        host = record.details["host"]
        with job.step("unmount datastore unless used", host=host) as step:
            step.detail = "unmounted" if self._unmount_if_unused(host) else "kept: other VMs use it"

    def inventory(self) -> list[VmInfo]:
        with self._connection() as connection:
            return inventory(connection)

    def _unmount_if_unused(self, host_name: str) -> bool:
        with self._connection() as connection:
            try:
                return unmount_datastore(connection, find_host(connection, host_name))
            except DatastoreInUse:
                return False
