"""The vSphere tags of VMs, for policies that select by tag.

Tags live in vCenter's vAPI REST service, not in the SOAP API the rest of the appliance
speaks: a session is opened at `/rest/com/vmware/cis/session` with the connection's
user and password (basic auth) and TLS settings, then every tag, its category and the
objects attached to each are listed: one call per tag and category plus three, whatever
the number of VMs, so the scheduler can afford it on each look at the inventory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx

from appliance.config_checks import Secret
from appliance.errors import VsphereError, VsphereUnreachable
from appliance.vsphere.client import tls_context
from appliance.vsphere.inventory import VmInfo
from appliance.vsphere.settings import VsphereSettings

_CIS = "/rest/com/vmware/cis"
_SESSION_HEADER = "vmware-api-session-id"


def vm_tags(settings: VsphereSettings, password: Secret) -> dict[str, tuple[str, ...]]:
    """Each tagged VM's tags as "Category:Tag", by the VM's managed object id (e.g. "vm-42")."""
    with _session(settings, password) as client:
        tag_ids: list[str] = _value(client, "GET", "/tagging/tag")
        if not tag_ids:
            return {}
        categories: dict[str, str] = {}
        names: dict[str, str] = {}
        for tag_id in tag_ids:
            tag = _value(client, "GET", f"/tagging/tag/id:{tag_id}")
            category = tag["category_id"]
            if category not in categories:
                categories[category] = _value(client, "GET", f"/tagging/category/id:{category}")["name"]
            names[tag_id] = f"{categories[category]}:{tag['name']}"
        attached = _value(client, "POST", "/tagging/tag-association?~action=list-attached-objects-on-tags",
                          {"tag_ids": tag_ids})
    found: dict[str, list[str]] = {}
    for entry in attached:
        for item in entry.get("object_ids") or []:
            if item.get("type") == "VirtualMachine":
                found.setdefault(item["id"], []).append(names[entry["tag_id"]])
    return {moid: tuple(sorted(tags)) for moid, tags in found.items()}


def with_tags(vms: Sequence[VmInfo], tags: dict[str, tuple[str, ...]]) -> list[VmInfo]:
    """The VMs with their tags filled in from `vm_tags`."""
    return [dataclasses.replace(vm, tags=tags.get(vm.moid, ())) for vm in vms]


@contextmanager
def _session(settings: VsphereSettings, password: Secret) -> Iterator[httpx.Client]:
    parts = urlsplit(settings.url)
    base = f"{parts.scheme}://{parts.netloc}{_CIS}"
    with httpx.Client(base_url=base, verify=tls_context(settings), timeout=settings.timeout) as client:
        try:
            answer = client.post("/session", auth=(settings.user, password.reveal()))
        except httpx.HTTPError as exc:
            raise VsphereUnreachable(f"{settings.url}: cannot reach the vAPI service for tags: {exc}") from None
        if answer.status_code in (401, 403):
            raise VsphereUnreachable(f"{settings.url}: vAPI login as {settings.user!r} refused (reading tags)")
        client.headers[_SESSION_HEADER] = _json(answer, "log in to the vAPI service")["value"]
        try:
            yield client
        finally:
            try:
                client.delete("/session")
            except httpx.HTTPError:
                pass  # the session times out on its own; a logout that fails changes nothing


def _value(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    try:
        answer = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise VsphereUnreachable(f"list tags ({path}): connection to vSphere failed: {exc}") from None
    return _json(answer, f"list tags ({path})")["value"]


def _json(answer: httpx.Response, what: str) -> Any:
    if answer.status_code != 200:
        raise VsphereError(f"{what}: HTTP {answer.status_code} {answer.text[:200]}")
    try:
        return answer.json()
    except ValueError:
        raise VsphereError(f"{what}: the answer is not JSON") from None
