"""Which backup policy covers a VM: the one naming it, else one selecting its folder or tag or all, else the default.

The default policy is a fail-safe: a VM no policy selects is backed up under it, never
only listed, so a VM created yesterday is protected before anyone thinks of it. Templates
are never backed up (they do not change, and a snapshot of one is refused anyway).

Two policies naming the same VM is refused by `config check`. Folders, tags and `all`
are only known at run time, so a VM they put under two policies cannot be refused: the
policy that names it wins, else the first in file order, and `conflicts` says so for
the log.
"""

from __future__ import annotations

from collections.abc import Sequence

from appliance.config import PolicyConfig
from appliance.vsphere.inventory import VmInfo


def covering(vm: VmInfo, policies: Sequence[PolicyConfig], connection: str | None = None) -> list[PolicyConfig]:
    """Every policy selecting `vm`, the one that names it first, then in file order.

    With `connection` (where the VM was listed), only policies of that connection or of
    none (the only one) count.
    """
    scoped = [policy for policy in policies if connection is None or policy.connection in (None, connection)]
    named = [policy for policy in scoped if vm.name in policy.vms]
    return named + [policy for policy in scoped if policy not in named and _selects(policy, vm)]


def policy_for(vm: VmInfo, policies: Sequence[PolicyConfig], default: PolicyConfig,
               connection: str | None = None) -> PolicyConfig | None:
    """The policy `vm` is backed up under; None for a template."""
    if vm.template:
        return None
    found = covering(vm, policies, connection)
    return found[0] if found else default


def conflict(vm: VmInfo, policies: Sequence[PolicyConfig], connection: str | None = None) -> str | None:
    """A line for the log when more than one policy selects `vm`, saying which one won; else None."""
    found = covering(vm, policies, connection)
    if len(found) < 2:
        return None
    others = ", ".join(policy.name for policy in found[1:])
    return f'VM "{vm.name}" is selected by policies {found[0].name}, {others}: backed up under {found[0].name}'


def _selects(policy: PolicyConfig, vm: VmInfo) -> bool:
    return (policy.all
            or any(vm.folder == folder or vm.folder.startswith(folder + "/") for folder in policy.folders)
            or any(_tagged(vm.tags, tag) for tag in policy.tags))


def _tagged(tags: Sequence[str], wanted: str) -> bool:
    """`wanted` is "Category:Tag" (exactly that) or "Tag" (of that name in any category)."""
    if ":" in wanted:
        return wanted in tags
    return any(tag.rpartition(":")[2] == wanted for tag in tags)
