"""A vSphere session and the few primitives every operation is built from.

Everything here is synchronous and bounded: SOAP calls by the connection's HTTP
timeout, tasks by an explicit deadline. Callers on the trio loop run these functions
in a worker thread. pyvmomi raises its own fault types; they become `VsphereError`s
(one hierarchy, `appliance.errors`) in `faults`, which names what was being done.

Objects are found by name with the property collector (one round trip for all objects
of a kind), never by walking the inventory attribute by attribute: on a vCenter with
thousands of VMs that would be thousands of calls.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from appliance.config_checks import Secret
from appliance.errors import NotFound, TaskFailed, VsphereError, VsphereTimeout, VsphereUnreachable
from appliance.vsphere.settings import VsphereSettings

#: Task polling starts fast (vCenter finishes most tasks in well under a second) and backs off.
_FIRST_POLL = 0.05
_LAST_POLL = 1.0
#: The cookie vSphere's SOAP endpoint sets at login; the /folder file service takes it too.
SESSION_COOKIE = "vmware_soap_session"


@dataclass(frozen=True)
class Connection:
    """A logged-in session and the settings it was opened with (datastore name, NFS server, timeout)."""

    settings: VsphereSettings
    service: vim.ServiceInstance

    @property
    def content(self) -> vim.ServiceInstanceContent:
        return self.service.content


def connect(settings: VsphereSettings, password: Secret) -> Connection:
    """Log in to vCenter/ESXi, verifying its certificate unless the settings opt out."""
    parts = urlsplit(settings.url)
    host, port = parts.hostname or "", parts.port or 443
    path = parts.path.rstrip("/") or "/sdk"  # "https://vcenter/" means its SDK, as in every vSphere client
    context = tls_context(settings)
    try:
        # A plain TCP connect first: pyvmomi's version probe has no timeout, so an address
        # that drops packets would hang the worker thread for minutes.
        socket.create_connection((host, port), timeout=settings.timeout).close()
        service = SmartConnect(host=host, port=port, path=path, user=settings.user,
                               pwd=password.reveal(), sslContext=context,
                               httpConnectionTimeout=settings.timeout)
    except vim.fault.InvalidLogin:
        raise VsphereUnreachable(f"{settings.url}: login as {settings.user!r} refused (wrong user or password)") \
            from None
    except ssl.SSLCertVerificationError as exc:
        raise VsphereUnreachable(f"{settings.url}: certificate not trusted ({exc.verify_message}); "
                                 "give ca_file, or set verify_tls = false to skip the check") from None
    except (OSError, http.client.HTTPException) as exc:
        raise VsphereUnreachable(f"{settings.url}: cannot connect: {exc}") from None
    except vmodl.MethodFault as exc:
        raise VsphereUnreachable(f"{settings.url}: login failed: {fault_text(exc)}") from None
    except Exception as exc:  # what pyvmomi raises when the URL answers but is no vSphere SDK
        raise VsphereUnreachable(f"{settings.url}: no vSphere API there ({exc})") from None
    return Connection(settings, service)


def disconnect(connection: Connection) -> None:
    """Log out; a session that is already gone (vCenter restarted) is not an error."""
    with contextlib.suppress(vmodl.MethodFault, OSError, http.client.HTTPException):
        Disconnect(connection.service)


class Session:
    """A connection that logs in again when vSphere ends its session (ESXi does after about 30 idle
    minutes, and a backup of a large VM outlives one). The new login goes over the same SOAP stub,
    which takes the new cookie, so every managed object already looked up stays usable. Thread-safe:
    the disk readers renew it from their own threads."""

    def __init__(self, settings: VsphereSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self.connection = connect(settings, settings.password())
        self._generation = 0

    @property
    def on_host(self) -> bool:
        """Logged in to an ESXi host itself, not to vCenter."""
        return str(self.connection.content.about.apiType) == "HostAgent"

    @property
    def generation(self) -> int:
        """Counts logins, so a failure seen by many threads at once renews the session once."""
        return self._generation

    def cookie(self) -> str:
        """`name=value` of the SOAP session cookie, which the datastore file service accepts as the login."""
        morsel = SimpleCookie(self.connection.service._stub.cookie).get(SESSION_COOKIE)
        if morsel is None:
            raise VsphereUnreachable(f"{self.settings.url}: the session has no {SESSION_COOKIE} cookie")
        return f"{SESSION_COOKIE}={morsel.coded_value}"

    def renew(self, seen_generation: int) -> None:
        """Log in again, unless another thread already did since it saw `seen_generation`."""
        with self._lock:
            if self._generation != seen_generation:
                return
            manager: Any = self.connection.content.sessionManager
            with faults(f"log in to {self.settings.url} again"):
                manager.Login(userName=self.settings.user, password=self.settings.password().reveal())
            self._generation += 1

    def ensure(self) -> None:
        """Log in again if the session has ended: called before each step that follows a long wait."""
        seen = self._generation
        manager: Any = self.connection.content.sessionManager
        try:
            alive = manager.currentSession is not None
        except vim.fault.NotAuthenticated:
            alive = False
        except (vmodl.MethodFault, OSError, http.client.HTTPException) as exc:
            raise VsphereUnreachable(f"{self.settings.url}: cannot check the session: {exc}") from None
        if not alive:
            self.renew(seen)

    def close(self) -> None:
        disconnect(self.connection)


@contextlib.contextmanager
def open_connection(settings: VsphereSettings, password: Secret) -> Iterator[Connection]:
    connection = connect(settings, password)
    try:
        yield connection
    finally:
        disconnect(connection)


def tls_context(settings: VsphereSettings) -> ssl.SSLContext:
    # Always an explicit context: given none, pyvmomi skips verification for localhost.
    if not settings.verify_tls:
        return ssl._create_unverified_context()
    try:
        return ssl.create_default_context(cafile=settings.ca_file)
    except OSError as exc:
        raise VsphereUnreachable(f"{settings.url}: cannot read ca_file {settings.ca_file}: {exc.strerror}") from None


@contextlib.contextmanager
def faults(what: str) -> Iterator[None]:
    """Turn pyvmomi's faults and transport errors inside the block into VsphereErrors saying `what` failed."""
    try:
        yield
    except vmodl.MethodFault as exc:
        raise VsphereError(f"{what}: {fault_text(exc)}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise VsphereUnreachable(f"{what}: connection to vSphere failed: {exc}") from None


def fault_name(fault: vmodl.MethodFault) -> str:
    """The fault's type without its namespace: "FileLocked" for vim.fault.FileLocked."""
    return type(fault).__name__.rsplit(".", 1)[-1]


def fault_text(fault: vmodl.MethodFault) -> str:
    """The fault's message, or its type when vSphere sent none (vcsim often does not)."""
    return fault.msg or fault_name(fault)


def collect(connection: Connection, kind: type, paths: Sequence[str]) -> list[tuple[Any, dict[str, Any]]]:
    """Every object of `kind` with the given properties, in one property-collector call.

    Properties an object does not have set are absent from its dict: reading them one by
    one would raise (and panics vcsim).
    """
    content = connection.content
    with faults(f"list {kind.__name__.rsplit('.', 1)[-1]} objects"):
        view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
        try:
            spec = vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view, skip=True,
                    selectSet=[vmodl.query.PropertyCollector.TraversalSpec(
                        name="view", path="view", skip=False, type=vim.view.ContainerView)])],
                propSet=[vmodl.query.PropertyCollector.PropertySpec(type=kind, pathSet=list(paths))])
            found: dict[str, tuple[Any, dict[str, Any]]] = {}
            result = content.propertyCollector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
            while result is not None:
                for item in result.objects:
                    # Keyed by object: a datastore mounted on several hosts may be listed once per host.
                    found[item.obj._moId] = (item.obj, {prop.name: prop.val for prop in item.propSet})
                if not result.token:
                    break
                result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
        finally:
            view.Destroy()
    return list(found.values())


