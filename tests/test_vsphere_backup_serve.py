"""vSphere backups run by a serving appliance: jobs through the CLI and API, shutdown and crashes mid-backup,
and the scheduler's fail-safe default policy, against vcsim with our additions.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.demo.guest_image import BOOTED_MARKER, build_guest
from appliance.hypervisor.netns import private_network
from appliance.vsphere.client import Session, find_vm
from tests.conftest import run_cli
from tests.test_api import Api, start_api
from tests.test_instant_boot_qemu import BOOT_ARGS, RUNS_UNTIL_STOPPED, power_off_leftovers
from tests.test_instant_boot_vsphere import cli, config_for
from tests.test_qemu_boot import BOOT_TIMEOUT
from tests.test_vsphere_backup import Disks, point_disks_of_store, session, snapshots_of  # noqa: F401
from tests.vcsim import Vcsim, vcsim  # noqa: F401

MIB = 1 << 20
VM = "web"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    run_cli("--store", str(path), "init", "--chunk-size", str(1 << 16), check=True)
    return path


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def job(api: Api, job_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = api.client.get(f"/jobs/{job_id}").json()
    return answer


def slow_vm(vcsim: Vcsim) -> Disks:  # noqa: F811
    """A VM whose backup takes seconds: 32 MiB written, every second /folder request answered 503."""
    vcsim.make_vm(VM, (32 * MIB,))
    disks = Disks(vcsim, VM, (32 * MIB,))
    disks.write(0, 0, 32 * MIB)
    return disks


def test_a_backup_job_through_the_cli_and_its_metrics(store_path: Path, vcsim: Vcsim, tmp_path: Path,  # noqa: F811
                                                      session: Session) -> None:
    vcsim.make_vm(VM, (4 * MIB,))
    disks = Disks(vcsim, VM, (4 * MIB,))
    disks.write(0, MIB, MIB)
    api = start_api(store_path, "--config", str(config_for(vcsim, tmp_path / "a.toml")))
    try:
        done = cli(api, "backup", "--from-vsphere", VM, "--json")
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["kind"] == "backup" and record["state"] == "succeeded"
        assert [step["name"] for step in record["steps"]] == [
            "check", "sweep", "snapshot", "disks", "changed-areas", "ingest"]
        point = record["result"]["point"]
        listed = cli(api, "backup-jobs", "list")
        assert listed.returncode == 0 and record["id"] in listed.stdout and point in listed.stdout
        again = cli(api, "backup", "--from-vsphere", VM, "--config", str(tmp_path / "a.toml"))
        assert again.returncode != 0 and "drop --config" in again.stderr
        metrics = httpx.get(f"http://127.0.0.1:{api.server.metrics_port}/metrics").text
        assert 'appliance_backups_total{result="succeeded"} 1.0' in metrics
        assert 'appliance_vm_newest_point_age_seconds{vm="web"}' in metrics
        assert 'appliance_backup_bytes_total{kind="read"}' in metrics
    finally:
        api.close()
        assert api.server.stop() == 0
    assert point_disks_of_store(store_path, point) == disks.snapshot()
    assert snapshots_of(session) == []


def test_sigterm_mid_backup_removes_the_snapshot_before_exit(store_path: Path, vcsim: Vcsim,  # noqa: F811
                                                            tmp_path: Path, session: Session) -> None:
    slow_vm(vcsim)
    api = start_api(store_path, "--config", str(config_for(vcsim, tmp_path / "a.toml")))
    try:
        vcsim.switch("periodic_503", 2)
        started = api.client.post("/backups", json={"vm": VM, "streams": 1}).json()
        wait_for("the ingest step", lambda: any(s["name"] == "ingest" for s in job(api, started["id"])["steps"]))
        assert snapshots_of(session) != []
    finally:
        api.close()
        assert api.server.stop() == 0
    assert snapshots_of(session) == []
    assert list((store_path / "backup-intents").iterdir()) == []
    record = json.loads((store_path / "jobs" / f"{started['id']}.json").read_text())
    assert record["state"] == "cancelled"
    assert run_cli("--store", str(store_path), "points", "--json", check=True).stdout.strip() == "[]"


def test_a_backup_killed_mid_way_leaves_a_snapshot_the_next_start_removes(
        store_path: Path, vcsim: Vcsim, tmp_path: Path, session: Session) -> None:  # noqa: F811
    slow_vm(vcsim)
    settings = config_for(vcsim, tmp_path / "a.toml")
    api = start_api(store_path, "--config", str(settings))
    vcsim.switch("periodic_503", 2)
    started = api.client.post("/backups", json={"vm": VM, "streams": 1}).json()
    wait_for("the ingest step", lambda: any(s["name"] == "ingest" for s in job(api, started["id"])["steps"]))
    api.close()
    assert api.server.process is not None
    api.server.process.send_signal(signal.SIGKILL)
    api.server.process.wait(timeout=30)
    left = snapshots_of(session)
    assert len(left) == 1 and left[0].endswith(started["id"])
    assert [p.name for p in (store_path / "backup-intents").iterdir()] == [f"{started['id']}.json"]
    vcsim.clear_switch("periodic_503")

    restarted = time.time()
    api = start_api(store_path, "--config", str(settings))
    try:
        reconcile = wait_for("the reconcile job", lambda: [j for j in api.client.get("/jobs").json()
                                                          if j["kind"] == "backup-reconcile"
                                                          and j["created"] >= restarted
                                                          and j["state"] == "succeeded"])
        assert reconcile[0]["result"]["removed"] == {VM: left}
        assert snapshots_of(session) == []
        assert list((store_path / "backup-intents").iterdir()) == []
        assert job(api, started["id"])["state"] == "interrupted"
    finally:
        api.close()
        assert api.server.stop() == 0


def test_the_default_policy_backs_up_a_vm_no_policy_names(store_path: Path, vcsim: Vcsim,  # noqa: F811
                                                          tmp_path: Path, session: Session) -> None:
    vcsim.make_vm(VM, (2 * MIB,))
    disks = Disks(vcsim, VM, (2 * MIB,))
    disks.write(0, 0, MIB)
    policies = '''
[[policies]]
name = "others"
vms = ["DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"]
every_hours = 24
keep_last = 1
window = "00:00-00:01"
'''  # the simulator's own VMs: never due in a test, so only the unprotected VM is backed up
    api = start_api(store_path, "--config", str(config_for(vcsim, tmp_path / "a.toml", scheduled_backups=True, policies=policies)))
    try:
        backups = wait_for("a scheduled backup of web", lambda: [
            j for j in api.client.get("/backups").json() if j["params"]["vm"] == VM and j["state"] == "succeeded"],
            timeout=120)
        assert backups[0]["params"]["reason"].startswith("policy default")
        assert [j["params"]["vm"] for j in api.client.get("/backups").json()] == [VM]
        report = {row["vm"]: row for row in api.client.get("/discover").json()}
        assert report[VM]["policy"] == "default" and report[VM]["status"] == "protected"
        point = backups[0]["result"]["point"]
    finally:
        api.close()
        assert api.server.stop() == 0
    assert point_disks_of_store(store_path, point) == disks.snapshot()
    assert find_vm(session.connection, VM).config.changeTrackingEnabled


@pytest.mark.slow
def test_a_point_taken_from_vsphere_boots_instantly(store_path: Path, vcsim: Vcsim, tmp_path: Path) -> None:  # noqa: F811
    """The guest disk written into a vSphere VM, backed up from vCenter, booted by QEMU from the point."""
    image = build_guest().copy_disk(tmp_path / "guest.img", RUNS_UNTIL_STOPPED)
    vcsim.make_vm("guest", (image.stat().st_size,))
    with image.open("rb") as data:
        vcsim.guest_write("guest", 0, 0, data)
    settings = config_for(vcsim, tmp_path / "a.toml")
    backed_up = run_cli("--store", str(store_path), "backup", "--from-vsphere", "guest", "--config", str(settings),
                        "--json")
    assert backed_up.returncode == 0, backed_up.stderr
    point = json.loads(backed_up.stdout)["point"]
    assert point_disks_of_store(store_path, point) == [image.read_bytes()]

    with private_network():
        api = start_api(store_path, portmap=True)
        try:
            booted = cli(api, "instant-boot", "--vm", "guest", "--session", "g1", *BOOT_ARGS, "--verify",
                         f"console:{BOOTED_MARKER}", "--timeout", "120", timeout=BOOT_TIMEOUT)
            assert booted.returncode == 0, booted.stdout + booted.stderr
            assert cli(api, "stop", "g1").returncode == 0
        finally:
            power_off_leftovers(api)
            api.close()
            assert api.server.stop() == 0
