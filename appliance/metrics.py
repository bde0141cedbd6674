"""Prometheus metrics of a serving appliance: one registry, fed by hooks, read at scrape.

`ApplianceMetrics` owns its own `CollectorRegistry` (never the process-global one, so
two appliances in one test process do not share counters). Its values come from three
kinds of source, each reported exactly once:

- Events, told by the layers as they happen through hooks those layers define, so none
  of them imports this module: NFS and MOUNT calls (`observe_call`, an
  `nfs_export.rpc.CallObserver`), FUSE operations (`observe_op`, the FUSE adapter's
  `OpObserver`), bytes moved in sessions (`session_read` / `session_written`, the
  datastore's `SessionIo`), bytes read by an ingest (`count_ingest`, ingest's
  `ReadCounter`) and each replication job's figures (`replicated`, the replication
  service's `ReplicationObserver`).
- Counters the store keeps anyway (chunk-cache hits and misses by tier, chunk loads, loads
  refused by a failed checksum: `ReadPath.statistics()`; hydration progress), read at scrape
  time by custom collectors (`metrics_reads`) instead of being mirrored into second counters.
- Space: `store_statistics` scans the LMDB index, so its result is kept for
  `space_ttl` seconds; sessions and their overlay sizes are cheap and read every time.

`serve_metrics` answers ``GET /metrics`` over HTTP/1.1 on the trio loop. The exposition
is rendered in a worker thread, one scrape at a time, so a store scan never stalls the
loop that serves NFS and FUSE. It is a small responder of its own rather than
prometheus_client's WSGI/ASGI app: the WSGI server runs in threads of its own, and the
ASGI app needs an ASGI server, a dependency for one read-only endpoint.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from appliance.datastore.datastore import Datastore
from appliance.datastore.layout import overlay_path
from appliance.datastore.sessions import SessionInfo, list_sessions
from appliance.hydration import Hydrator
from appliance.jobs import JobRunner
from appliance.metrics_reads import ReadPathCollector
from appliance.protection.job import BackupResult
from appliance.replication.remote import Link
from appliance.replication.run import ReplicationReport
from appliance.store.repository import Store
from appliance.store.stats import StoreStatistics, store_statistics
from nfs_export.mount import MOUNT_PROGRAM
from nfs_export.rpc_tcp import listen_tcp
from nfs_export.nfs3_types import NFS_PROGRAM
from nfs_export.rpc import CallOutcome

log = logging.getLogger(__name__)

#: How long a store scan is reused: it reads every point and the whole chunk index, and space moves slowly.
SPACE_TTL_SECONDS = 30.0
#: Latency buckets from a cache hit answered on loopback (~50 µs) to the seconds of a
#: cold read or an fsync on a busy disk; the client library's defaults start at 5 ms,
#: where most NFS and FUSE answers are already done.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
PROGRAM_LABELS = {NFS_PROGRAM: "nfs", MOUNT_PROGRAM: "mount"}


class ApplianceMetrics:
    """Every metric the appliance exports, and the hooks that feed them."""

    def __init__(self, space_ttl: float = SPACE_TTL_SECONDS) -> None:
        self.registry = CollectorRegistry()
        self._space_ttl = space_ttl
        self._calls = _CallLatencies()
        self.registry.register(self._calls)
        self._fuse = Histogram("appliance_fuse_request_seconds", "FUSE operations by name: time to answer one.",
                               ["op"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._rpc_errors = Counter("appliance_rpc_errors_total", "RPC messages not answered SUCCESS, by kind "
                                   "(the reply status, or why none was sent).", ["kind"], registry=self.registry)
        for kind in CallOutcome:
            if kind is not CallOutcome.SUCCESS:
                self._rpc_errors.labels(kind=kind)  # present at 0, so rate() sees the first error
        self._session_read = Counter("appliance_session_read_bytes_total", "Bytes read from a session's files "
                                     "(disks through their overlay, and plain files).", ["session"],
                                     registry=self.registry)
        self._session_written = Counter("appliance_session_written_bytes_total", "Bytes written to a session's "
                                        "files.", ["session"], registry=self.registry)
        #: Each session's series, found once: `labels()` costs a microsecond, paid on every NFS READ and WRITE.
        self._session_read_children: dict[str, Counter] = {}
        self._session_written_children: dict[str, Counter] = {}
        self._ingest = Counter("appliance_ingest_bytes_total", "Bytes read from backup sources by ingests that "
                               "ran in this process.", registry=self.registry)
        self._replicated = Counter("appliance_replication_bytes_total", "Bytes of replication jobs run by this "
                                   "process, by remote, direction and kind: wire_sent/wire_received crossed the "
                                   "network, chunks are the stored chunk records sent, logical the disk bytes of "
                                   "the points sent.", ["remote", "direction", "kind"], registry=self.registry)
        self._replicated_points = Counter("appliance_replication_points_total", "Restore points replicated by "
                                          "this process.", ["remote", "direction"], registry=self.registry)
        self._replication_success = Gauge("appliance_replication_last_success_timestamp_seconds", "When the last "
                                          "replication job with a remote succeeded (alert on its age: the second "
                                          "site's RPO).", ["remote", "direction"], registry=self.registry)

        self._backup_bytes = Counter("appliance_backup_bytes_total", "Bytes of vSphere backups run by this "
                                     "process, by kind: read crossed the network from ESXi, changed is what CBT "
                                     "reported (or the whole disk of a full backup), stored the new pack bytes.",
                                     ["kind"], registry=self.registry)
        self._backups = Counter("appliance_backups_total", "vSphere backup jobs ended, by result.", ["result"],
                                registry=self.registry)
        self._backup_seconds = Gauge("appliance_backup_last_duration_seconds", "How long the last backup of a VM "
                                     "took, snapshot to snapshot removal.", ["vm"], registry=self.registry)

    def watch(self, datastore: Datastore, hydrator: Hydrator | None = None) -> None:
        """Export the store's cache, integrity and space figures and the datastore's sessions.

        Once per datastore: the collector declares no names, so the registry cannot
        refuse a second one, whose series would appear twice.
        """
        self.registry.register(_DatastoreCollector(datastore, self._space_ttl))
        self.registry.register(ReadPathCollector(datastore.read_path, hydrator))

    def watch_jobs(self, jobs: JobRunner) -> None:
        """Export how many jobs (instant boots, recovery groups, migrations, stops) are in each state."""
        self.registry.register(_JobsCollector(jobs))

    def observe_call(self, program: int, procedure: str, seconds: float, outcome: str) -> None:
        """`nfs_export.rpc.CallObserver`: one RPC message the dispatcher ended."""
        if procedure:
            self._calls.observe(program, procedure, seconds)
        if outcome is not CallOutcome.SUCCESS:
            self._rpc_errors.labels(kind=outcome).inc()

    def observe_op(self, op: str, seconds: float) -> None:
        """`appliance.fuse_adapter.OpObserver`: one FUSE operation answered."""
        self._fuse.labels(op=op).observe(seconds)

    def session_read(self, session: str, size: int) -> None:
        """`appliance.datastore.datastore.SessionIo`: bytes read from a session."""
        _session_child(self._session_read, self._session_read_children, session).inc(size)

    def session_written(self, session: str, size: int) -> None:
        """`appliance.datastore.datastore.SessionIo`: bytes written to a session."""
        _session_child(self._session_written, self._session_written_children, session).inc(size)

    def count_ingest(self, size: int) -> None:
        """`appliance.ingest.backup.ReadCounter`: bytes an ingest read from its source."""
        self._ingest.inc(size)

    def replicated(self, remote: str, direction: str, report: ReplicationReport, link: Link,
                   succeeded: bool) -> None:
        """`appliance.replication.service.ReplicationObserver`: one replication job ended."""
        for kind, amount in (("wire_sent", link.sent), ("wire_received", link.received),
                             ("chunks", report.chunk_bytes_sent), ("logical", report.logical_bytes)):
            self._replicated.labels(remote=remote, direction=direction, kind=kind).inc(amount)
        self._replicated_points.labels(remote=remote, direction=direction).inc(len(report.points_sent))
        if succeeded:
            self._replication_success.labels(remote=remote, direction=direction).set_to_current_time()

    def backed_up(self, vm: str, result: BackupResult | None, seconds: float, bytes_read: int) -> None:
        """`appliance.protection.service.BackupObserver`: one backup job ended (`result` None: it failed)."""
        self._backup_bytes.labels(kind="read").inc(bytes_read)
        self._backups.labels(result="failed" if result is None else "succeeded").inc()
        self._backup_seconds.labels(vm=vm).set(seconds)
        if result is not None:
            self._backup_bytes.labels(kind="changed").inc(sum(plan.changed_bytes for plan in result.disks))
            self._backup_bytes.labels(kind="stored").inc(result.point.stats.get("new_stored_bytes", 0))

    def render(self) -> bytes:
        """The text exposition of every metric. Blocks (a store scan): call it off the loop."""
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class _Space:
    statistics: StoreStatistics
    taken: float  # time.monotonic() of the scan


def _session_child(metric: Counter, children: dict[str, Counter], session: str) -> Counter:
    child = children.get(session)
    if child is None:
        child = children[session] = metric.labels(session=session)
    return child


class _CallLatencies:
    """`appliance_nfs_request_seconds`: plain bucket counts, made a histogram at each scrape.

    prometheus_client's Histogram takes a lock for its sum and another for the bucket, on
    every call; with tens of thousands of NFS calls a second that was 5% of a 4 KiB
    READ's time. Calls are observed on the event loop only, and a scrape (in a worker
    thread) copies each series in one step, so no lock is needed.
    """

    def __init__(self) -> None:
        #: (program, procedure) -> a count per bucket of LATENCY_BUCKETS and one for +Inf, then the sum.
        self._series: dict[tuple[int, str], list[float]] = {}

    def observe(self, program: int, procedure: str, seconds: float) -> None:
        series = self._series.get((program, procedure))
        if series is None:
            series = self._series[program, procedure] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        series[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily("appliance_nfs_request_seconds", "NFS and MOUNT calls answered by a "
                                       "procedure, by program and procedure: time from the record to its encoded "
                                       "reply.", labels=["program", "procedure"])
        for (program, procedure), series in sorted(self._series.items()):
            snapshot = list(series)
            cumulative = list(itertools.accumulate(snapshot[:-1]))
            buckets = [(repr(bound), count) for bound, count in zip(LATENCY_BUCKETS, cumulative)]
            buckets.append(("+Inf", cumulative[-1]))
            family.add_metric([PROGRAM_LABELS.get(program, str(program)), procedure], buckets, snapshot[-1])
        yield family


class _JobsCollector:
    def __init__(self, jobs: JobRunner) -> None:
        self._jobs = jobs

    def collect(self) -> Iterator[Metric]:
        counts = collections.Counter((job.kind, job.state.value) for job in self._jobs.all())
        family = GaugeMetricFamily("appliance_jobs", "Jobs this appliance ran or runs (the last few hundred), "
                                   "by kind and state.", labels=["kind", "state"])
        for (kind, state), count in sorted(counts.items()):
            family.add_metric([kind, state], count)
        yield family


class _DatastoreCollector:
    """Reads the store's and the datastore's own counters and sizes at each scrape."""

    def __init__(self, datastore: Datastore, space_ttl: float) -> None:
        self._datastore = datastore
        self._space_ttl = space_ttl
        self._space: _Space | None = None
        self._space_lock = threading.Lock()

    def _store_space(self) -> StoreStatistics:
        """The last scan if it is fresh enough, else a new one (one scan at a time)."""
        with self._space_lock:
            now = time.monotonic()
            if self._space is None or now - self._space.taken >= self._space_ttl:
                self._space = _Space(store_statistics(self._datastore.store), now)
            return self._space.statistics

    def collect(self) -> Iterator[Metric]:
        yield from _space_metrics(self._store_space())
        yield from _session_metrics(self._datastore.store, list_sessions(self._datastore.namespace))
        yield _newest_point_ages(self._datastore.store)


def _space_metrics(space: StoreStatistics) -> Iterator[Metric]:
    for name, text, value in (
        ("appliance_store_logical_bytes", "Sum of every restore point's disk sizes.", space.logical_bytes),
        ("appliance_store_referenced_bytes", "Non-zero chunk bytes every point references, before dedup.",
         space.referenced_bytes),
        ("appliance_store_unique_bytes", "Uncompressed bytes of the distinct stored chunks.", space.unique_bytes),
        ("appliance_store_stored_bytes", "Bytes of committed pack files on disk.", space.stored_bytes),
        ("appliance_store_dedup_ratio", "Referenced bytes per unique byte.", space.dedup_ratio),
        ("appliance_store_compression_ratio", "Unique bytes per stored byte.", space.compression_ratio),
        ("appliance_store_points", "Restore points in the catalog.", space.points),
        ("appliance_store_chunks", "Distinct chunks in the store.", space.chunks),
    ):
        yield GaugeMetricFamily(name, text, value=value)


def _session_metrics(store: Store, sessions: list[SessionInfo]) -> Iterator[Metric]:
    yield GaugeMetricFamily("appliance_sessions", "Sessions (writable views of restore points).",
                            value=len(sessions))
    overlay = GaugeMetricFamily("appliance_session_overlay_bytes", "Disk space the copy-on-write overlays of a "
                                "session's disks occupy.", labels=["session"])
    for info in sessions:
        overlay.add_metric([info.name], sum(_allocated_bytes(overlay_path(store, info.inode, disk))
                                            for disk in range(len(info.disks))))
    yield overlay


def _newest_point_ages(store: Store) -> Metric:
    """Per VM, the age of its newest point: alert when it passes the RPO a policy promises."""
    ages = GaugeMetricFamily("appliance_vm_newest_point_age_seconds", "Seconds since the newest restore point "
                             "of each VM in the catalog was taken.", labels=["vm"])
    with store.env.begin() as txn:
        newest: dict[str, float] = {}
        for point in store.catalog.points(txn):
            newest[point.vm] = max(newest.get(point.vm, 0.0), point.created)
    now = time.time()
    for vm, created in sorted(newest.items()):
        ages.add_metric([vm], max(0.0, now - created))
    return ages


def _allocated_bytes(directory: Path) -> int:
    """Bytes the files in `directory` occupy (0 if a concurrent delete removed it)."""
    try:
        with os.scandir(directory) as entries:
            return sum(entry.stat().st_blocks * 512 for entry in entries if entry.is_file())
    except FileNotFoundError:
        return 0


# ----- the HTTP endpoint ------------------------------------------------------------------

METRICS_PATH = "/metrics"
#: Request line and headers together; a scraper sends a few hundred bytes.
MAX_REQUEST_HEAD = 8192
#: A client that has not sent its request by then is dropped (a stalled connection
#: must not hold a task forever).
REQUEST_TIMEOUT = 10.0
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_HTTP_VERSION = re.compile(r"HTTP/1\.[01]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.headers = status, reason, headers


async def _read_head(stream: trio.SocketStream) -> str | None:
    """The request line and header lines, or None if the client closed first."""
    head = bytearray()
    while (end := _END_OF_HEAD.search(head)) is None:
        if len(head) > MAX_REQUEST_HEAD:
            raise _HttpError(431, "Request Header Fields Too Large")
        chunk = await stream.receive_some(MAX_REQUEST_HEAD)
        if not chunk:
            return None
        head += chunk
    if end.start() > MAX_REQUEST_HEAD:
        raise _HttpError(431, "Request Header Fields Too Large")
    return head[: end.start()].decode("latin-1")


def _route(head: str) -> str:
    """Check the request (RFC 9112 syntax, Host present); its method if it is for us."""
    request_line, *header_lines = re.split(r"\r?\n", head)
    parts = request_line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _HTTP_VERSION.fullmatch(parts[2]):
        raise _HttpError(400, "Bad Request")
    method, target, version = parts
    names = set()
    for line in header_lines:
        name, colon, _ = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _HttpError(400, "Bad Request")
        names.add(name.lower())
    if version == "HTTP/1.1" and "host" not in names:
        raise _HttpError(400, "Bad Request")
    if urlsplit(target).path != METRICS_PATH:
        raise _HttpError(404, "Not Found")
    if method not in ("GET", "HEAD"):
        raise _HttpError(405, "Method Not Allowed", (("Allow", "GET, HEAD"),))
    return method


def _response(status: int, reason: str, content_type: str, body: bytes, headers: tuple[tuple[str, str], ...] = (),
              *, send_body: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
             "Connection: close", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if send_body else b"")


async def _respond(metrics: ApplianceMetrics, render_limiter: trio.CapacityLimiter,
                   stream: trio.SocketStream) -> bytes | None:
    """The response to the request on `stream`; None if no whole request came in time."""
    head = None
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            head = await _read_head(stream)
        if head is None:
            return None
        method = _route(head)
    except _HttpError as exc:
        return _response(exc.status, exc.reason, "text/plain; charset=utf-8", f"{exc.reason}\n".encode(),
                         exc.headers)
    try:
        body = await trio.to_thread.run_sync(metrics.render, limiter=render_limiter)
    except Exception:
        log.exception("rendering metrics failed")
        return _response(500, "Internal Server Error", "text/plain; charset=utf-8", b"Internal Server Error\n")
    return _response(200, "OK", CONTENT_TYPE_LATEST, body, send_body=method == "GET")


async def _answer(metrics: ApplianceMetrics, render_limiter: trio.CapacityLimiter,
                  stream: trio.SocketStream) -> None:
    """One request, one response, then close (no keep-alive: scrapes are seconds apart)."""
    try:
        response = await _respond(metrics, render_limiter, stream)
        if response is not None:
            await stream.send_all(response)
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the scraper went away
    except Exception:
        # One connection's trouble must never end the listener, nor the serve nursery it runs in.
        log.exception("metrics request failed")
    finally:
        await stream.aclose()


async def serve_metrics(metrics: ApplianceMetrics, *, host: str, port: int,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on one TCP address until cancelled; reports the bound port."""
    listeners = await listen_tcp(host, port)
    task_status.started(listeners[0].socket.getsockname()[1])
    # One render at a time: concurrent scrapes wait for a thread rather than each
    # taking one from the pool FUSE's VFS calls use.
    await trio.serve_listeners(partial(_answer, metrics, trio.CapacityLimiter(1)), listeners)
