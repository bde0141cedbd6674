"""Recovery group plans (TOML) and how a booted VM is proven good (verification).

A plan names the VMs of one application, the restore point of each, what each waits
for (`after`), how each is verified and for how long, and where the group runs: an
isolated port group on one ESXi host, or local QEMU. It is validated like the
configuration file (same schema machinery, errors name the key), and a cycle in `after`
is refused before anything boots.

```toml
[group]
name = "shop"
host = "esx1.example.com"
network = "isolated-test"

[[vms]]
name = "db"
verify = "tools"

[[vms]]
name = "web"
after = ["db"]
verify = "script:curl -fsS http://$APPLIANCE_VM_IP/health"
timeout = 300
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import build_document, read_table
from appliance.config_checks import (
    Invalid,
    boolean,
    connection_name,
    integer,
    option,
    part,
    positive_number,
    required,
    table_array,
    text,
)
from appliance.errors import InvalidName, UsageError
from appliance.names import SESSION_NAME
from appliance.verification import Verification, check_offered, parse_verification

DEFAULT_TIMEOUT_SECONDS = 600.0
DEFAULT_MEMORY_MIB = 512


def verification(value: Any) -> Verification:
    try:
        return parse_verification(text(value))
    except UsageError as exc:
        raise Invalid(str(exc)) from None


def vm_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Invalid("must be an array of VM names")
    return tuple(value)


def session_name(value: Any) -> str:
    name = text(value)
    try:
        SESSION_NAME.check(name)
    except InvalidName as exc:
        raise Invalid(str(exc)) from None
    return name


@dataclass(frozen=True)
class PlanVm:
    name: str = required(text)
    point: str = option("latest", text)
    after: tuple[str, ...] = option((), vm_names)
    verify: Verification = option(Verification("tools"), verification)
    timeout: float = option(DEFAULT_TIMEOUT_SECONDS, positive_number)
    host: str | None = option(None, text)  # the ESXi host as vCenter names it
    memory_mib: int = option(DEFAULT_MEMORY_MIB, integer(64, 1 << 20))


@dataclass(frozen=True)
class PlanGroup:
    name: str = required(session_name)
    host: str | None = option(None, text)  # the ESXi host as vCenter names it
    network: str | None = option(None, text)
    connection: str | None = option(None, connection_name)
    #: Boot on this machine's QEMU instead of vSphere (proves the data path without ESXi).
    qemu: bool = option(False, boolean)


@dataclass(frozen=True)
class RecoveryPlan:
    group: PlanGroup = part(PlanGroup)
    vms: tuple[PlanVm, ...] = option((), table_array(PlanVm))

    def __post_init__(self) -> None:
        if not self.vms:
            raise Invalid("a plan needs at least one [[vms]] table", "vms")
        seen: set[str] = set()
        for index, vm in enumerate(self.vms):
            where = f"vms[{index}]"
            if vm.name in seen:
                raise Invalid(f'VM "{vm.name}" is listed twice', f"{where}.name")
            seen.add(vm.name)
            if not self.group.qemu and vm.host is None and self.group.host is None:
                raise Invalid("no ESXi host: give group.host or this VM's host (or group.qemu = true)",
                              f"{where}.host")
            try:
                check_offered("qemu" if self.group.qemu else "vsphere", vm.verify)
            except UsageError as exc:
                raise Invalid(str(exc), f"{where}.verify") from None
        names = {vm.name for vm in self.vms}
        for index, vm in enumerate(self.vms):
            for dependency in vm.after:
                if dependency not in names:
                    raise Invalid(f'"{dependency}" is not a VM of this plan', f"vms[{index}].after")
        boot_order(self)  # refuses a cycle here, while the plan is read


def boot_order(plan: RecoveryPlan) -> list[PlanVm]:
    """The VMs in an order where each comes after everything it names in `after`.

    Among VMs that are ready together, the plan's own order is kept.
    """
    done: set[str] = set()
    order: list[PlanVm] = []
    pending = list(plan.vms)
    while pending:
        ready = [vm for vm in pending if set(vm.after) <= done]
        if not ready:
            cycle = ", ".join(vm.name for vm in pending)
            raise Invalid(f"the after dependencies form a cycle among: {cycle}", "vms")
        first = ready[0]
        order.append(first)
        done.add(first.name)
        pending.remove(first)
    return order


def load_plan(path: Path) -> RecoveryPlan:
    plan: RecoveryPlan = build_document(RecoveryPlan, read_table(path), str(path))
    return plan


def plan_from_table(table: dict[str, Any], source: str) -> RecoveryPlan:
    plan: RecoveryPlan = build_document(RecoveryPlan, table, source)
    return plan
