"""Backup policies without a store or a vCenter: cron, windows, retention counting, VM selection, config checks."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import pytest

from appliance.config import PolicyConfig, config_from_table, default_policy
from appliance.errors import ConfigError, UsageError
from appliance.protection.policy import conflict, policy_for
from appliance.protection.retention import Retention, dropped, kept
from appliance.schedule import parse_cron, parse_window
from appliance.vsphere.inventory import VmInfo

D = datetime.datetime


# --- cron ----------------------------------------------------------------------------------

@pytest.mark.parametrize("line, after, expected", [
    ("30 2 * * *", D(2024, 5, 1, 2, 30), D(2024, 5, 2, 2, 30)),  # strictly after
    ("30 2 * * *", D(2024, 5, 1, 2, 29, 59), D(2024, 5, 1, 2, 30)),
    ("*/15 * * * *", D(2024, 5, 1, 10, 46), D(2024, 5, 1, 11, 0)),
    ("10-50/20 * * * *", D(2024, 5, 1, 10, 31), D(2024, 5, 1, 10, 50)),  # 10, 30, 50
    ("5/20 8 * * *", D(2024, 5, 1, 8, 46), D(2024, 5, 2, 8, 5)),  # 5/20 is 5-59/20: 5, 25, 45
    ("0 22 * * 0", D(2024, 5, 1), D(2024, 5, 5, 22, 0)),  # Sunday as 0
    ("0 22 * * 7", D(2024, 5, 1), D(2024, 5, 5, 22, 0)),  # Sunday as 7
    ("0 22 * * SUN", D(2024, 5, 1), D(2024, 5, 5, 22, 0)),
    ("0 1 * * mon-fri", D(2024, 5, 3, 2, 0), D(2024, 5, 6, 1, 0)),  # Friday after 01:00 -> Monday
    ("0 0 13 * fri", D(2024, 5, 1), D(2024, 5, 3, 0, 0)),  # both restricted: 13th OR a Friday
    ("0 0 */10 * fri", D(2024, 5, 1), D(2024, 5, 31, 0, 0)),  # "*"-led dom: 1, 11, 21, 31 AND a Friday
    ("0 0 13 * *", D(2024, 5, 1), D(2024, 5, 13, 0, 0)),
    ("0 0 31 * *", D(2024, 4, 1), D(2024, 5, 31, 0, 0)),  # April has no 31st
    ("0 0 29 feb *", D(2097, 3, 1), D(2104, 2, 29, 0, 0)),  # 2100 is no leap year
    ("59 23 31 dec *", D(2024, 12, 31, 23, 59), D(2025, 12, 31, 23, 59)),
    ("0 3 1,15 jan,jul *", D(2024, 1, 15, 3, 0), D(2024, 7, 1, 3, 0)),
])
def test_cron_next_after(line: str, after: D, expected: D) -> None:
    cron = parse_cron(line)
    assert cron.next_after(after) == expected
    assert cron.holds(expected) and cron.holds(expected.replace(second=42))


def test_cron_holds_minutes_and_the_day_rule() -> None:
    weekdays_or_first = parse_cron("0 6 1 * mon")
    assert weekdays_or_first.holds(D(2024, 5, 6, 6, 0))  # a Monday, not the 1st
    assert weekdays_or_first.holds(D(2024, 6, 1, 6, 0))  # the 1st, a Saturday
    assert not weekdays_or_first.holds(D(2024, 5, 7, 6, 0))  # a Tuesday, not the 1st
    assert not weekdays_or_first.holds(D(2024, 5, 6, 6, 1))
    every_weekday_of_first_week = parse_cron("0 6 1-7 * *")
    assert not every_weekday_of_first_week.holds(D(2024, 5, 8, 6, 0))


@pytest.mark.parametrize("line, fragment", [
    ("30 2 * *", "has 4 fields"),
    ("60 * * * *", "minute: 60 is out of range 0..59"),
    ("* 24 * * *", "hour: 24 is out of range 0..23"),
    ("* * 0 * *", "day of month: 0 is out of range 1..31"),
    ("* * * 13 *", "month: 13 is out of range 1..12"),
    ("* * * * 8", "day of week: 8 is out of range 0..7"),
    ("*/0 * * * *", "step that is not a positive number"),
    ("5-1 * * * *", "ends before it starts"),
    ("x * * * *", 'minute: "x" is not a number'),
    ("* * * foo *", 'month: "foo" is not a number or a name'),
    ("1,,2 * * * *", 'minute: "" is not a number'),
    ("0 0 30 feb *", "names no day that exists"),
])
def test_cron_refuses(line: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_cron(line)


def test_a_day_named_only_by_day_of_week_is_not_refused() -> None:
    assert parse_cron("0 0 30 feb mon").next_after(D(2024, 1, 1)) == D(2024, 2, 5)


# --- windows -------------------------------------------------------------------------------

@pytest.mark.parametrize("window, moment, holds", [
    ("22:00-06:00", "23:30", True), ("22:00-06:00", "00:00", True), ("22:00-06:00", "05:59", True),
    ("22:00-06:00", "06:00", False), ("22:00-06:00", "21:59", False), ("22:00-06:00", "22:00", True),
    ("01:00-05:00", "00:30", False), ("01:00-05:00", "04:59", True), ("01:00-05:00", "05:00", False),
])
def test_windows(window: str, moment: str, holds: bool) -> None:
    assert parse_window(window).holds(datetime.time.fromisoformat(moment)) is holds


# --- retention -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    id: str
    created: float


def points(*moments: str) -> list[Point]:
    return [Point(moment, D.fromisoformat(moment).timestamp()) for moment in moments]


# Two weeks of backups, twice a day on some days, with gaps (no backups 06-08, 12).
HISTORY = points(
    "2024-05-01T02:00", "2024-05-02T02:00", "2024-05-02T14:00", "2024-05-03T02:00", "2024-05-04T02:00",
    "2024-05-05T02:00", "2024-05-05T14:00", "2024-05-09T02:00", "2024-05-10T02:00", "2024-05-11T02:00",
    "2024-05-13T02:00", "2024-05-13T14:00", "2024-05-14T02:00",
)


@pytest.mark.parametrize("rule, expected", [
    (Retention(keep_last=3), {"2024-05-14T02:00": "last 1", "2024-05-13T14:00": "last 2",
                              "2024-05-13T02:00": "last 3"}),
    # The newest of each of the 4 newest days with points; the gap (12th) does not use up a day.
    (Retention(keep_daily=4), {"2024-05-14T02:00": "daily 1", "2024-05-13T14:00": "daily 2",
                               "2024-05-11T02:00": "daily 3", "2024-05-10T02:00": "daily 4"}),
    # keep_last first; a day whose newest point it kept does not count towards keep_daily (borg).
    (Retention(keep_last=2, keep_daily=2), {"2024-05-14T02:00": "last 1", "2024-05-13T14:00": "last 2",
                                            "2024-05-11T02:00": "daily 1", "2024-05-10T02:00": "daily 2"}),
    # ISO weeks: 13-14 May is week 20, 6-12 May week 19 (only 9-11 have points), 1-5 May week 18.
    (Retention(keep_weekly=3), {"2024-05-14T02:00": "weekly 1", "2024-05-11T02:00": "weekly 2",
                                "2024-05-05T14:00": "weekly 3"}),
    (Retention(keep_daily=1, keep_weekly=2), {"2024-05-14T02:00": "daily 1", "2024-05-11T02:00": "weekly 1",
                                              "2024-05-05T14:00": "weekly 2"}),
    (Retention(keep_monthly=6), {"2024-05-14T02:00": "monthly 1"}),
    (Retention(keep_last=100), {point.id: f"last {len(HISTORY) - index}" for index, point in enumerate(HISTORY)}),
])
def test_retention_by_hand(rule: Retention, expected: dict[str, str]) -> None:
    assert kept(HISTORY, rule) == expected
    assert [point.id for point in dropped(HISTORY, rule)] == [p.id for p in HISTORY if p.id not in expected]


def test_retention_counts_months_and_years() -> None:
    history = points("2023-11-30T23:00", "2023-12-01T01:00", "2023-12-31T23:59", "2024-01-01T00:00",
                     "2024-02-10T02:00", "2024-02-20T02:00")
    assert kept(history, Retention(keep_monthly=3)) == {
        "2024-02-20T02:00": "monthly 1", "2024-01-01T00:00": "monthly 2", "2023-12-31T23:59": "monthly 3"}
    # 2023-12-31 is a Sunday (ISO week 52), 2024-01-01 a Monday (ISO week 1 of 2024).
    assert kept(history, Retention(keep_weekly=2, keep_last=1)) == {
        "2024-02-20T02:00": "last 1", "2024-02-10T02:00": "weekly 1", "2024-01-01T00:00": "weekly 2"}


def test_retention_of_no_points_and_bad_rules() -> None:
    assert kept([], Retention(keep_daily=7)) == {} and dropped([], Retention(keep_last=1)) == []
    with pytest.raises(UsageError, match="keeps nothing"):
        Retention()
    with pytest.raises(UsageError, match="negative"):
        Retention(keep_last=-1, keep_daily=3)


# --- selection -----------------------------------------------------------------------------

def vm(name: str, folder: str = "/DC0/vm", tags: tuple[str, ...] = (), template: bool = False) -> VmInfo:
    return VmInfo(name=name, uuid="u", instance_uuid="i", power_state="poweredOn", host="h", datastores=(),
                  template=template, folder=folder, tags=tags)


def policy(name: str, **keys: Any) -> PolicyConfig:
    return PolicyConfig(name=name, every_hours=24.0, keep_last=7, **keys)


DEFAULT = policy("default")
PROD = policy("prod", folders=("/DC0/vm/prod",))
GOLD = policy("gold", tags=("Backup:Gold",))
DB = policy("db", vms=("db1",))
SILVER = policy("silver", tags=("Silver",))


@pytest.mark.parametrize("machine, expected", [
    (vm("web1", "/DC0/vm/prod"), "prod"),
    (vm("web2", "/DC0/vm/prod/frontend/eu"), "prod"),  # a subfolder counts
    (vm("web3", "/DC0/vm/production"), "default"),  # a prefix of the name is not the folder
    (vm("db1", "/DC0/vm/prod", ("Backup:Gold",)), "db"),  # naming a VM beats its folder and tags
    (vm("app", "/DC0/vm", ("Backup:Gold",)), "gold"),
    (vm("app", "/DC0/vm", ("Other:Gold",)), "default"),  # "Category:Tag" is exact
    (vm("app", "/DC0/vm", ("Tier:Silver",)), "silver"),  # "Tag" matches it in any category
    (vm("app", "/DC0/vm/prod", ("Backup:Gold",)), "prod"),  # two by folder/tag: the first in file order
    (vm("lonely"), "default"),
])
def test_policy_for(machine: VmInfo, expected: str) -> None:
    chosen = policy_for(machine, (PROD, GOLD, DB, SILVER), DEFAULT)
    assert chosen is not None and chosen.name == expected


def test_templates_are_never_backed_up_and_conflicts_are_reported() -> None:
    assert policy_for(vm("golden-image", template=True), (policy("every", all=True),), DEFAULT) is None
    assert conflict(vm("app", "/DC0/vm/prod", ("Backup:Gold",)), (PROD, GOLD)) == (
        'VM "app" is selected by policies prod, gold: backed up under prod')
    assert conflict(vm("app", "/DC0/vm/prod"), (PROD, GOLD)) is None


def test_a_policy_of_another_connection_does_not_select() -> None:
    elsewhere = policy("elsewhere", connection="vc2", all=True)
    assert policy_for(vm("app"), (elsewhere,), DEFAULT, "vc1") == DEFAULT
    assert policy_for(vm("app"), (elsewhere,), DEFAULT, "vc2") == elsewhere


# --- configuration -------------------------------------------------------------------------

def connection(name: str) -> dict[str, Any]:
    return {"name": name, "url": f"https://{name}.example.com/sdk", "user": "backup", "password_env": "PW"}


def config(policies: list[dict[str, Any]], connections: tuple[str, ...] = ("vc1",),
           protection: dict[str, Any] | None = None) -> Any:
    table: dict[str, Any] = {"store": {"path": "/srv/store"}, "policies": policies,
                             "vsphere": {"connections": [connection(name) for name in connections]}}
    if protection is not None:
        table["protection"] = protection
    return config_from_table(table, "appliance.toml")


def test_a_full_policy_and_the_default() -> None:
    loaded = config([{"name": "prod", "cron": "30 1 * * mon-fri", "window": "22:00-06:00", "keep_last": 7,
                      "keep_daily": 14, "keep_weekly": 8, "keep_monthly": 12, "quiesce": "yes", "enable_cbt": False,
                      "streams": 8, "vms": ["db1"], "folders": ["/DC1/vm/prod/"], "tags": ["Backup:Gold", "Gold"]}])
    (prod,) = loaded.policies
    assert (prod.cron, prod.every_hours, prod.quiesce, prod.enable_cbt, prod.streams) == (
        "30 1 * * mon-fri", None, "yes", False, 8)
    assert prod.folders == ("/DC1/vm/prod",) and prod.connection is None
    builtin = default_policy(loaded.protection, loaded.policies)
    assert (builtin.name, builtin.every_hours, builtin.keep_last, builtin.quiesce, builtin.enable_cbt) == (
        "default", 24.0, 14, "try", True)
    mine = config([{"name": "nightly", "every_hours": 12, "keep_daily": 30}], protection={"default_policy": "nightly"})
    assert default_policy(mine.protection, mine.policies) == mine.policies[0]


@pytest.mark.parametrize("policies, connections, key, fragment", [
    ([{"name": "p", "keep_last": 1, "all": True}], ("vc1",), "policies[0].every_hours", "exactly one schedule"),
    ([{"name": "p", "every_hours": 1, "cron": "* * * * *", "keep_last": 1, "all": True}], ("vc1",),
     "policies[0].every_hours", "exactly one schedule"),
    ([{"name": "p", "cron": "61 * * * *", "keep_last": 1, "all": True}], ("vc1",), "policies[0].cron",
     "minute: 61 is out of range"),
    ([{"name": "p", "every_hours": 6, "window": "22:00", "keep_last": 1, "all": True}], ("vc1",),
     "policies[0].window", "not a window"),
    ([{"name": "p", "every_hours": 6, "window": "22:00-22:00", "keep_last": 1, "all": True}], ("vc1",),
     "policies[0].window", "empty window"),
    ([{"name": "p", "every_hours": 6, "all": True}], ("vc1",), "policies[0].keep_last", "keeps nothing"),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "all": True, "connection": "vc9"}], ("vc1",),
     "policies[0].connection", 'no [[vsphere.connections]] is named "vc9" (known: vc1)'),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "all": True}], ("vc1", "vc2"), "policies[0].connection",
     "several connections are configured: name one (vc1, vc2)"),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "all": True}], (), "policies[0].connection",
     "no [[vsphere.connections]] is configured"),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "vms": ["a"]},
      {"name": "p", "every_hours": 6, "keep_last": 1, "vms": ["b"]}], ("vc1",), "policies[1].name",
     'another policy is already named "p"'),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "vms": ["a", "b"]},
      {"name": "q", "every_hours": 6, "keep_last": 1, "vms": ["c", "b"]}], ("vc1",), "policies[1].vms",
     'VM "b" is also named by policy "p"'),
    ([{"name": "p", "every_hours": 6, "keep_last": 1}], ("vc1",), "policies[0].vms", "selects no VM"),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "streams": 9, "all": True}], ("vc1",), "policies[0].streams",
     "out of range 1..8"),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "quiesce": "maybe", "all": True}], ("vc1",),
     "policies[0].quiesce", "not one of: try, yes, no"),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "folders": ["DC0/vm"]}], ("vc1",), "policies[0].folders",
     "item 0"),
    ([{"name": "p", "every_hours": 6, "keep_last": 1, "tags": ["Backup:"]}], ("vc1",), "policies[0].tags",
     "is not a tag"),
    ([{"name": "default", "every_hours": 6, "keep_last": 1, "connection": "vc1"}], ("vc1", "vc2"),
     "policies[0].connection", "covers the VMs of every connection"),
])
def test_config_check_refuses(policies: list[dict[str, Any]], connections: tuple[str, ...], key: str,
                              fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(policies, connections)
    assert caught.value.key == key and fragment in caught.value.reason


def test_the_same_vm_name_under_two_connections_is_two_vms() -> None:
    loaded = config([{"name": "a", "connection": "vc1", "every_hours": 6, "keep_last": 1, "vms": ["x"]},
                     {"name": "b", "connection": "vc2", "every_hours": 6, "keep_last": 1, "vms": ["x"]}],
                    ("vc1", "vc2"))
    assert [p.name for p in loaded.policies] == ["a", "b"]
