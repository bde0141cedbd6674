"""The backup scheduler's decisions, and retention applied to a real store (in process and by `appliance prune`).

The scheduler is driven by a clock the test sets and a starter that records what it was
asked to start (the backup job itself is tested where it is written); stores are real.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.config import PolicyConfig
from appliance.errors import TryAgain
from appliance.ingest.backup import backup
from appliance.protection.retention import Retention
from appliance.protection.scheduler import (
    RETRY_AFTER_SECONDS,
    BackupScheduler,
    apply_retention,
    retention_due,
)
from appliance.store import Store
from appliance.store.catalog import RestorePoint, new_point_id
from appliance.store.gc import prune
from appliance.store.repository import open_store
from appliance.store.verify import verify
from appliance.vsphere.inventory import VmInfo
from tests.conftest import run_cli, sha256_of, write_image
from tests.test_backup import restore_sha

HOUR = 3600.0


def at(text: str) -> float:
    """A local time, as the schedules read the clock."""
    return datetime.datetime.fromisoformat(text).timestamp()


class Clock:
    def __init__(self, now: str) -> None:
        self.now = at(now)

    def __call__(self) -> float:
        return self.now


class RecordingStarter:
    """Records each start; VMs in `busy` answer TryAgain, as a VM whose backup runs does."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str, str, str]] = []
        self.busy: set[str] = set()

    def start_backup(self, vm: str, connection: str, policy: PolicyConfig, reason: str) -> object:
        if vm in self.busy:
            raise TryAgain(f"a backup of {vm} is running")
        self.started.append((vm, connection, policy.name, reason))
        return vm


def machine(name: str, folder: str = "/DC0/vm", template: bool = False) -> VmInfo:
    return VmInfo(name=name, uuid="u", instance_uuid="i", power_state="poweredOn", host="h", datastores=(),
                  template=template, folder=folder)


def policy(name: str, **keys: Any) -> PolicyConfig:
    keys.setdefault("keep_last", 3)
    if "cron" not in keys:
        keys.setdefault("every_hours", 24.0)
    return PolicyConfig(name=name, **keys)


DEFAULT = policy("default")


def scheduler(policies: tuple[PolicyConfig, ...], clock: Clock) -> tuple[BackupScheduler, RecordingStarter]:
    starter = RecordingStarter()
    return BackupScheduler(policies, DEFAULT, starter, clock), starter


def test_every_hours_counts_from_the_newest_point_and_a_template_is_never_due() -> None:
    clock = Clock("2024-05-10T12:00")
    hourly = policy("hourly", every_hours=6.0, vms=("db",))
    chosen, starter = scheduler((hourly,), clock)
    newest = {"db": clock.now - 5 * HOUR, "web": clock.now - 25 * HOUR, "app": clock.now - 23 * HOUR}
    inventory = [machine("db"), machine("web"), machine("app"), machine("new"), machine("image", template=True)]
    due = chosen.due(clock.now, inventory, newest.get, "vc1")
    assert [(vm.name, p.name) for vm, p in due] == [("web", "default"), ("new", "default")]
    clock.now += HOUR
    assert [vm.name for vm, _ in chosen.due(clock.now, inventory, newest.get, "vc1")] == ["db", "web", "app", "new"]
    chosen.start_due({"vc1": inventory}, newest.get)
    assert starter.started == [
        ("db", "vc1", "hourly", "policy hourly: every 6 h, newest point 6.0 h old"),
        ("web", "vc1", "default", "policy default: every 24 h, newest point 26.0 h old"),
        ("app", "vc1", "default", "policy default: every 24 h, newest point 24.0 h old"),
        ("new", "vc1", "default", "policy default: every 24 h, no restore point yet"),
    ]


