"""Recovery group plans: validation names the key, `after` orders the boot, cycles are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError, UsageError
from appliance.recovery.plan import boot_order, load_plan, plan_from_table
from appliance.verification import Verification, parse_verification

GROUP = {"name": "shop", "host": "esx1.example.com", "network": "isolated"}


def test_boot_order_follows_after_and_keeps_plan_order(tmp_path: Path) -> None:
    plan_file = tmp_path / "shop.toml"
    plan_file.write_text('''
[group]
name = "shop"
host = "esx1.example.com"
network = "isolated"

[[vms]]
name = "web"
after = ["db", "cache"]
verify = "script:curl -fsS http://$APPLIANCE_VM_IP/"
timeout = 300

[[vms]]
name = "db"
verify = "tools"

[[vms]]
name = "cache"
after = ["db"]
verify = "ip"

[[vms]]
name = "monitor"
''')
    plan = load_plan(plan_file)
    assert [vm.name for vm in boot_order(plan)] == ["db", "cache", "web", "monitor"]
    web = plan.vms[0]
    assert web.verify == Verification("script", "curl -fsS http://$APPLIANCE_VM_IP/") and web.timeout == 300
    assert plan.vms[3].verify == Verification("tools") and plan.vms[3].point == "latest"


@pytest.mark.parametrize(("vms", "group", "key", "reason"), [
    ([{"name": "a", "after": ["b"]}, {"name": "b", "after": ["a"]}], GROUP, "vms", "cycle among: a, b"),
    ([{"name": "a", "after": ["ghost"]}], GROUP, "vms[0].after", '"ghost" is not a VM of this plan'),
    ([{"name": "a"}, {"name": "a"}], GROUP, "vms[1].name", "listed twice"),
    ([{"name": "a", "verify": "ping"}], GROUP, "vms[0].verify", "unknown verification"),
    ([{"name": "a", "timeout": -1}], GROUP, "vms[0].timeout", ""),
    ([{"name": "a", "colour": "red"}], GROUP, "vms[0].colour", "unknown key"),
    ([{"name": "a"}], {"name": "shop"}, "vms[0].host", "no ESXi host"),
    ([{"name": "a"}], {"name": "../x", "qemu": True}, "group.name", "invalid"),
    ([{"name": "a"}], {"name": "lab", "qemu": True}, "vms[0].verify", "QEMU guest reports no tools"),
    ([{"name": "a", "verify": "console:up"}], GROUP, "vms[0].verify", "vSphere VM has no console"),
    ([], GROUP, "vms", "at least one"),
])
def test_bad_plans_name_the_key(vms: list[dict[str, object]], group: dict[str, object], key: str,
                                reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_from_table({"group": group, "vms": vms}, "plan.toml")
    assert caught.value.key == key and reason in caught.value.reason
    assert str(caught.value).startswith("plan.toml: ")


def test_qemu_groups_need_no_host() -> None:
    plan = plan_from_table({"group": {"name": "lab", "qemu": True}, "vms": [{"name": "a", "verify": "console:up"}]},
                           "lab.toml")
    assert plan.group.qemu and plan.vms[0].verify == Verification("console", "up")


@pytest.mark.parametrize("text", ["script:", "console:", "tools:x", "ping", ""])
def test_bad_verifications(text: str) -> None:
    with pytest.raises(UsageError):
        parse_verification(text)
