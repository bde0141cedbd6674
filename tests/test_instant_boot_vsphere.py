"""instant-boot, stop, migrate, recovery-group and discover end to end: the CLI, a live
`appliance serve` and its jobs, against vcsim (govmomi's vCenter simulator).

vcsim does not read NFS: the datastore it mounts is a folder of its working directory,
where each test stages the files ESXi would find in the session (`Vcsim.stage_session`).
What vSphere is asked to do, and what the appliance undoes on failure, is real.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyVmomi import vim

from appliance.vsphere import Connection, find_host, open_connection
from appliance.vsphere.client import named
from tests.conftest import run_cli
from tests.test_api import Api, start_api
from tests.test_nfs_serve import store  # noqa: F401  (the served-store fixture: vm1 backed up)
from tests.test_vsphere import set_guest
from tests.vcsim import Vcsim, vcsim  # noqa: F401  (the simulator fixture)

DATASTORE = "instant-recovery"
HOST = "DC0_C0_H0"
NETWORK = "VM Network"


def config_for(vcsim: Vcsim, path: Path, limits: str = "", scheduled_backups: bool = False,
               policies: str = "") -> Path:
    """The appliance's configuration with one connection to `vcsim` (scheduled backups off unless asked)."""
    path.write_text(f'''
[limits]
{limits}

[protection]
scheduled_backups = {"true" if scheduled_backups else "false"}
{policies}

[[vsphere.connections]]
name = "vc"
url = "{vcsim.url}"
user = "{vcsim.user}"
password_file = "{vcsim.password_file}"
verify_tls = false
nfs_server_address = "192.0.2.10"
host_addresses = {{ {", ".join(f'{host} = "{address}"' for host, address in vcsim.host_addresses().items())} }}
''')
    return path


@pytest.fixture
def appliance(store: Path, vcsim: Vcsim, tmp_path: Path) -> Iterator[Api]:  # noqa: F811
    running = start_api(store, "--config", str(config_for(vcsim, tmp_path / "appliance.toml")))
    yield running
    running.close()
    running.server.stop()


@pytest.fixture
def vsphere(vcsim: Vcsim) -> Iterator[Connection]:  # noqa: F811
    """The test's own look at vCenter."""
    settings = vcsim.settings()
    with open_connection(settings, settings.password()) as connection:
        yield connection


def cli(api: Api, *args: str, timeout: float = 120) -> Any:
    return run_cli("--store", str(api.server.store), *args, timeout=timeout)


def instant_boot(api: Api, vcsim: Vcsim, session: str, *extra: str) -> Any:  # noqa: F811
    vcsim.stage_session(DATASTORE, session, "vm1", session)
    return cli(api, "instant-boot", "--vm", "vm1", "--host", HOST, "--session", session, "--json", *extra)


def vm_named(connection: Connection, name: str) -> vim.VirtualMachine | None:
    return named(connection, vim.VirtualMachine, name)


def mounted(connection: Connection) -> bool:
    datastore = named(connection, vim.Datastore, DATASTORE)
    return datastore is not None and datastore in find_host(connection, HOST).datastore


def report_guest_once_registered(vcsim: Vcsim, name: str, **properties: str) -> threading.Thread:  # noqa: F811
    """What VMware Tools would report once the VM runs: set from a thread as the job waits."""

    def report() -> None:
        settings = vcsim.settings()
        with open_connection(settings, settings.password()) as connection:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                machine = vm_named(connection, name)
                if machine is not None and machine.runtime.powerState == "poweredOn":
                    set_guest(connection, machine, **properties)
                    return
                time.sleep(0.1)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    return thread


def steps(job: dict[str, Any]) -> list[tuple[str, str]]:
    return [(step["name"], step["verdict"]) for step in job["steps"]]