def test_hydration_marks_follow_each_vms_policy() -> None:
    """A policy's hydrate reaches the VMs it selects by name or folder; the default policy's the rest."""
    gold = policy("gold", folders=("/DC0/vm/prod",), hydrate=True)
    named = policy("named", vms=("db",))
    chosen, _ = scheduler((gold, named), Clock("2024-05-10T12:00"))
    inventory = [machine("db", "/DC0/vm/prod"), machine("web", "/DC0/vm/prod"), machine("app"),
                 machine("image", "/DC0/vm/prod", template=True)]
    assert chosen.hydration_marks({"vc1": inventory}) == {"db": False, "web": True, "app": False}


def test_a_window_holds_back_until_it_opens() -> None:
    clock = Clock("2024-05-10T21:30")
    nightly = policy("nightly", every_hours=24.0, window="22:00-06:00", all=True)
    chosen, starter = scheduler((nightly,), clock)
    inventory = [machine("db")]
    assert chosen.start_due({"vc1": inventory}, lambda vm: None) == []
    clock.now = at("2024-05-11T05:59")
    assert chosen.start_due({"vc1": inventory}, lambda vm: None) == ["db"]
    clock.now = at("2024-05-11T06:00") + RETRY_AFTER_SECONDS
    assert chosen.due(clock.now, inventory, lambda vm: None, "vc1") == []


def test_cron_is_due_once_a_named_minute_passed_since_the_newest_point() -> None:
    clock = Clock("2024-05-10T12:00")  # a Friday
    weekdays = policy("weekdays", cron="30 2 * * mon-fri", all=True)
    chosen, _ = scheduler((weekdays,), clock)
    inventory = [machine("db")]

    def due(now: str, newest: str | None) -> bool:
        newest_time = None if newest is None else at(newest)
        return bool(chosen.due(at(now), inventory, lambda vm: newest_time, "vc1"))

    assert due("2024-05-10T12:00", "2024-05-10T02:31") is False  # today's 02:30 is covered
    assert due("2024-05-10T12:00", "2024-05-09T02:35") is True  # missed (appliance down): catch up now
    assert due("2024-05-11T12:00", "2024-05-10T02:31") is False  # Saturday: not named
    assert due("2024-05-13T02:29", "2024-05-10T02:31") is False
    assert due("2024-05-13T02:30", "2024-05-10T02:31") is True
    # A VM without points waits for the first named minute after the scheduler started.
    assert due("2024-05-10T23:00", None) is False
    assert due("2024-05-13T02:30", None) is True


def test_a_busy_vm_is_skipped_and_a_started_one_is_not_started_again_at_once() -> None:
    clock = Clock("2024-05-10T12:00")
    chosen, starter = scheduler((), clock)
    inventory = [machine("db"), machine("web")]
    starter.busy = {"db"}
    assert chosen.start_due({"vc1": inventory}, lambda vm: None) == ["web"]
    starter.busy = set()
    clock.now += 60
    assert chosen.start_due({"vc1": inventory}, lambda vm: None) == ["db"]  # busy is not "started"
    clock.now += 60
    assert chosen.start_due({"vc1": inventory}, lambda vm: None) == []  # both started: let them run (or fail)
    clock.now += RETRY_AFTER_SECONDS
    assert chosen.start_due({"vc1": inventory}, lambda vm: None) == ["db", "web"]  # no point came: retried