def named(connection: Connection, kind: type, name: str) -> Any | None:
    """The object of `kind` called `name`, or None."""
    for obj, properties in collect(connection, kind, ["name"]):
        if properties.get("name") == name:
            return obj
    return None


def _find(connection: Connection, kind: type, what: str, name: str) -> Any:
    found = named(connection, kind, name)
    if found is None:
        raise NotFound(f"vSphere at {connection.settings.url} has no {what} named {name!r}")
    return found


def find_host(connection: Connection, name: str) -> vim.HostSystem:
    return _find(connection, vim.HostSystem, "ESXi host", name)


def find_vm(connection: Connection, name: str) -> vim.VirtualMachine:
    return _find(connection, vim.VirtualMachine, "VM", name)


def find_network(connection: Connection, name: str) -> vim.Network:
    """A standard port group or a distributed one (both are `vim.Network`s)."""
    return _find(connection, vim.Network, "network (port group)", name)


def find_datastore(connection: Connection, name: str) -> vim.Datastore:
    return _find(connection, vim.Datastore, "datastore", name)


def vm_with_uuid(connection: Connection, bios_uuid: str) -> vim.VirtualMachine | None:
    """The VM whose BIOS uuid (a .vmx's `uuid.bios`) this is, or None: is the original still there?"""
    with faults(f"look up the VM with uuid {bios_uuid}"):
        found: vim.VirtualMachine | None = connection.content.searchIndex.FindByUuid(
            uuid=bios_uuid, vmSearch=True, instanceUuid=False)
    return found


def datacenter_of(entity: vim.ManagedEntity) -> vim.Datacenter:
    """The datacenter an inventory object belongs to (its VM folder is where VMs are registered)."""
    parent = entity.parent
    while not isinstance(parent, vim.Datacenter):
        parent = parent.parent
    return parent


def wait_for_task(task: vim.Task, what: str, timeout: float) -> Any:
    """The task's result once it succeeds; its fault as a VsphereError; VsphereTimeout after `timeout` s.

    A timed-out task is not cancelled: most vSphere tasks cannot be, and the caller's undo
    decides what to do about one that may still finish.
    """
    deadline = time.monotonic() + timeout
    pause = _FIRST_POLL
    with faults(what):
        while True:
            info = task.info
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                fault: Any = info.error
                raise TaskFailed(f"{what}: {fault_text(fault)}", fault_name(fault))
            if time.monotonic() >= deadline:
                raise VsphereTimeout(f"{what}: not done after {timeout:g} s (task {task._moId} may still finish)")
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _LAST_POLL)
