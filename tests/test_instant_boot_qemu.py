"""instant-boot --qemu, migrate --to-path, stop and a QEMU recovery group end to end:
the CLI, a live `appliance serve` (NFS, portmapper, HTTP API, jobs) and a real guest
booted by QEMU from its disk's own bootloader, read over nfs:// from the store.

This is the product path `tests/test_qemu_boot.py` tests piece by piece, and the twin
of `tests/test_instant_boot_vsphere.py`. serve, QEMU and every CLI process run in a
private network namespace (appliance/hypervisor/netns.py), where serve answers as the portmapper on
port 111 that QEMU's nfs:// driver asks.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.hypervisor import QemuGuest, session_disk_url
from tests.conftest import sha256_of
from appliance.demo.guest_image import BOOTED_MARKER, DONE_MARKER, POWER_BUTTON_MARKER, GuestImage, build_guest, guest_file
from appliance.hypervisor.netns import private_network
from tests.test_api import Api, start_api
from tests.test_instant_boot_vsphere import cli, steps
from tests.test_qemu_boot import BOOT_TIMEOUT, MEMORY_MIB, backed_up, exported_disk, restored_disk

VM = "guest"
RUNS_UNTIL_STOPPED = 600  # seconds: the guest runs until powered off
MIGRATE_RUN_SECONDS = 20
BOOT_ARGS = ("--qemu", "--memory", str(MEMORY_MIB), "--json")


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return build_guest()


def guest_of(api: Api, session: str) -> QemuGuest:
    """The QEMU guest the appliance booted for `session` (its run directory outlives the session)."""
    return QemuGuest.load(api.server.store / "guests" / session)


def power_off_leftovers(api: Api) -> None:
    """Teardown safety net: no guest of a failed test keeps running (the tests assert it themselves)."""
    for run_dir in (api.server.store / "guests").glob("*"):
        with contextlib.suppress(Exception):
            QemuGuest.load(run_dir).power_off(timeout=1)


@pytest.fixture
def serving(guest_image: GuestImage, tmp_path: Path) -> Iterator[Callable[..., tuple[Api, str]]]:
    """Starts `serve` (with the portmapper) over a store holding the guest disk under `vms`.

    The guest runs `seconds` before powering itself off; returns the API and the disk's sha256.
    """
    with contextlib.ExitStack() as stack:

        def start(seconds: int, vms: tuple[str, ...] = (VM,)) -> tuple[Api, str]:
            disk = guest_image.copy_disk(tmp_path / "guest.img", seconds)
            store = backed_up(tmp_path, disk, vms)
            stack.enter_context(private_network())
            api = start_api(store, portmap=True)
            stack.callback(lambda: api.server.stop() == 0 or pytest.fail(f"serve failed: {api.server.log_text()}"))
            stack.callback(api.close)
            stack.callback(power_off_leftovers, api)
            return api, sha256_of(disk)

        yield start


def instant_boot(api: Api, session: str, *extra: str) -> tuple[int, dict[str, Any]]:
    result = cli(api, "instant-boot", "--vm", VM, "--session", session, *BOOT_ARGS, *extra, timeout=BOOT_TIMEOUT)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.slow
def test_instant_boot_runs_the_guest_from_its_backup_until_stop(serving: Callable[..., tuple[Api, str]],
                                                                tmp_path: Path) -> None:
    api, original = serving(RUNS_UNTIL_STOPPED)
    code, job = instant_boot(api, "g1", "--verify", f"console:{BOOTED_MARKER}", "--timeout", "120")
    assert code == 0, job
    assert job["state"] == "succeeded"
    assert steps(job) == [("create session", "ok"), ("power on", "ok"), ("verify", "ok")]
    assert job["result"]["disks"] == [session_disk_url("127.0.0.1", "g1", VM)]
    guest = guest_of(api, "g1")
    assert guest.is_running() and guest.record.disks == job["result"]["disks"]
    assert "-kernel" not in guest.record.command  # booted by the disk's own bootloader
    assert "SYSLINUX" in guest.console_text()
    [record] = api.client.get("/instant-boots").json()
    assert (record["session"], record["target"], record["state"]) == ("g1", "qemu", "running")

    session_disk = exported_disk(api.server.store, tmp_path, "session.img", session="g1")
    started = guest_file(session_disk, "/guest/started")
    assert started is not None and started.startswith("booted ")
    point_disk = restored_disk(api.server.store, tmp_path, VM)
    assert guest_file(point_disk, "/guest/started") is None
    assert sha256_of(point_disk) == original

    stopped = cli(api, "stop", "g1", "--json")
    assert stopped.returncode == 0, stopped.stderr
    stop_job = json.loads(stopped.stdout)
    assert [(s["name"], s["verdict"], s["detail"]) for s in stop_job["steps"]] == [
        ("power off", "ok", "powerdown"), ("delete session", "ok", "")]
    assert not guest.is_running()
    assert POWER_BUTTON_MARKER in guest.console_text()  # the guest shut down on the ACPI button
    assert api.client.get("/sessions/g1").status_code == 404
    assert api.client.get("/instant-boots").json() == []


@pytest.mark.slow
def test_migrate_moves_the_running_guest_to_local_disks(serving: Callable[..., tuple[Api, str]],
                                                        tmp_path: Path) -> None:
    api, original = serving(MIGRATE_RUN_SECONDS)
    code, job = instant_boot(api, "g2", "--verify", "console:APPLIANCE-GUEST: progress 2", "--timeout", "120")
    assert code == 0, job
    guest = guest_of(api, "g2")
    migrated = cli(api, "migrate", "g2", "--to-path", str(tmp_path / "production"), "--json")
    assert migrated.returncode == 0, migrated.stderr
    assert DONE_MARKER not in guest.console_text(), "the guest finished before the migration did"
    migrate_job = json.loads(migrated.stdout)
    assert steps(migrate_job) == [("migrate", "ok"), ("delete session", "ok")]
    local = tmp_path / "production" / "g2" / f"{VM}.raw"
    assert migrate_job["result"]["disks"] == [str(local)]
    assert api.client.get("/sessions/g2").status_code == 404  # gone while the guest still runs
    assert guest.is_running() and QemuGuest.load(guest.run_dir).record.disks == [str(local)]

    guest.wait_for_console(DONE_MARKER, BOOT_TIMEOUT)
    guest.wait_exit(60)
    assert guest_file(local, "/guest/finished") == f"finished after {MIGRATE_RUN_SECONDS} seconds\n"
    assert guest_file(local, "/guest/progress") == "".join(f"{i}\n" for i in range(1, MIGRATE_RUN_SECONDS + 1))
    assert sha256_of(restored_disk(api.server.store, tmp_path, VM)) == original


@pytest.mark.slow
def test_a_failed_verification_powers_the_guest_off_and_deletes_the_session(
        serving: Callable[..., tuple[Api, str]]) -> None:
    api, _ = serving(RUNS_UNTIL_STOPPED)
    code, job = instant_boot(api, "g3", "--verify", "console:NEVER", "--timeout", "5", "--accel", "tcg")
    assert code == 1 and job["state"] == "failed"
    assert guest_of(api, "g3").record.accel == "tcg"  # as asked, whatever the host's KVM can do
    assert "did not print 'NEVER' within 5 s" in job["error"]
    assert steps(job) == [("create session", "ok"), ("power on", "ok"), ("verify", "failed"),
                          ("undo: power off QEMU guest of g3", "ok"), ("undo: delete session g3", "ok")]
    assert not guest_of(api, "g3").is_running()
    assert api.client.get("/sessions/g3").status_code == 404


@pytest.mark.slow
def test_keep_leaves_the_failed_guest_and_its_session_until_stop(serving: Callable[..., tuple[Api, str]]) -> None:
    api, _ = serving(RUNS_UNTIL_STOPPED)
    code, job = instant_boot(api, "g4", "--verify", "console:NEVER", "--timeout", "5", "--keep")
    assert code == 1 and job["state"] == "failed"
    assert steps(job) == [("create session", "ok"), ("power on", "ok"), ("verify", "failed")]
    guest = guest_of(api, "g4")
    guest.wait_for_console(BOOTED_MARKER, BOOT_TIMEOUT)  # kept: it boots on after the job gave up
    assert guest.is_running()
    assert api.client.get("/sessions/g4").status_code == 200
    stopped = cli(api, "stop", "g4")
    assert stopped.returncode == 0, stopped.stderr
    assert not guest.is_running()
    assert api.client.get("/sessions/g4").status_code == 404


PLAN = f'''
[group]
name = "pair"
qemu = true

[[vms]]
name = "web"
after = ["db"]
verify = "console:{BOOTED_MARKER}"
timeout = 120
memory_mib = {MEMORY_MIB}

[[vms]]
name = "db"
verify = "console:{BOOTED_MARKER}"
timeout = 120
memory_mib = {MEMORY_MIB}
'''


@pytest.mark.slow
def test_recovery_group_boots_two_guests_in_order_and_tears_down(serving: Callable[..., tuple[Api, str]],
                                                                 tmp_path: Path) -> None:
    api, _ = serving(RUNS_UNTIL_STOPPED, ("db", "web"))
    plan = tmp_path / "pair.toml"
    plan.write_text(PLAN)
    result = cli(api, "recovery-group", "run", str(plan), "--json", timeout=2 * BOOT_TIMEOUT)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    report = job["result"]
    assert report["verdict"] == "ok" and not report["kept"]
    assert [(vm["vm"], vm["verdict"]) for vm in report["vms"]] == [("db", "ok"), ("web", "ok")]
    for vm in report["vms"]:
        assert [(s["name"], s["verdict"]) for s in vm["steps"]] == [("create session", "ok"), ("power on", "ok"),
                                                                     ("verify", "ok")]
    created = [step for step in job["steps"] if step["name"] == "create session"]
    assert [step["detail"].split()[1] for step in created] == ["pair-db", "pair-web"]
    db_verified = job["steps"][2]
    assert db_verified["name"] == "verify" and db_verified["finished"] <= created[1]["started"]
    assert steps(job)[6:] == [("power off", "ok"), ("delete session", "ok")] * 2  # the teardown
    for session in ("pair-db", "pair-web"):
        guest = guest_of(api, session)
        assert not guest.is_running() and BOOTED_MARKER in guest.console_text()
        assert api.client.get(f"/sessions/{session}").status_code == 404
    assert api.client.get("/instant-boots").json() == []


def test_no_power_on_makes_the_session_and_stop_drops_it(serving: Callable[..., tuple[Api, str]]) -> None:
    """Nothing to power off: stop must still drop the session (it used to fail: no guest.json)."""
    api, _ = serving(0)
    code, job = instant_boot(api, "g5", "--no-power-on")
    assert code == 0, job
    assert steps(job) == [("create session", "ok")]
    assert job["result"]["disks"] == [session_disk_url("127.0.0.1", "g5", VM)]
    stopped = cli(api, "stop", "g5", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert [(s["name"], s["verdict"], s["detail"]) for s in json.loads(stopped.stdout)["steps"]] == [
        ("power off", "ok", "never powered on"), ("delete session", "ok", "")]
    assert api.client.get("/sessions/g5").status_code == 404