def test_each_connection_has_its_own_policies(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock("2024-05-10T12:00")
    first = policy("first", connection="vc1", every_hours=1.0, all=True)
    prod = policy("prod", connection="vc1", every_hours=1.0, folders=("/DC0/vm/prod",))
    chosen, starter = scheduler((first, prod), clock)
    chosen.start_due({"vc1": [machine("a", "/DC0/vm/prod")], "vc2": [machine("a", "/DC0/vm/prod")]},
                     lambda vm: None)
    assert [(vm, connection, name) for vm, connection, name, _ in starter.started] == [
        ("a", "vc1", "first"), ("a", "vc2", "default")]
    assert 'VM \\"a\\" is selected by policies first, prod: backed up under first' in caplog.text
    chosen.due(clock.now, [machine("a", "/DC0/vm/prod")], lambda vm: None, "vc1")
    assert caplog.text.count("backed up under first") == 1  # logged once, not every tick


# --- retention on a real store -------------------------------------------------------------

def backdate(store: Store, point: RestorePoint, when: str) -> RestorePoint:
    """The point as if taken at `when` (a new id of that time, same disks): histories of weeks in a second."""
    created = at(when)
    with store.writer_lock(), store.env.begin(write=True) as txn:
        maps = [store.catalog.chunk_map(txn, point, index) for index in range(len(point.disks))]
        files = {name: store.catalog.file(txn, point, name) for name in point.files}
        store.catalog.delete_point(txn, point)
        moved = dataclasses.replace(point, id=new_point_id(created), created=created)
        store.catalog.add_point(txn, moved, maps, files)
    return moved


DAYS = ("2024-05-01T02:00", "2024-05-02T02:00", "2024-05-02T14:00", "2024-05-03T02:00", "2024-05-08T02:00")


def history(store: Store, tmp_path: Path) -> tuple[list[RestorePoint], list[str]]:
    """Five points of one VM on four days (two on the 2nd), each of different bytes; their digests."""
    points, digests = [], []
    for index, when in enumerate(DAYS):
        image = write_image(tmp_path / f"disk{index}.img", 1 << 20, seed=index)
        points.append(backdate(store, backup(store, "vm", [image]), when))
        digests.append(sha256_of(image))
    return points, digests


def test_policy_retention_after_a_backup_spares_held_points(store: Store, tmp_path: Path) -> None:
    points, digests = history(store, tmp_path)
    with store.env.begin(write=True) as txn:
        store.catalog.add_hold(txn, points[0].id, "session:old-one")
    daily = policy("daily", keep_last=0, keep_daily=2, all=True)
    # Kept: 8 May and 3 May (the two newest days); the 1st only because a session holds it.
    assert [p.id for p in retention_due(store, "vm", daily)] == [points[1].id, points[2].id]
    removed, report = apply_retention(store, "vm", daily)
    assert [p.id for p in removed] == [points[1].id, points[2].id]
    assert report is not None and report.removed_chunks > 0
    with store.env.begin() as txn:
        assert [p.id for p in store.catalog.vm_points(txn, "vm")] == [points[0].id, points[3].id, points[4].id]
    for index in (0, 3, 4):
        assert restore_sha(store, points[index].id, "vm", 0, tmp_path) == digests[index]
    assert verify(store, full=True).problems == []
    assert apply_retention(store, "vm", daily) == ([], None)  # nothing to drop: no GC either


def test_prune_by_weeks_and_last(store: Store, tmp_path: Path) -> None:
    points, _ = history(store, tmp_path)
    removed, _ = prune(store, "vm", Retention(keep_last=1, keep_weekly=1))
    # 8 May (week 19) is kept as the last; week 18's newest is the 3rd.
    assert [p.id for p in removed] == [points[0].id, points[1].id, points[2].id]


def test_prune_cli_keeps_what_the_rule_keeps(tmp_path: Path) -> None:
    path = tmp_path / "store"
    run_cli("--store", str(path), "init", "--chunk-size", str(256 << 10), check=True)
    with open_store(path) as store:
        points, digests = history(store, tmp_path)
    result = run_cli("--store", str(path), "prune", "--vm", "vm", "--keep-daily", "3", "--keep-monthly", "1",
                     check=True)
    assert [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("removed")] == [
        points[0].id, points[1].id]
    assert "chunks dropped" in result.stdout
    listed = run_cli("--store", str(path), "points", "--vm", "vm", check=True).stdout
    assert points[2].id in listed and points[0].id not in listed
    out = tmp_path / "out.img"
    run_cli("--store", str(path), "restore", "--vm", "vm", "--point", points[2].id, "--output", str(out), check=True)
    assert sha256_of(out) == digests[2]
    refused = run_cli("--store", str(path), "prune", "--vm", "vm")
    assert refused.returncode == 2 and "keeps nothing" in refused.stderr