def test_instant_boot_verify_then_stop(appliance: Api, vcsim: Vcsim, vsphere: Connection) -> None:  # noqa: F811
    reporter = report_guest_once_registered(vcsim, "web-1", toolsRunningStatus="guestToolsRunning",
                                            ipAddress="10.1.2.3")
    result = instant_boot(appliance, vcsim, "web-1", "--network", NETWORK, "--verify", "tools", "--timeout", "30")
    reporter.join()
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "succeeded"
    assert steps(job) == [("create session", "ok"), ("mount datastore", "ok"), ("register VM", "ok"),
                          ("isolate network", "ok"), ("power on", "ok"), ("verify", "ok")]
    assert any("event=vm.powered_on" in line and "session=web-1" in line for line in job["log"])
    machine = vm_named(vsphere, "web-1")
    assert machine is not None and machine.runtime.powerState == "poweredOn" and mounted(vsphere)
    assert appliance.client.get("/sessions/web-1").status_code == 200
    [record] = appliance.client.get("/instant-boots").json()
    assert record["session"] == "web-1" and record["target"] == "vsphere" and record["state"] == "running"
    assert "VMware Tools running" in record["details"]["verified"]

    stopped = cli(appliance, "stop", "web-1")
    assert stopped.returncode == 0, stopped.stderr
    assert vm_named(vsphere, "web-1") is None and not mounted(vsphere)
    assert appliance.client.get("/sessions/web-1").status_code == 404
    assert "power off" in stopped.stderr and "unmount datastore unless used" in stopped.stderr
    scraped = httpx.get(f"http://127.0.0.1:{appliance.server.metrics_port}/metrics").text
    jobs = {(sample.labels["kind"], sample.labels["state"]): sample.value
            for family in text_string_to_metric_families(scraped) if family.name == "appliance_jobs"
            for sample in family.samples}
    assert jobs == {("instant-boot", "succeeded"): 1, ("stop", "succeeded"): 1}


@pytest.mark.parametrize(("extra", "failed_step"), [
    (("--host", "no-such-host"), "mount datastore"),
    (("--network", "no-such-network"), "isolate network"),
    (("--verify", "ip", "--timeout", "2"), "verify"),
])
def test_failure_at_a_step_undoes_everything_before_it(appliance: Api, vcsim: Vcsim,  # noqa: F811
                                                       vsphere: Connection, extra: tuple[str, ...],
                                                       failed_step: str) -> None:
    host = extra[1] if extra[0] == "--host" else HOST
    rest = extra[2:] if extra[0] == "--host" else extra
    vcsim.stage_session(DATASTORE, "web-1", "vm1", "web-1")
    result = cli(appliance, "instant-boot", "--vm", "vm1", "--host", host, "--session", "web-1", "--json", *rest)
    assert result.returncode == 1
    job = json.loads(result.stdout)
    assert job["state"] == "failed"
    done = steps(job)
    assert (failed_step, "failed") in done
    undone = [name for name, verdict in done if name.startswith("undo: ")]
    assert undone and all(verdict == "ok" for name, verdict in done if name.startswith("undo: "))
    assert undone[-1] == "undo: delete session web-1"
    assert vm_named(vsphere, "web-1") is None and not mounted(vsphere)
    assert appliance.client.get("/sessions/web-1").status_code == 404
    assert "appliance: error: job" in result.stderr


def test_keep_leaves_a_failed_boot_for_inspection(appliance: Api, vcsim: Vcsim, vsphere: Connection) -> None:  # noqa: F811
    result = instant_boot(appliance, vcsim, "web-1", "--verify", "ip", "--timeout", "1", "--keep")
    assert result.returncode == 1
    assert not any(name.startswith("undo: ") for name, _ in steps(json.loads(result.stdout)))
    assert vm_named(vsphere, "web-1") is not None and mounted(vsphere)
    assert appliance.client.get("/sessions/web-1").status_code == 200
    assert cli(appliance, "stop", "web-1").returncode == 0  # and an operator cleans up with stop
    assert vm_named(vsphere, "web-1") is None and not mounted(vsphere)


