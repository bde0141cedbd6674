"""Another appliance, over its HTTP API, as either end of a replication.

The connection is https only, to a certificate pinned by fingerprint
(`appliance.api.tls.pinned_context`), with the remote's API token. Every body that
crosses the link goes through one `Link`, which meters the bytes (the job's
wire-bytes figure) and paces them through the token bucket.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from appliance.api.client import ApiClient
from appliance.api.tls import pinned_context
from appliance.errors import ApplianceError, RemoteRefused, StoreBusy
from appliance.replication.wire import StoreIdentity, decode_ids, encode_ids, encode_pairs
from appliance.store.catalog import RestorePoint
from appliance.store.manifests import Manifest, decode_manifest, encode_manifest

BUSY_RETRIES = 8
BUSY_BACKOFF_SECONDS = 0.5


class TokenBucket:
    """Paces bytes to `rate` per second, with bursts of at most one second's worth; thread-safe."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._tokens = rate
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, amount: int) -> None:
        """Wait until `amount` bytes may pass (a body larger than a burst waits for its whole share)."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            self._tokens -= amount
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


@dataclass
class Link:
    """What one job sent and received over the network, and its pace."""

    limit: TokenBucket | None = None
    sent: int = 0
    received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, sent: int, received: int) -> None:
        with self._lock:
            self.sent += sent
            self.received += received
        if self.limit is not None:
            self.limit.take(sent + received)


@dataclass(frozen=True)
class RemoteSettings:
    """Where another appliance is and how this one proves who it talks to."""

    name: str
    url: str
    token: str
    fingerprint: str
    rate_limit: float | None = None  # bytes per second on the link, both directions together
    streams: int = 4


def link_for(settings: RemoteSettings) -> Link:
    """A fresh meter for one job with `settings`' pace."""
    return Link(None if settings.rate_limit is None else TokenBucket(settings.rate_limit))


class RemoteAppliance:
    """A remote appliance's replication resources; speaks both `SourceEnd` and `TargetEnd`."""

    def __init__(self, settings: RemoteSettings, link: Link) -> None:
        self.name = settings.name
        self._client = ApiClient(settings.url.rstrip("/"), settings.token,
                                 pinned_context(settings.url, settings.fingerprint))
        self._link = link

    def close(self) -> None:
        self._client.close()

    def _binary(self, method: str, path: str, content: bytes | None = None,
                params: list[tuple[str, str]] | None = None, content_type: str = "application/octet-stream") -> bytes:
        """One binary exchange, metered, and tried again while the remote store is busy."""
        for attempt in range(BUSY_RETRIES):
            try:
                answer = self._client.exchange(method, path, content, params, content_type)
            except StoreBusy:
                if attempt == BUSY_RETRIES - 1:
                    raise
                time.sleep(BUSY_BACKOFF_SECONDS * 2**attempt)
                continue
            self._link.count(len(content or b""), len(answer))
            return answer
        raise AssertionError("unreachable: the last attempt raises")

    def identity(self) -> StoreIdentity:
        try:
            doc = self._client.call("GET", "/replication/identity")
        except ApplianceError as exc:
            raise RemoteRefused(f"remote {self.name!r}: {exc}") from None
        return StoreIdentity(str(doc["store_id"]), int(doc["chunk_size"]), str(doc["chunk_id"]))

    def points(self, vms: list[str] | None) -> list[RestorePoint]:
        queries: list[list[tuple[str, str]] | None] = [None] if vms is None else [[("vm", vm)] for vm in vms]
        docs = [doc for query in queries
                for doc in json.loads(self._binary("GET", "/replication/points", params=query))]
        return sorted((RestorePoint.from_json(doc) for doc in docs), key=lambda point: (point.created, point.id))

    def manifest(self, point_id: str) -> Manifest:
        return decode_manifest(self._binary("GET", f"/replication/points/{point_id}/manifest"))

    def records(self, pairs: list[tuple[bytes, bytes]]) -> bytes:
        return self._binary("POST", "/replication/records", encode_pairs(pairs))

    def missing(self, ids: list[bytes]) -> list[bytes]:
        return decode_ids(self._binary("POST", "/replication/missing", encode_ids(ids)))

    def store(self, frames: bytes) -> int:
        return int(json.loads(self._binary("POST", "/replication/chunks", frames))["stored"])

    def commit(self, manifest: Manifest) -> bool:
        return bool(json.loads(self._binary("POST", "/replication/points", encode_manifest(manifest)))["committed"])


    def remove(self, point_ids: list[str]) -> list[str]:
        body = json.dumps({"points": point_ids}).encode()
        return [str(point_id) for point_id in json.loads(self._binary("POST", "/replication/removals", body,
                                                                    content_type="application/json"))["removed"]]
