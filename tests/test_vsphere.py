"""appliance.vsphere against a live vcsim (govmomi's vCenter simulator, built by tests/vcsim).

Every step of an instant boot with its errors and undo: the connection (TLS, login),
the datastore mounted once and shared, unmount refused while used, registration with
a fresh identity, NICs moved, power, verification, Storage vMotion and discovery.
The guest is simulated the way vcsim allows: `SET.guest.*` extraConfig keys set the
guest properties (tools status, IP) that VMware Tools would report.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pyVmomi import vim, vmodl

from appliance.errors import (
    AlreadyExists,
    ConfigError,
    DatastoreConflict,
    DatastoreInUse,
    NotFound,
    VerificationFailed,
    VsphereError,
    VsphereTimeout,
    VsphereUnreachable,
)
from appliance.vsphere import (
    Connection,
    connect,
    datastore_users,
    disconnect,
    find_datastore,
    find_host,
    find_network,
    find_vm,
    from_mapping,
    inventory,
    mount_datastore,
    move_nics,
    nic_networks,
    open_connection,
    power_off,
    power_on,
    register_vm,
    relocate_vm,
    set_nic_networks,
    unmount_datastore,
    unregister_vm,
    verify_vm,
    vm_with_uuid,
)
from appliance.verification import Verification
from appliance.vsphere.client import wait_for_task
from appliance.vsphere.tags import vm_tags, with_tags
from tests.vcsim import NFS_SERVER, Vcsim, vcsim

__all__ = ["vcsim"]  # the fixture, imported for pytest

DATASTORE = "instant-recovery"
HOST = "DC0_C0_H0"
OTHER_HOST = "DC0_C0_H1"
ORIGINAL = "DC0_C0_RP0_VM0"  # a VM of vcsim's inventory, standing in for the backed-up original


@pytest.fixture
def connection(vcsim: Vcsim) -> Iterator[Connection]:
    vcsim.stage_session(DATASTORE, "s0", "web", "web-restore")  # makes the NAS folder exist
    settings = vcsim.settings()
    with open_connection(settings, settings.password()) as opened:
        yield opened


def boot(vcsim: Vcsim, connection: Connection, session: str, name: str, *, vm: str = "web",
         fresh_identity: bool = False) -> vim.VirtualMachine:
    """Mount and register a session's VM on HOST, the first two steps of an instant boot."""
    vcsim.stage_session(DATASTORE, session, vm, name)
    host = find_host(connection, HOST)
    mount_datastore(connection, host)
    return register_vm(connection, host, session, vm, name, fresh_identity=fresh_identity)


def reconfigure(machine: vim.VirtualMachine, spec: vim.vm.ConfigSpec) -> None:
    wait_for_task(machine.ReconfigVM_Task(spec), "test reconfigure", 10)


def set_guest(connection: Connection, machine: vim.VirtualMachine, **properties: str) -> None:
    """What VMware Tools in the guest would report, set the way vcsim takes it."""
    options = [vim.option.OptionValue(key=f"SET.guest.{key}", value=value) for key, value in properties.items()]
    reconfigure(machine, vim.vm.ConfigSpec(extraConfig=options))


def add_nic(connection: Connection, machine: vim.VirtualMachine, network: str) -> None:
    """A NIC as the backed-up .vmx would have had (vcsim ignores the .vmx it registers)."""
    nic = vim.vm.device.VirtualE1000(
        key=-1, backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=network, network=find_network(connection, network)))
    add = vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.add, device=nic)
    reconfigure(machine, vim.vm.ConfigSpec(deviceChange=[add]))


def mount_foreign(vcsim: Vcsim, host: vim.HostSystem, server: str, path: str, name: str = DATASTORE) -> None:
    """Another NFS server's datastore (by default under the appliance's datastore name)."""
    (vcsim.workdir / name).mkdir(exist_ok=True)
    spec = vim.host.NasVolume.Specification(remoteHost=server, remotePath=path, localPath=name,
                                            accessMode="readWrite", type="NFS")
    host.configManager.datastoreSystem.CreateNasDatastore(spec)