def test_two_sessions_share_one_datastore(appliance: Api, vcsim: Vcsim, vsphere: Connection) -> None:  # noqa: F811
    for session in ("web-1", "web-2"):
        result = instant_boot(appliance, vcsim, session)
        assert result.returncode == 0, result.stderr
    assert [ds.name for ds in find_host(vsphere, HOST).datastore].count(DATASTORE) == 1
    assert cli(appliance, "stop", "web-1").returncode == 0
    assert mounted(vsphere) and vm_named(vsphere, "web-2") is not None  # web-2 still runs from it
    assert cli(appliance, "stop", "web-2", "--commit").returncode == 0
    assert not mounted(vsphere)
    points = appliance.client.get("/vms/vm1/points").json()
    assert len(points) == 2  # the commit stored web-2's disks as a new point


def test_migrate_moves_the_vm_then_cleans_up(appliance: Api, vcsim: Vcsim, vsphere: Connection) -> None:  # noqa: F811
    assert instant_boot(appliance, vcsim, "web-1").returncode == 0
    result = cli(appliance, "migrate", "web-1", "--datastore", "LocalDS_0")
    assert result.returncode == 0, result.stderr
    machine = vm_named(vsphere, "web-1")
    assert machine is not None and [ds.name for ds in machine.datastore] == ["LocalDS_0"]
    assert machine.runtime.powerState == "poweredOn"  # it kept running
    assert appliance.client.get("/sessions/web-1").status_code == 404 and not mounted(vsphere)
    missing = cli(appliance, "migrate", "web-1", "--datastore", "LocalDS_0")
    assert missing.returncode == 1 and "unknown session" in missing.stderr


def test_limit_refuses_the_boot_past_the_maximum(store: Path, vcsim: Vcsim, tmp_path: Path) -> None:  # noqa: F811
    running = start_api(store, "--config", str(config_for(vcsim, tmp_path / "a.toml", "max_instant_boots = 1")))
    try:
        assert instant_boot(running, vcsim, "web-1").returncode == 0
        refused = instant_boot(running, vcsim, "web-2")
        assert refused.returncode == 75 and "limits.max_instant_boots is 1" in refused.stderr
        assert running.client.get("/sessions/web-2").status_code == 404
    finally:
        running.close()
        running.server.stop()


PLAN = '''
[group]
name = "shop"
host = "{host}"
network = "VM Network"

[[vms]]
name = "web"
after = ["app"]
verify = "none"

[[vms]]
name = "app"
after = ["db"]
verify = "{app_verify}"
timeout = 2

[[vms]]
name = "db"
verify = "none"
'''


def group_appliance(store: Path, tmp_path: Path, vcsim: Vcsim) -> Api:  # noqa: F811
    for vm in ("db", "app", "web"):
        image = tmp_path / f"{vm}.img"
        image.write_bytes(vm.encode() * 4096)
        assert run_cli("--store", str(store), "backup", "--vm", vm, str(image)).returncode == 0
        vcsim.stage_session(DATASTORE, f"shop-{vm}", vm, f"shop-{vm}")
    return start_api(store, "--config", str(config_for(vcsim, tmp_path / "appliance.toml")))


@pytest.mark.slow
def test_recovery_group_boots_in_dependency_order_and_tears_down(store: Path, vcsim: Vcsim,  # noqa: F811
                                                                 vsphere: Connection, tmp_path: Path) -> None:
    running = group_appliance(store, tmp_path, vcsim)
    try:
        plan = tmp_path / "shop.toml"
        plan.write_text(PLAN.format(host=HOST, app_verify="none"))
        table = cli(running, "recovery-group", "run", str(plan))
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0] == "recovery group shop: ok"
        assert [line.split()[0] for line in lines[2:]] == ["db", "app", "web"]
        assert all(vm_named(vsphere, f"shop-{vm}") is None for vm in ("db", "app", "web"))
        assert not any(s["name"].startswith("shop-") for s in running.client.get("/sessions").json())
        assert not mounted(vsphere)

        plan.write_text(PLAN.format(host=HOST, app_verify="ip"))
        failed = cli(running, "recovery-group", "run", str(plan), "--json")
        assert failed.returncode == 1
        report = json.loads(failed.stdout)["result"]
        assert [(vm["vm"], vm["verdict"]) for vm in report["vms"]] == [("db", "ok"), ("app", "failed"),
                                                                       ("web", "skipped")]
        assert "no guest IP address" in report["vms"][1]["reason"]
        assert all(vm_named(vsphere, f"shop-{vm}") is None for vm in ("db", "app", "web")) and not mounted(vsphere)
    finally:
        running.close()
        running.server.stop()


