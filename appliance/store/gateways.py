"""Several appliances (gateways) on one bucket: who they are, who collects garbage, what is condemned.

Writers never collide because each gateway writes only names of its own:
- pack ids carry the gateway's number in their top bits (`pack_id_base`), so two
  gateways' packs never share a name, and every PUT is create-only besides;
- a point's manifest is named by its id, which is unique.

Garbage collection is the one job that must see and change everything, so:
- one gateway collects at a time, under a lease: ``gc/lease-<epoch>`` objects made
  create-only, so of two gateways taking epoch N+1 exactly one succeeds; a lease
  expires after its term, so a gateway that dies holding one stops no one for long;
- it deletes in two phases. Packs it no longer needs are first *condemned*
  (``gc/condemned/<time>-<gateway>.json``); only a later collection, a grace period on,
  deletes them, and only after copying out any chunk that a point committed
  meanwhile still needs from them. A gateway committing a point copies such chunks
  itself before it publishes the manifest (`appliance.store.commits`), and every
  gateway's refresh, which runs more often than the grace period, stops reading from
  condemned packs where a copy exists. So no gateway's new point and no gateway's
  reader loses a pack under it.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

from appliance.errors import StoreBusy, StoreError
from appliance.store.packs import PackBackend

#: Pack ids are `gateway << GATEWAY_SHIFT | counter`: a trillion packs per gateway.
GATEWAY_SHIFT = 40
MAX_GATEWAYS = 1 << 16
_GATEWAYS = "gateways/"
_LEASES = "gc/lease-"
_CONDEMNED = "gc/condemned/"
DEFAULT_LEASE_SECONDS = 3600.0
DEFAULT_GRACE_SECONDS = 3600.0


def pack_id_base(gateway: int) -> int:
    """The first pack id gateway `gateway` hands out (gateway 0, the store's first, starts at 1)."""
    return (gateway << GATEWAY_SHIFT) + 1


def gateway_of(pack_id: int) -> int:
    return pack_id >> GATEWAY_SHIFT


def register_gateway(packs: PackBackend, store_id: str) -> int:
    """Claim the lowest free gateway number in the bucket, create-only, so two joiners never share one."""
    taken = {int(name[len(_GATEWAYS):].removesuffix(".json")) for name in packs.list_objects(_GATEWAYS)
             if name.removesuffix(".json")[len(_GATEWAYS):].isdigit()}
    record = json.dumps({"store_id": store_id, "host": socket.gethostname(), "joined": time.time()}).encode()
    for number in range(MAX_GATEWAYS):
        if number not in taken and packs.put_object(f"{_GATEWAYS}{number:05d}.json", record, create_only=True):
            return number
    raise StoreError(f"the bucket already has {MAX_GATEWAYS} gateways")


def hold_name(point_id: str, gateway: int, holder: str) -> str:
    return f"holds/{point_id}/{gateway:05d}-{holder}"


def holders_elsewhere(packs: PackBackend, point_id: str, gateway: int) -> list[str]:
    """Who on *other* gateways holds a point (a session running from it): prune anywhere keeps it."""
    folder = f"holds/{point_id}/"
    own = f"{gateway:05d}-"
    return [name[len(folder):] for name in packs.list_objects(folder) if not name[len(folder):].startswith(own)]


@dataclass(frozen=True, slots=True)
class Lease:
    epoch: int
    gateway: int
    expires: float


def _leases(packs: PackBackend) -> list[Lease]:
    found = []
    for name in packs.list_objects("gc/"):
        if name.startswith(_LEASES) and name[len(_LEASES):].isdigit():
            data = packs.get_object(name)
            if data is not None:
                doc = json.loads(data)
                found.append(Lease(int(name[len(_LEASES):]), int(doc["gateway"]), float(doc["expires"])))
    return sorted(found, key=lambda lease: lease.epoch)


def take_gc_lease(packs: PackBackend, gateway: int, term: float = DEFAULT_LEASE_SECONDS) -> Lease:
    """The lease to collect garbage, or StoreBusy naming the gateway that holds it."""
    leases = _leases(packs)
    current = leases[-1] if leases else None
    now = time.time()
    if current is not None and current.expires > now and current.gateway != gateway:
        raise StoreBusy(f"gateway {current.gateway} is collecting garbage in this bucket (lease until "
                        f"{time.strftime('%H:%M:%S', time.localtime(current.expires))})")
    lease = Lease((current.epoch + 1) if current else 1, gateway, now + term)
    body = json.dumps({"gateway": gateway, "expires": lease.expires}).encode()
    if not packs.put_object(f"{_LEASES}{lease.epoch:012d}", body, create_only=True):
        raise StoreBusy("another gateway took the garbage-collection lease at the same moment")
    for old in leases:
        packs.delete_object(f"{_LEASES}{old.epoch:012d}")
    return lease


def release_gc_lease(packs: PackBackend, lease: Lease) -> None:
    """End the lease early by publishing an expired successor, so the next collector need not wait."""
    body = json.dumps({"gateway": lease.gateway, "expires": 0.0}).encode()
    if packs.put_object(f"{_LEASES}{lease.epoch + 1:012d}", body, create_only=True):
        packs.delete_object(f"{_LEASES}{lease.epoch:012d}")


@dataclass(frozen=True, slots=True)
class Condemned:
    """Packs one collection no longer needed, and when: deleted a grace period later."""

    name: str
    when: float
    packs: frozenset[int]


def condemn(packs: PackBackend, gateway: int, pack_ids: set[int]) -> None:
    if pack_ids:
        now = time.time()
        body = json.dumps({"condemned_at": now, "packs": sorted(pack_ids)}).encode()
        packs.put_object(f"{_CONDEMNED}{int(now * 1e9):020d}-{gateway:05d}.json", body, create_only=True)


def condemned(packs: PackBackend) -> list[Condemned]:
    found = []
    for name in packs.list_objects(_CONDEMNED):
        data = packs.get_object(name)
        if data is not None:
            doc = json.loads(data)
            found.append(Condemned(name, float(doc["condemned_at"]), frozenset(int(p) for p in doc["packs"])))
    return found


def condemned_packs(packs: PackBackend) -> set[int]:
    return set().union(*(record.packs for record in condemned(packs)))


def forget_condemned(packs: PackBackend, record: Condemned) -> None:
    """Once its packs are deleted (or were rescued), a record has nothing left to say."""
    packs.delete_object(record.name)