# --- settings ----------------------------------------------------------------------------

def test_settings_defaults_and_password_file(vcsim: Vcsim) -> None:
    settings = from_mapping({"url": vcsim.url, "user": "u", "password_file": str(vcsim.password_file),
                             "nfs_server": "nas-1.example.com"}, "appliance.toml")
    assert (settings.verify_tls, settings.ca_file, settings.datastore_name, settings.export_path,
            settings.timeout) == (True, None, "instant-recovery", "/", 60.0)
    assert settings.password().reveal() == vcsim.password_file.read_text().strip()
    assert "****" in repr(settings.password()) and settings.password().reveal() not in repr(settings)


def test_password_from_environment() -> None:
    settings = from_mapping({"url": "https://vc/sdk", "user": "u", "password_env": "VC_PASSWORD",
                             "nfs_server": "10.0.0.5"}, "appliance.toml")
    assert settings.password({"VC_PASSWORD": "s3cret"}).reveal() == "s3cret"
    with pytest.raises(ConfigError, match='key "vsphere.password_env": environment variable VC_PASSWORD is not set'):
        settings.password({})


@pytest.mark.parametrize(("change", "key", "reason"), [
    ({"password": "hunter2"}, "vsphere.password", "unknown key"),
    ({"url": "http://vc/sdk"}, "vsphere.url", "not an https:// URL"),
    ({"user": ""}, "vsphere.user", "must not be empty"),
    ({"password_env": None}, "vsphere.password_env", "give password_env"),
    ({"password_file": "{secret}"}, "vsphere.password_file", "not both"),
    ({"verify_tls": "no"}, "vsphere.verify_tls", "expected a boolean"),
    ({"nfs_server": "not a host!"}, "vsphere.nfs_server", "neither an IP address nor a host name"),
    ({"nfs_server": None}, "vsphere.nfs_server", "missing"),
    ({"datastore_name": "[bad]"}, "vsphere.datastore_name", "letters, digits"),
    ({"datastore_name": "x" * 43}, "vsphere.datastore_name", "1 to 42"),
    ({"export_path": "datastore"}, "vsphere.export_path", "absolute path"),
    ({"timeout": 0}, "vsphere.timeout", "greater than 0"),
    ({"ca_file": "ca.pem"}, "vsphere.ca_file", "not an absolute path"),
])
def test_settings_refusals_name_the_key(tmp_path: Path, change: dict[str, object], key: str, reason: str) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    table: dict[str, object] = {"url": "https://vc/sdk", "user": "u", "password_env": "P", "nfs_server": "10.0.0.5"}
    table.update(change)
    table = {name: str(secret) if value == "{secret}" else value for name, value in table.items() if value is not None}
    with pytest.raises(ConfigError, match=rf'^appliance.toml: key "{key}": .*{reason}'):
        from_mapping(table, "appliance.toml")


def test_password_file_readable_by_others_is_refused(vcsim: Vcsim) -> None:
    vcsim.password_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r'key "vsphere.password_file": .* has mode 0644'):
        vcsim.settings()


# --- connection --------------------------------------------------------------------------

def test_connect_and_find(connection: Connection) -> None:
    assert connection.content.about.apiVersion == "8.0.3.0"
    assert find_host(connection, HOST).name == HOST
    assert find_vm(connection, ORIGINAL).name == ORIGINAL
    assert isinstance(find_network(connection, "DC0_DVPG0"), vim.dvs.DistributedVirtualPortgroup)
    assert find_datastore(connection, "LocalDS_0").name == "LocalDS_0"


def test_vm_with_uuid(connection: Connection) -> None:
    original = find_vm(connection, ORIGINAL)
    assert vm_with_uuid(connection, original.config.uuid) == original
    assert vm_with_uuid(connection, "00000000-0000-4000-8000-000000000000") is None


