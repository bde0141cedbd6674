"""govmomi's vCenter simulator as a pytest fixture: `from tests.vcsim import vcsim` (`running_vcsim` outside pytest).

`tests/vcsim/build.sh` builds the launcher (cached by a hash of its Go sources); each
test gets its own simulator on a free loopback port, in its own working directory, so
inventories never leak from one test into the next (starting one takes well under a
second; its TMPDIR, where it keeps the local datastores, is the test's directory too).
vcsim's default vCenter inventory: datacenter DC0, standalone host DC0_H0,
cluster DC0_C0 of DC0_C0_H0..H2, VMs DC0_H0_VM0/1 and DC0_C0_RP0_VM0/1, datastore
LocalDS_0, networks "VM Network" and DC0_DVPG0 (distributed).

vcsim does not speak NFS: a NAS datastore is a folder named like it in the working
directory, and registering a VM needs its .vmx, .nvram and vmware.log there. The
appliance's export is stood in for by that folder (`Vcsim.stage_session`).

For backups, our additions (tests/vcsim/sim_*.go) give every disk real VMFS-style files,
snapshots deltas, CBT and QueryChangedDiskAreas, and serve /folder as ESXi does. The
guest side and the failure switches are reached through a test-only control endpoint
(`/appliance-test/`, loopback only), wrapped here: `guest_write`, `live_read`, `switch`,
`clear_switch`, `folder_requests`, `set_power`, and `make_vm` for a VM of known disks.
Switches (`switch(name, value)`; a count N fires N times, no value means until cleared):
quiesce_fault, remove_locked[=N], consolidate_fail, qcda_page=BYTES, qcda_fault[=N],
require_cookie, ignore_range, short_body[=N], periodic_503=N, expire_sessions (one shot).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import select
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urlsplit

import pytest
from pyVmomi import vim

from appliance.vsphere.client import Connection, open_connection, wait_for_task
from appliance.vsphere.settings import VsphereSettings, from_mapping

BUILD_SCRIPT = Path(__file__).parent / "vcsim" / "build.sh"
USER = "appliance"
#: The launcher prints its URL once it accepts connections; a cold start takes < 1 s.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: The ESXi hosts of vcsim's default inventory.
HOSTS = ("DC0_H0", "DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2")
#: The address the tests' appliance gives ESXi for its NFS server.
NFS_SERVER = "192.0.2.10"
CONTROL = "/appliance-test/"
#: Long enough for a guest write of the 1 GiB benchmark disk.
CONTROL_TIMEOUT = 300.0


@cache
def vcsim_binary() -> Path:
    """Build (or find cached) the launcher once per test run."""
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed ({result.returncode}): {result.stderr.strip()}")
    return Path(result.stdout.strip())


@dataclass(frozen=True)
class FolderRequest:
    """One request to /folder, as the simulator logged it."""

    method: str
    path: str  # /folder/<path in the datastore>
    query: str  # dcPath=...&dsName=...
    range: str  # the Range header, "" without one
    cookies: tuple[str, ...]  # names of the cookies sent
    status: int


class ControlError(RuntimeError):
    """The control endpoint refused a request (no such VM or disk, a write beyond the disk)."""


@dataclass(frozen=True)
class Vcsim:
    url: str  # https://127.0.0.1:PORT/sdk
    user: str
    password_file: Path  # mode 0600, as the appliance demands
    certificate: Path  # the server's self-signed certificate (PEM), a CA for verify_tls
    workdir: Path  # vcsim's working directory: NAS datastores are folders here

    def settings(self, **overrides: Any) -> VsphereSettings:
        """Appliance settings for this simulator; TLS unverified unless overridden (the certificate is self-signed)."""
        table = {"url": self.url, "user": self.user, "password_file": str(self.password_file),
                 "verify_tls": False, "nfs_server": NFS_SERVER, "export_path": "/datastore",
                 "host_addresses": self.host_addresses()}
        table.update(overrides)
        return from_mapping(table, "test settings")

    def host_addresses(self) -> dict[str, str]:
        """Where the appliance reaches each simulated ESXi host: the simulator itself serves them all."""
        address = self.url.split("/")[2]
        return {host: address for host in HOSTS}

    def stage_session(self, datastore: str, session: str, vm: str, registered_as: str) -> Path:
        """The files vcsim wants before it registers `[datastore] sessions/<session>/<vm>.vmx`.

        vcsim names the .nvram after the name the VM is registered under, not the .vmx.
        """
        directory = self.workdir / datastore / "sessions" / session
        directory.mkdir(parents=True, exist_ok=True)
        for name in (f"{vm}.vmx", f"{registered_as}.nvram", "vmware.log"):
            (directory / name).touch()
        return directory

    def https(self, timeout: float = CONTROL_TIMEOUT) -> http.client.HTTPSConnection:
        """A connection to the simulator's HTTPS port (for /folder and the control endpoint)."""
        parts = urlsplit(self.url)
        context = ssl.create_default_context(cafile=str(self.certificate))
        return http.client.HTTPSConnection(parts.hostname or "", parts.port, context=context, timeout=timeout)

    def _control(self, method: str, action: str, query: dict[str, Any], body: bytes | BinaryIO | None = None) -> bytes:
        connection = self.https()
        headers: dict[str, str] = {}
        if body is not None and not isinstance(body, bytes):  # a file streams: tell its length up front
            headers["Content-Length"] = str(os.fstat(body.fileno()).st_size - body.tell())
        try:
            connection.request(method, f"{CONTROL}{action}?{urlencode(query)}", body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
        finally:
            connection.close()
        if answer.status >= 300:
            raise ControlError(f"{method} {action}: {answer.status} {data.decode(errors='replace').strip()}")
        return data

    def guest_write(self, vm: str, disk: int, offset: int, data: bytes | BinaryIO) -> None:
        """The guest of `vm` writes `data` at `offset` of its `disk`th disk (0 first): on the live delta, logged by CBT.

        `data` may be an open file, streamed from its position to its end (a whole large disk).
        """
        self._control("POST", "guest-write", {"vm": vm, "disk": disk, "offset": offset}, data)

    def live_read(self, vm: str, disk: int, offset: int, length: int) -> bytes:
        """What the guest of `vm` reads from its `disk`th disk: the chain of deltas merged."""
        return self._control("GET", "live-read", {"vm": vm, "disk": disk, "offset": offset, "length": length})

    def switch(self, name: str, value: int | str | None = None) -> None:
        """Set a failure switch (see the module's docstring), with an optional value or count."""
        self._control("POST", "switch", {"name": name} if value is None else {"name": name, "value": value})

    def clear_switch(self, name: str) -> None:
        self._control("DELETE", "switch", {"name": name})

    def switches(self) -> dict[str, str]:
        """The switches that are set, with their values (a count goes down as it fires)."""
        answer: dict[str, str] = json.loads(self._control("GET", "switches", {}))
        return answer

    def folder_requests(self) -> list[FolderRequest]:
        """Every /folder request so far, oldest first."""
        return [FolderRequest(r["method"], r["path"], r["query"], r["range"], tuple(r["cookies"] or ()), r["status"])
                for r in json.loads(self._control("GET", "folder-log", {}))]

    def set_power(self, vm: str, state: str) -> None:
        """Set `vm`'s power state ("poweredOn", "poweredOff", "suspended") without a task."""
        self._control("POST", "power", {"vm": vm, "state": state})

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A pyvmomi session (the appliance's own connection code, TLS unverified)."""
        settings = self.settings()
        with open_connection(settings, settings.password()) as connection:
            yield connection

    def make_vm(self, name: str, disk_sizes: Sequence[int], *, host: str = "DC0_H0", datastore: str = "LocalDS_0",
                cbt: bool = True) -> str:
        """Create powered-off VM `name` on `host` with one disk per size (bytes) and return its managed object id.

        Its disks are `[datastore] name/name.vmdk`, `name_1.vmdk`... on one SCSI controller,
        in order; with `cbt`, change tracking is enabled (active from the first snapshot or power-on).
        """
        with self.connection() as connection:
            content = connection.content
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
            try:
                target = next(h for h in view.view if h.name == host)
            finally:
                view.Destroy()
            datacenter = target.parent
            while not isinstance(datacenter, vim.Datacenter):
                datacenter = datacenter.parent
            controller = vim.vm.device.VirtualDeviceSpec(
                operation="add", device=vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0,
                                                                                sharedBus="noSharing"))
            devices = [controller]
            units = (unit for unit in range(16) if unit != 7)  # 7 is the controller's own
            for index, (size, unit) in enumerate(zip(disk_sizes, units)):
                backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=f"[{datastore}]",
                                                                        diskMode="persistent", thinProvisioned=True)
                disk = vim.vm.device.VirtualDisk(key=2000 + index, controllerKey=1000, unitNumber=unit,
                                                 capacityInBytes=size, capacityInKB=size // 1024, backing=backing)
                devices.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
            spec = vim.vm.ConfigSpec(name=name, guestId="otherGuest64", numCPUs=1, memoryMB=128,
                                     files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"),
                                     changeTrackingEnabled=cbt, deviceChange=devices)
            task = datacenter.vmFolder.CreateVM_Task(config=spec, pool=target.parent.resourcePool, host=target)
            vm = wait_for_task(task, f"create VM {name}", 30)
            return str(vm._moId)


@contextlib.contextmanager
def running_vcsim(root: Path) -> Iterator[Vcsim]:
    """A simulator whose files (password, certificate, log, datastores) live under `root`, stopped on exit;
    shared by the fixture and the benchmarks, which start one outside pytest."""
    binary = vcsim_binary()
    workdir = root / "work"
    workdir.mkdir()
    password = secrets.token_hex(12)
    password_file = root / "password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    certificate = root / "certificate.pem"
    with open(root / "vcsim.log", "w") as log:
        process = subprocess.Popen([str(binary), "-user", USER, "-certificate", str(certificate)],
                                   cwd=workdir, env={**os.environ, "VCSIM_PASSWORD": password, "TMPDIR": str(root)},
                                   stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        url = process.stdout.readline().strip() if ready else ""
        if not url.startswith("https://"):
            raise RuntimeError(f"vcsim did not start; see {root / 'vcsim.log'}")
        yield Vcsim(url, USER, password_file, certificate, workdir)
    finally:
        process.terminate()
        try:
            process.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.fixture
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    with running_vcsim(tmp_path_factory.mktemp("vcsim")) as simulator:
        yield simulator