def test_discover_lists_unprotected_vms_first(store: Path, vcsim: Vcsim, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "vm0.img"
    image.write_bytes(b"\x01" * 65536)
    assert run_cli("--store", str(store), "backup", "--vm", "DC0_H0_VM0", str(image)).returncode == 0
    running = start_api(store, "--config", str(config_for(vcsim, tmp_path / "appliance.toml")))
    try:
        result = cli(running, "discover", "--json")
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        statuses = [row["status"] for row in rows]
        assert statuses == sorted(statuses, key=["unprotected", "stale", "protected"].index)
        assert rows[-1]["vm"] == "DC0_H0_VM0" and rows[-1]["status"] == "protected" and rows[-1]["age_hours"] < 1
        unprotected = [row for row in rows if row["status"] == "unprotected"]
        assert {row["vm"] for row in unprotected} >= {"DC0_H0_VM1", "DC0_C0_RP0_VM0"}
        assert all(row["policy"] == "default" for row in rows)
        table = cli(running, "discover")
        assert table.stdout.splitlines()[1].startswith("unprotected")
    finally:
        running.close()
        running.server.stop()


def test_a_running_job_shows_its_progress(appliance: Api, vcsim: Vcsim, vsphere: Connection) -> None:  # noqa: F811
    vcsim.stage_session(DATASTORE, "web-1", "vm1", "web-1")
    detached = cli(appliance, "instant-boot", "--vm", "vm1", "--host", HOST, "--session", "web-1", "--verify", "tools",
                   "--timeout", "60", "--detach")
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    deadline = time.monotonic() + 30
    while True:  # the VM is on and the job waits for its tools: the steps so far are visible
        job = appliance.client.get(f"/jobs/{job_id}").json()
        if steps(job) and steps(job)[-1] == ("verify", "running"):
            break
        assert time.monotonic() < deadline and job["state"] == "running", job
        time.sleep(0.1)
    assert job["state"] == "running" and ("power on", "ok") in steps(job)
    assert [j["id"] for j in appliance.client.get("/jobs").json()] == [job_id]
    report_guest_once_registered(vcsim, "web-1", toolsRunningStatus="guestToolsRunning").join()
    while job["finished"] is None:
        time.sleep(0.1)
        job = appliance.client.get(f"/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and steps(job)[-1] == ("verify", "ok")
    shown = cli(appliance, "jobs", "show", job_id)
    assert "state: succeeded" in shown.stdout and "event=job.finished" in shown.stdout


def test_an_expired_boot_is_stopped(appliance: Api, vcsim: Vcsim, vsphere: Connection) -> None:  # noqa: F811
    result = instant_boot(appliance, vcsim, "web-1", "--expires-hours", str(2 / 3600))
    assert result.returncode == 0, result.stderr
    assert vm_named(vsphere, "web-1") is not None
    deadline = time.monotonic() + 30
    while True:  # the expiry check runs every second and starts a stop job
        stop_jobs = [job for job in appliance.client.get("/jobs").json() if job["kind"] == "stop"]
        if stop_jobs and stop_jobs[0]["finished"] is not None:
            break
        assert time.monotonic() < deadline, "the expired session was not stopped"
        time.sleep(0.2)
    assert [job["params"] for job in stop_jobs] == [{"session": "web-1", "reason": "expired"}]
    assert stop_jobs[0]["state"] == "succeeded"
    assert appliance.client.get("/sessions/web-1").status_code == 404
    assert vm_named(vsphere, "web-1") is None and not mounted(vsphere)