@pytest.mark.parametrize(("finder", "what"), [
    (find_host, "ESXi host"), (find_vm, "VM"), (find_network, "network"), (find_datastore, "datastore"),
])
def test_unknown_names_are_not_found(connection: Connection, finder: object, what: str) -> None:
    with pytest.raises(NotFound, match=f"has no {what}.* named 'nope'"):
        finder(connection, "nope")  # type: ignore[operator]


def test_tls_verification_fails_on_self_signed_certificate(vcsim: Vcsim) -> None:
    settings = vcsim.settings(verify_tls=True)
    with pytest.raises(VsphereUnreachable, match="certificate not trusted.*ca_file"):
        connect(settings, settings.password())


def test_tls_verification_passes_with_its_ca(vcsim: Vcsim) -> None:
    settings = vcsim.settings(verify_tls=True, ca_file=str(vcsim.certificate))
    connection = connect(settings, settings.password())
    assert connection.content.about.apiVersion == "8.0.3.0"
    disconnect(connection)
    disconnect(connection)  # a second logout is harmless


def test_unreadable_ca_file(vcsim: Vcsim, tmp_path: Path) -> None:
    settings = vcsim.settings(verify_tls=True, ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(VsphereUnreachable, match="cannot read ca_file .*missing.pem: No such file"):
        connect(settings, settings.password())


def test_wrong_password_is_refused(vcsim: Vcsim, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    settings = vcsim.settings(password_file=str(wrong))
    with pytest.raises(VsphereUnreachable, match="login as 'appliance' refused"):
        connect(settings, settings.password())


def test_unreachable_url(vcsim: Vcsim) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    settings = vcsim.settings(url=f"https://127.0.0.1:{port}/sdk", timeout=5)
    with pytest.raises(VsphereUnreachable, match=f"127.0.0.1:{port}/sdk: cannot connect"):
        connect(settings, settings.password())


def test_url_without_sdk_path_means_the_sdk(vcsim: Vcsim) -> None:
    settings = vcsim.settings(url=vcsim.url.removesuffix("sdk"))
    with open_connection(settings, settings.password()) as connection:
        assert find_host(connection, HOST).name == HOST


def test_url_that_is_no_vsphere_api(vcsim: Vcsim) -> None:
    settings = vcsim.settings(url=vcsim.url.replace("/sdk", "/nothing-here"))
    with pytest.raises(VsphereUnreachable, match="/nothing-here: no vSphere API there"):
        connect(settings, settings.password())


# --- tasks -------------------------------------------------------------------------------

def running_task(connection: Connection) -> vim.Task:
    """A task that runs until told otherwise (vcsim's own tasks finish before they are returned)."""
    info = connection.content.taskManager.CreateTask(obj=find_host(connection, HOST), taskTypeId="test.slow",
                                                     cancelable=False)
    return info.task


def test_task_timeout(connection: Connection) -> None:
    task = running_task(connection)
    started = time.monotonic()
    with pytest.raises(VsphereTimeout, match=r"slow step: not done after 0.5 s \(task .* may still finish\)"):
        wait_for_task(task, "slow step", 0.5)
    assert 0.5 <= time.monotonic() - started < 3


def test_task_fault_and_result(connection: Connection) -> None:
    task = running_task(connection)
    task.SetTaskState(state="error", fault=vmodl.MethodFault(msg="disk full"))
    with pytest.raises(VsphereError, match="^failing step: disk full$"):
        wait_for_task(task, "failing step", 5)
    task = running_task(connection)
    task.SetTaskState(state="success", result="done")
    assert wait_for_task(task, "step", 5) == "done"


# --- datastore ---------------------------------------------------------------------------

def test_mount_twice_is_one_datastore(connection: Connection) -> None:
    host = find_host(connection, HOST)
    first = mount_datastore(connection, host)
    second = mount_datastore(connection, host)
    assert first == second
    assert (first.name, first.info.nas.remoteHost, first.info.nas.remotePath) == (DATASTORE, NFS_SERVER, "/datastore")
    assert [ds.name for ds in host.datastore].count(DATASTORE) == 1


def test_same_datastore_on_every_host(connection: Connection) -> None:
    host, other = find_host(connection, HOST), find_host(connection, OTHER_HOST)
    assert mount_datastore(connection, host) == mount_datastore(connection, other)
    assert unmount_datastore(connection, host) is True
    assert DATASTORE not in [ds.name for ds in host.datastore]
    assert DATASTORE in [ds.name for ds in other.datastore]
    assert unmount_datastore(connection, other) is True
    with pytest.raises(NotFound):
        find_datastore(connection, DATASTORE)


def test_unmount_when_not_mounted(connection: Connection) -> None:
    assert unmount_datastore(connection, find_host(connection, HOST)) is False


@pytest.mark.parametrize(("server", "path"), [("198.51.100.7", "/datastore"), (NFS_SERVER, "/other")])
def test_name_taken_by_another_export(vcsim: Vcsim, connection: Connection, server: str, path: str) -> None:
    host, other = find_host(connection, HOST), find_host(connection, OTHER_HOST)
    mount_foreign(vcsim, other, server, path)
    for on in (host, other):
        with pytest.raises(DatastoreConflict, match=f"is {server}:{path}, not this appliance's {NFS_SERVER}:/datastore"):
            mount_datastore(connection, on)
    with pytest.raises(DatastoreConflict):
        unmount_datastore(connection, other)
    assert DATASTORE in [ds.name for ds in other.datastore]


def test_name_taken_by_a_local_datastore(vcsim: Vcsim) -> None:
    settings = vcsim.settings(datastore_name="LocalDS_0")
    with open_connection(settings, settings.password()) as connection:
        with pytest.raises(DatastoreConflict, match="'LocalDS_0' exists and is not an NFS datastore"):
            mount_datastore(connection, find_host(connection, HOST))


def test_unmount_refused_while_used_then_allowed(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    host, other = find_host(connection, HOST), find_host(connection, OTHER_HOST)
    mount_datastore(connection, other)
    with pytest.raises(DatastoreInUse, match=f"'{DATASTORE}' stays mounted on host {HOST}: used by VM web-restore"):
        unmount_datastore(connection, host)
    assert unmount_datastore(connection, other) is True  # no VM on that host uses it
    assert unregister_vm(connection, machine) is True
    assert unmount_datastore(connection, host) is True
    assert DATASTORE not in [ds.name for ds in host.datastore]


def test_two_sessions_share_one_datastore(vcsim: Vcsim, connection: Connection) -> None:
    first = boot(vcsim, connection, "s1", "web-restore")
    second = boot(vcsim, connection, "s2", "db-restore", vm="db")
    assert first.datastore == second.datastore
    datastore = find_datastore(connection, DATASTORE)
    assert sorted(datastore_users(connection, datastore)) == ["db-restore", "web-restore"]
    host = find_host(connection, HOST)
    with pytest.raises(DatastoreInUse, match="used by VMs db-restore, web-restore"):
        unmount_datastore(connection, host)
    unregister_vm(connection, first)
    with pytest.raises(DatastoreInUse, match="used by VM db-restore$"):
        unmount_datastore(connection, host)
    unregister_vm(connection, second)
    assert unmount_datastore(connection, host) is True


# --- registration ------------------------------------------------------------------------

def test_register_in_datacenter_folder_and_host_pool(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    host = find_host(connection, HOST)
    assert machine.name == "web-restore"
    assert machine.config.files.vmPathName == f"[{DATASTORE}] sessions/s1/web.vmx"
    assert machine.runtime.host == host
    assert machine.resourcePool == host.parent.resourcePool
    assert machine.parent.name == "vm"
    assert [ds.name for ds in machine.datastore] == [DATASTORE]
    again = register_vm(connection, host, "s1", "web", "web-restore", fresh_identity=False)
    assert again == machine


def test_register_refuses_a_taken_name(vcsim: Vcsim, connection: Connection) -> None:
    boot(vcsim, connection, "s1", "web-restore")
    vcsim.stage_session(DATASTORE, "s2", "web", ORIGINAL)
    host = find_host(connection, HOST)
    with pytest.raises(AlreadyExists, match=f"already has a VM named '{ORIGINAL}'"):
        register_vm(connection, host, "s2", "web", ORIGINAL, fresh_identity=True)
    with pytest.raises(AlreadyExists, match="already registered as VM 'web-restore'"):
        register_vm(connection, host, "s1", "web", "other-name", fresh_identity=False)


def test_register_needs_the_datastore_mounted(vcsim: Vcsim, connection: Connection) -> None:
    boot(vcsim, connection, "s1", "web-restore")
    vcsim.stage_session(DATASTORE, "s2", "web", "web-2")
    with pytest.raises(VsphereError, match=f"datastore '{DATASTORE}' is not mounted on the host"):
        register_vm(connection, find_host(connection, OTHER_HOST), "s2", "web", "web-2", fresh_identity=False)


def test_register_without_vmx_fails_cleanly(vcsim: Vcsim, connection: Connection) -> None:
    host = find_host(connection, HOST)
    mount_datastore(connection, host)
    with pytest.raises(VsphereError, match=r"register \[instant-recovery\] sessions/none/web.vmx as VM 'x'"):
        register_vm(connection, host, "none", "web", "x", fresh_identity=False)
    with pytest.raises(NotFound):
        find_vm(connection, "x")


def test_fresh_identity_when_the_original_exists(vcsim: Vcsim, connection: Connection) -> None:
    original = find_vm(connection, ORIGINAL)
    plain = boot(vcsim, connection, "s1", "web-plain")
    fresh = boot(vcsim, connection, "s2", "web-fresh", fresh_identity=True)
    identities = {(vm.config.uuid, vm.config.instanceUuid) for vm in (original, plain, fresh)}
    assert len(identities) == 3
    assert len({uuid for pair in identities for uuid in pair}) == 6
    options = {option.key: option.value for option in fresh.config.extraConfig}
    assert options["uuid.action"] == "create"
    assert "uuid.action" not in {option.key for option in plain.config.extraConfig}
    uuids = (fresh.config.uuid, fresh.config.instanceUuid)
    register_vm(connection, find_host(connection, HOST), "s2", "web", "web-fresh", fresh_identity=True)
    assert (fresh.config.uuid, fresh.config.instanceUuid) == uuids  # a retry keeps the identity


def test_unregister_is_idempotent_and_refuses_a_running_vm(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    power_on(connection, machine)
    with pytest.raises(VsphereError, match="unregister VM 'web-restore': it is poweredOn; power it off first"):
        unregister_vm(connection, machine)
    power_off(connection, machine)
    assert unregister_vm(connection, machine) is True
    assert unregister_vm(connection, machine) is False
    with pytest.raises(NotFound):
        find_vm(connection, "web-restore")
    assert (vcsim.workdir / DATASTORE / "sessions" / "s1" / "web.vmx").exists()


# --- network, power ----------------------------------------------------------------------

@pytest.mark.parametrize("isolated", ["DC0_DVPG0", "isolated"])
def test_nics_moved_and_moved_back(vcsim: Vcsim, connection: Connection, isolated: str) -> None:
    host = find_host(connection, HOST)
    if isolated == "isolated":
        host.configManager.networkSystem.AddPortGroup(vim.host.PortGroup.Specification(
            name="isolated", vlanId=4001, vswitchName="vSwitch0", policy=vim.host.NetworkPolicy()))
    machine = boot(vcsim, connection, "s1", "web-restore")
    add_nic(connection, machine, "VM Network")
    add_nic(connection, machine, "VM Network")
    before = nic_networks(connection, machine)
    assert sorted(before.values()) == ["VM Network", "VM Network"]
    previous = move_nics(connection, machine, isolated)
    assert previous == before
    assert list(nic_networks(connection, machine).values()) == [isolated, isolated]
    set_nic_networks(connection, machine, previous)
    assert nic_networks(connection, machine) == before


def test_move_nics_errors(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    add_nic(connection, machine, "VM Network")
    with pytest.raises(NotFound, match="no network .* named 'nowhere'"):
        move_nics(connection, machine, "nowhere")
    with pytest.raises(NotFound, match=r"no NIC with device key 9 \(it has: \d+\)"):
        set_nic_networks(connection, machine, {9: "VM Network"})
    assert list(nic_networks(connection, machine).values()) == ["VM Network"]


def test_power_on_and_off_are_idempotent(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    assert power_on(connection, machine) is True
    assert machine.runtime.powerState == "poweredOn"
    assert power_on(connection, machine) is False
    assert power_off(connection, machine) is True
    assert machine.runtime.powerState == "poweredOff"
    assert power_off(connection, machine) is False


# --- verification ------------------------------------------------------------------------

def test_verify_tools_and_ip(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    power_on(connection, machine)
    set_guest(connection, machine, toolsRunningStatus="guestToolsRunning", ipAddress="10.9.8.7")
    assert verify_vm(connection, machine, Verification("tools"), timeout=5) == "VMware Tools running"
    assert verify_vm(connection, machine, Verification("ip"), timeout=5) == "guest IP 10.9.8.7"


@pytest.mark.parametrize(("check", "message"), [
    (Verification("tools"), "VMware Tools not running after 1.5 s"),
    (Verification("ip"), "no guest IP address after 1.5 s"),
    (Verification("script", "true"), "no guest IP address after 1.5 s"),
])
def test_verify_times_out(vcsim: Vcsim, connection: Connection, check: Verification, message: str) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    power_on(connection, machine)
    started = time.monotonic()
    with pytest.raises(VerificationFailed, match=f"VM 'web-restore': {message}"):
        verify_vm(connection, machine, check, timeout=1.5)
    assert 1.5 <= time.monotonic() - started < 4


def test_verify_script_passes_with_name_and_ip(vcsim: Vcsim, connection: Connection, tmp_path: Path) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    set_guest(connection, machine, ipAddress="10.9.8.7")
    seen = tmp_path / "seen"
    result = verify_vm(connection, machine, Verification("script", f'echo "$APPLIANCE_VM $APPLIANCE_VM_IP" > {seen}'),
                       timeout=5)
    assert result == "script passed (10.9.8.7)"
    assert seen.read_text() == "web-restore 10.9.8.7\n"


def test_verify_script_fails(vcsim: Vcsim, connection: Connection, tmp_path: Path) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    set_guest(connection, machine, ipAddress="10.9.8.7")
    runs = tmp_path / "runs"
    started = time.monotonic()
    with pytest.raises(VerificationFailed, match=r"exited 3 after 2 run\(s\) in 3 s: no answer from 10.9.8.7\nport 80$"):
        verify_vm(connection, machine, Verification(
            "script", f'echo run >> {runs}; echo "no answer from $APPLIANCE_VM_IP"; echo port 80 >&2; exit 3'), timeout=4)
    assert runs.read_text() == "run\nrun\n"  # retried every 3 s until the timeout
    assert time.monotonic() - started < 6


def test_verify_script_timeout_kills_what_it_started(vcsim: Vcsim, connection: Connection, tmp_path: Path) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    set_guest(connection, machine, ipAddress="10.9.8.7")
    late = tmp_path / "late"
    started = time.monotonic()
    with pytest.raises(VerificationFailed, match="was killed at the timeout"):
        verify_vm(connection, machine, Verification("script", f"(sleep 2; touch {late}) & wait"), timeout=1)
    assert time.monotonic() - started < 1.9
    time.sleep(1.5)
    assert not late.exists()


# --- Storage vMotion ---------------------------------------------------------------------

def test_relocate_then_unmount(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    power_on(connection, machine)
    relocate_vm(connection, machine, "LocalDS_0", timeout=30)
    assert [ds.name for ds in machine.datastore] == ["LocalDS_0"]
    relocate_vm(connection, machine, "LocalDS_0", timeout=30)  # already there
    assert unmount_datastore(connection, find_host(connection, HOST)) is True
    assert machine.runtime.powerState == "poweredOn"


def test_relocate_errors(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore")
    with pytest.raises(NotFound, match="no datastore named 'production'"):
        relocate_vm(connection, machine, "production", timeout=30)
    mount_foreign(vcsim, find_host(connection, OTHER_HOST), "198.51.100.7", "/prod", name="production")
    with pytest.raises(VsphereError, match=f"to datastore 'production': the datastore is not mounted on host {HOST}"):
        relocate_vm(connection, machine, "production", timeout=30)
    assert [ds.name for ds in machine.datastore] == [DATASTORE]


# --- discovery ---------------------------------------------------------------------------

def test_inventory_lists_every_vm(vcsim: Vcsim, connection: Connection) -> None:
    machine = boot(vcsim, connection, "s1", "web-restore", fresh_identity=True)
    power_on(connection, machine)
    found = {info.name: info for info in inventory(connection)}
    assert sorted(found) == sorted(["DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "web-restore"])
    restored = found["web-restore"]
    assert (restored.uuid, restored.instance_uuid) == (machine.config.uuid, machine.config.instanceUuid)
    assert (restored.power_state, restored.host, restored.datastores, restored.template) == (
        "poweredOn", HOST, (DATASTORE,), False)
    original = found[ORIGINAL]
    assert original.uuid == find_vm(connection, ORIGINAL).config.uuid
    assert original.datastores == ("LocalDS_0",)
    assert original.host.startswith("DC0_C0_H")


def test_inventory_names_each_vms_folder(vcsim: Vcsim, connection: Connection) -> None:
    vm_folder = find_vm(connection, "DC0_H0_VM1").parent
    prod = vm_folder.CreateFolder("prod")
    nested = prod.CreateFolder("db/replicas")  # a "/" in a name is shown as %2f, as vSphere paths write it
    wait_for_task(nested.MoveIntoFolder_Task([find_vm(connection, "DC0_H0_VM1")]), "move", 30)
    found = {info.name: info.folder for info in inventory(connection)}
    assert found["DC0_H0_VM0"] == "/DC0/vm"
    assert found["DC0_H0_VM1"] == "/DC0/vm/prod/db%2freplicas"


def test_tags_of_vms_come_from_the_vapi_service(vcsim: Vcsim, connection: Connection) -> None:
    settings = vcsim.settings()
    assert vm_tags(settings, settings.password()) == {}
    machines = {info.name: info for info in inventory(connection)}
    base = vcsim.url.removesuffix("/sdk") + "/rest/com/vmware/cis"
    with httpx.Client(base_url=base, verify=False) as admin:  # tags made as an administrator would, over REST
        session = admin.post("/session", auth=(vcsim.user, settings.password().reveal())).json()["value"]
        admin.headers["vmware-api-session-id"] = session

        def create(path: str, spec: dict[str, object]) -> str:
            return str(admin.post(path, json={"create_spec": spec}).json()["value"])

        backup = create("/tagging/category", {"name": "Backup", "cardinality": "SINGLE", "associable_types": [],
                                               "description": ""})
        tier = create("/tagging/category", {"name": "Tier", "cardinality": "SINGLE", "associable_types": [],
                                             "description": ""})
        gold = create("/tagging/tag", {"name": "Gold", "category_id": backup, "description": ""})
        create("/tagging/tag", {"name": "Unused", "category_id": backup, "description": ""})
        web = create("/tagging/tag", {"name": "web", "category_id": tier, "description": ""})
        for tag, vm in ((gold, "DC0_H0_VM0"), (gold, "DC0_C0_RP0_VM1"), (web, "DC0_H0_VM0")):
            attached = admin.post(f"/tagging/tag-association/id:{tag}?~action=attach",
                                  json={"object_id": {"id": machines[vm].moid, "type": "VirtualMachine"}})
            assert attached.status_code == 200, attached.text
    found = vm_tags(settings, settings.password())
    tagged = {info.name: info.tags for info in with_tags(list(machines.values()), found)}
    assert tagged == {"DC0_H0_VM0": ("Backup:Gold", "Tier:web"), "DC0_H0_VM1": (), "DC0_C0_RP0_VM0": (),
                      "DC0_C0_RP0_VM1": ("Backup:Gold",)}
