"""Metrics (`appliance.metrics`): real NFS and FUSE traffic in, a real /metrics scrape out.

The appliance runs in-process as `serve` runs it: NFS and the metrics endpoint in a
background trio loop over one datastore whose hooks feed one `ApplianceMetrics`. The
traffic comes from libnfs (`nfs-cat`, `nfs-ls`, `nfs-cp`), raw RPC records and a FUSE
mount; every check scrapes ``/metrics`` over HTTP and parses it with prometheus_client's
own parser, comparing deltas with the traffic sent.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from appliance.datastore import sessions
from appliance.datastore.datastore import Datastore
from appliance.fuse_adapter import serve_fuse
from appliance.ingest.backup import backup
from appliance.jobs import JobRunner
from appliance.metrics import ApplianceMetrics, serve_metrics
from appliance.store import ReadPath, Store, init_store, open_store
from appliance.store.stats import StoreStatistics, store_statistics
from nfs_export import NfsService, serve_nfs
from nfs_export.rpc import RpcDispatcher
from nfs_export.xdr import Encoder
from tests.conftest import SMALL_CHUNK, pack_bytes, replace_pack, write_image
from tests.test_nfs3 import FILE_SYNC, OK, NfsClient
from tests.test_nfs_rpc import (
    DISPATCH_CASES,
    TEST_PROGRAM,
    BlockingRpc,
    TestProgram,
    background,
    call_record,
    framed,
    parse_reply,
)
from tests.test_nfs_server import run, with_client
from tests.test_verify import flipped

DISK_BYTES = 6 << 20
SECRET = b"m" * 32
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"


@dataclass
class Appliance:
    store: Store
    datastore: Datastore
    metrics: ApplianceMetrics
    service: NfsService
    metrics_port: int
    image: Path
    point: str
    work: Path

    def url(self, path: str) -> str:
        return (f"nfs://127.0.0.1{path}?nfsport={self.service.nfs_port}&mountport={self.service.mount_port}"
                "&version=3")


async def serve_appliance(datastore: Datastore, metrics: ApplianceMetrics,
                          task_status: trio.TaskStatus[tuple[NfsService, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """NFS and /metrics in one nursery, wired as `appliance serve` wires them."""
    async with trio.open_nursery() as nursery:
        service = await nursery.start(partial(serve_nfs, datastore, handle_secret=SECRET, nfs_port=0, mount_port=0,
                                              register_portmap=False, observe_call=metrics.observe_call))
        port = await nursery.start(partial(serve_metrics, metrics, host="127.0.0.1", port=0))
        task_status.started((service, port))


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """A store with a point of vm1 and a session s1, served over NFS with metrics."""
    work = tmp_path_factory.mktemp("metrics")
    image = write_image(work / "disk.img", DISK_BYTES, seed=7)
    init_store(work / "store", chunk_size=SMALL_CHUNK)
    metrics = ApplianceMetrics()
    with open_store(work / "store") as store, store.reader_lock(), ReadPath(store) as read_path:
        point = backup(store, "vm1", [image], count_read=metrics.count_ingest)
        datastore = Datastore(store, read_path, session_io=metrics)
        metrics.watch(datastore)
        metrics.watch_jobs(JobRunner(work / "jobs"))
        sessions.create_session(store, datastore.namespace, read_path, "vm1", "latest", "s1")
        try:
            with background(partial(serve_appliance, datastore, metrics)) as (service, port):
                yield Appliance(store, datastore, metrics, service, port, image, point.id, work)
        finally:
            datastore.close()


class Scrape:
    """One parsed /metrics answer: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a series not exported (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def labels_of(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in self.samples if sample == name and label in dict(labels)}


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        return Scrape(response.read().decode())


def nfs_count(after: Scrape, before: Scrape, procedure: str, program: str = "nfs") -> float:
    name = "appliance_nfs_request_seconds_count"
    return after(name, program=program, procedure=procedure) - before(name, program=program, procedure=procedure)


# ----- NFS --------------------------------------------------------------------------------


def test_nfs_calls_are_counted_and_timed_per_procedure(appliance: Appliance) -> None:
    before = scrape(appliance.metrics_port)
    flat = run("nfs-cat", appliance.url(f"/restore-points/vm1/{appliance.point}/vm1-flat.vmdk"))
    assert flat.returncode == 0 and flat.stdout == appliance.image.read_bytes(), flat.stderr
    listing = run("nfs-ls", appliance.url("/sessions/s1"))
    assert listing.returncode == 0 and b"vm1-flat.vmdk" in listing.stdout, listing.stderr
    after = scrape(appliance.metrics_port)
    assert nfs_count(after, before, "READ") >= DISK_BYTES / (1 << 20)  # FSINFO offers 1 MiB at most per READ
    assert nfs_count(after, before, "LOOKUP") >= 1
    assert nfs_count(after, before, "GETATTR") >= 1
    assert nfs_count(after, before, "READDIRPLUS") + nfs_count(after, before, "READDIR") >= 1
    assert nfs_count(after, before, "MNT", program="mount") == 2
    read_seconds = after("appliance_nfs_request_seconds_sum", program="nfs", procedure="READ")
    assert read_seconds > before("appliance_nfs_request_seconds_sum", program="nfs", procedure="READ")
    bucket = after("appliance_nfs_request_seconds_bucket", program="nfs", procedure="READ", le="+Inf")
    assert bucket == after("appliance_nfs_request_seconds_count", program="nfs", procedure="READ")
    assert all(after("appliance_rpc_errors_total", kind=kind) == before("appliance_rpc_errors_total", kind=kind)
               for kind in after.labels_of("appliance_rpc_errors_total", "kind"))


NFS, NFS_V3 = 100003, 3
BAD_AUTH = bytes.fromhex("0000000600000000" + "00" * 8)
#: Malformed or unanswerable calls sent on the wire, and the error kind each must count as.
BAD_CALLS = [
    ("garbage_args", call_record(0xB1, NFS, NFS_V3, 1, b"\0\0\0")),  # GETATTR: handle length cut short
    ("garbage_args", call_record(0xB2, NFS, NFS_V3, 6)),  # READ without arguments
    ("garbage_args", call_record(0xB3, NFS, NFS_V3, 0)[:20]),  # the call header cut short
    ("proc_unavail", call_record(0xB4, NFS, NFS_V3, 99)),
    ("prog_unavail", call_record(0xB5, 0x2000_0099, 1, 0)),
    ("prog_mismatch", call_record(0xB6, NFS, 2, 0)),
    ("auth_error", call_record(0xB7, NFS, NFS_V3, 0)[:24] + BAD_AUTH),
    ("rpc_mismatch", call_record(0xB8, NFS, NFS_V3, 0, rpc_version=3)),
]


def test_malformed_calls_count_as_rpc_errors_by_kind(appliance: Appliance) -> None:
    before = scrape(appliance.metrics_port)
    rpc = BlockingRpc(appliance.service.nfs_port)
    try:
        for _, record in BAD_CALLS:
            rpc.send(framed(record))
            assert parse_reply(rpc.receive() or b"").xid == int.from_bytes(record[:4], "big")
    finally:
        rpc.close()
    after = scrape(appliance.metrics_port)
    for kind in {kind for kind, _ in BAD_CALLS}:
        sent = sum(1 for k, _ in BAD_CALLS if k == kind)
        got = after("appliance_rpc_errors_total", kind=kind) - before("appliance_rpc_errors_total", kind=kind)
        assert got == sent, kind
    # Calls that reached a procedure are timed under it, even when their arguments were garbage.
    assert nfs_count(after, before, "GETATTR") == 1 and nfs_count(after, before, "READ") == 1


@pytest.mark.trio
async def test_the_dispatcher_reports_every_outcome() -> None:
    """Outcomes without a reply on the wire: not a call, and a record over the size limit."""
    metrics = ApplianceMetrics()
    dispatcher = RpcDispatcher([TestProgram().program()], metrics.observe_call)
    for _, record, _ in DISPATCH_CASES:
        await dispatcher.dispatch(record, "127.0.0.1", Encoder())
    assert not await dispatcher.dispatch(call_record(5, TEST_PROGRAM, 1, 0)[:4] + b"\0\0\0\x01", "127.0.0.1",
                                         Encoder())
    dispatcher.record_oversized()
    scraped = Scrape(metrics.render().decode())
    expected = {"rpc_mismatch": 1, "prog_unavail": 1, "prog_mismatch": 1, "proc_unavail": 1, "garbage_args": 3,
                "system_err": 1, "auth_error": 2, "not_a_call": 1, "record_too_large": 1}
    assert {kind: scraped("appliance_rpc_errors_total", kind=kind) for kind in expected} == expected
    statistics = dispatcher.statistics()  # the dispatcher's own counters agree
    assert (statistics.garbage, statistics.auth_errors, statistics.system_errors, statistics.unavailable,
            statistics.oversized_records) == (4, 2, 1, 3, 1)


# ----- sessions, cache, store -------------------------------------------------------------


def test_session_bytes_are_counted_per_session(appliance: Appliance) -> None:
    before = scrape(appliance.metrics_port)
    upload = appliance.work / "upload.bin"
    upload.write_bytes(os.urandom(300_000))
    copied = run("nfs-cp", str(upload), appliance.url("/sessions/s1/upload.bin"))
    assert copied.returncode == 0, copied.stderr
    back = run("nfs-cat", appliance.url("/sessions/s1/upload.bin"))
    assert back.stdout == upload.read_bytes()
    disk_write = os.urandom(70_000)

    async def write_disk(client: NfsClient) -> None:
        status, folder = await client.mnt("/sessions/s1")
        assert status == OK
        await client.write(await client.lookup(folder, "vm1-flat.vmdk"), 65_530, disk_write, FILE_SYNC)

    with_client(appliance.service, write_disk)
    after = scrape(appliance.metrics_port)
    written = "appliance_session_written_bytes_total"
    assert after(written, session="s1") - before(written, session="s1") == 300_000 + len(disk_write)
    read = "appliance_session_read_bytes_total"
    assert after(read, session="s1") - before(read, session="s1") == 300_000
    overlay = "appliance_session_overlay_bytes"
    assert after(overlay, session="s1") >= before(overlay, session="s1") + len(disk_write)
    assert after("appliance_sessions") == 1


def test_cache_and_ingest_counters_follow_a_new_point(appliance: Appliance) -> None:
    """A point nobody read yet: the first pass misses the cache, the second only hits."""
    image = write_image(appliance.work / "cache.img", 2 << 20, seed=21)
    before = scrape(appliance.metrics_port)
    point = backup(appliance.store, "vm-cache", [image], count_read=appliance.metrics.count_ingest)
    ingested = scrape(appliance.metrics_port)
    assert ingested("appliance_ingest_bytes_total") - before("appliance_ingest_bytes_total") == \
        point.stats["read_bytes"] > 0
    url = appliance.url(f"/restore-points/vm-cache/{point.id}/vm-cache-flat.vmdk")
    assert run("nfs-cat", url).stdout == image.read_bytes()
    first = scrape(appliance.metrics_port)
    misses, hits = "appliance_chunk_cache_misses_total", "appliance_chunk_cache_hits_total"
    assert first(misses, tier="memory") > ingested(misses, tier="memory")
    assert first("appliance_chunk_loads_total") > ingested("appliance_chunk_loads_total")
    assert run("nfs-cat", url).stdout == image.read_bytes()
    second = scrape(appliance.metrics_port)
    assert second(misses, tier="memory") == first(misses, tier="memory")
    with appliance.store.env.begin() as txn:
        chunk_map = appliance.store.catalog.chunk_map(txn, point, 0)
    stored_chunks = sum(1 for i in range(0, len(chunk_map), 32) if any(chunk_map[i : i + 32]))
    assert second(hits, tier="memory") - first(hits, tier="memory") >= stored_chunks
    assert second("appliance_chunk_cache_bytes", tier="memory") > 0


def test_a_flipped_byte_counts_as_a_checksum_failure(appliance: Appliance) -> None:
    packs_before = set(appliance.store.packs.list_packs())
    image = write_image(appliance.work / "damaged.img", 1 << 20, seed=31)
    point = backup(appliance.store, "vm-damaged", [image])
    (pack_id,) = set(appliance.store.packs.list_packs()) - packs_before
    pack = pack_bytes(appliance.store, pack_id)
    replace_pack(appliance.store, pack_id, flipped(pack, len(pack) - 1))  # the last record's payload
    before = scrape(appliance.metrics_port)
    damaged = run("nfs-cat", appliance.url(f"/restore-points/vm-damaged/{point.id}/vm-damaged-flat.vmdk"))
    assert damaged.returncode != 0 and damaged.stdout != image.read_bytes()
    after = scrape(appliance.metrics_port)
    assert after("appliance_checksum_failures_total") > before("appliance_checksum_failures_total") == 0


def test_store_space_matches_the_store(appliance: Appliance, monkeypatch: pytest.MonkeyPatch) -> None:
    """Space comes from one store scan, reused until it is `space_ttl` old."""
    scans: list[int] = []

    def counted(store: Store) -> StoreStatistics:
        scans.append(1)
        return store_statistics(store)

    monkeypatch.setattr("appliance.metrics.store_statistics", counted)
    for ttl, renders, expected_scans in ((3600.0, 3, 1), (0.0, 2, 2)):
        scans.clear()
        metrics = ApplianceMetrics(space_ttl=ttl)
        metrics.watch(appliance.datastore)
        scraped = [Scrape(metrics.render().decode()) for _ in range(renders)][-1]
        assert len(scans) == expected_scans
    truth = store_statistics(appliance.store)
    assert scraped("appliance_store_logical_bytes") == truth.logical_bytes >= DISK_BYTES
    assert scraped("appliance_store_stored_bytes") == truth.stored_bytes > 0
    assert scraped("appliance_store_unique_bytes") == truth.unique_bytes
    assert scraped("appliance_store_dedup_ratio") == pytest.approx(truth.dedup_ratio)
    assert scraped("appliance_store_points") == truth.points


# ----- FUSE -------------------------------------------------------------------------------


@pytest.mark.trio
async def test_fuse_operations_are_counted(appliance: Appliance, tmp_path: Path) -> None:
    """FUSE in this test's loop (main thread, as `serve` runs it), NFS in the fixture's."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    flat = mountpoint / "restore-points" / "vm1" / appliance.point / "vm1-flat.vmdk"
    note = os.urandom(50_000)

    def use_the_mount() -> bytes:
        (mountpoint / "sessions" / "s1" / "fuse-note.bin").write_bytes(note)  # closed: written back
        return flat.read_bytes()

    before = await trio.to_thread.run_sync(scrape, appliance.metrics_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_fuse, appliance.datastore, mountpoint,
                                    observe_op=appliance.metrics.observe_op))
        data = await trio.to_thread.run_sync(use_the_mount)
        after = await trio.to_thread.run_sync(scrape, appliance.metrics_port)
        nursery.cancel_scope.cancel()
    assert data == appliance.image.read_bytes()

    def fuse_count(op: str) -> float:
        name = "appliance_fuse_request_seconds_count"
        return after(name, op=op) - before(name, op=op)

    assert fuse_count("read") >= DISK_BYTES / (1 << 20)  # the kernel asks at most 1 MiB per read
    assert fuse_count("lookup") >= 4 and fuse_count("write") >= 1 and fuse_count("create") == 1
    written = "appliance_session_written_bytes_total"
    assert after(written, session="s1") - before(written, session="s1") == len(note)


# ----- the HTTP endpoint ------------------------------------------------------------------


def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send raw bytes; the status line, headers and body of the answer (read to close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


HTTP_CASES = [
    ("get", "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", "200 OK"),
    ("http/1.0 with a query", "GET /metrics?name[]=x HTTP/1.0\r\n\r\n", "200 OK"),
    ("absolute form", "GET http://a/metrics HTTP/1.1\r\nHost: a\r\n\r\n", "200 OK"),
    ("other path", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", "404 Not Found"),
    ("sub path", "GET /metrics/x HTTP/1.1\r\nHost: a\r\n\r\n", "404 Not Found"),
    ("post", "POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", "405 Method Not Allowed"),
    ("no host", "GET /metrics HTTP/1.1\r\n\r\n", "400 Bad Request"),
    ("no version", "GET /metrics\r\n\r\n", "400 Bad Request"),
    ("space before colon", "GET /metrics HTTP/1.1\r\nHost : a\r\n\r\n", "400 Bad Request"),
    ("folded header", "GET /metrics HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "400 Bad Request"),
    ("huge header", "GET /metrics HTTP/1.1\r\nHost: a\r\nX: " + "y" * 9000 + "\r\n\r\n",
     "431 Request Header Fields Too Large"),
]


@pytest.mark.parametrize(("request_text", "status"), [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_the_endpoint_answers_only_get_metrics(appliance: Appliance, request_text: str, status: str) -> None:
    got, headers, body = http(appliance.metrics_port, request_text.encode())
    assert got == f"HTTP/1.1 {status}"
    assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)
    if status == "200 OK":
        assert headers["content-type"] == CONTENT_TYPE_LATEST and b"appliance_nfs_request_seconds" in body
    if status.startswith("405"):
        assert headers["allow"] == "GET, HEAD"


def test_head_sends_the_headers_of_get_without_the_body(appliance: Appliance) -> None:
    status, headers, body = http(appliance.metrics_port, b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == "HTTP/1.1 200 OK" and body == b"" and int(headers["content-length"]) > 1000


def test_a_client_that_sends_nothing_does_not_stop_the_endpoint(appliance: Appliance) -> None:
    with socket.create_connection(("127.0.0.1", appliance.metrics_port), timeout=30) as idle:
        idle.sendall(b"GET /metr")  # and stalls: other scrapes go on meanwhile
        assert scrape(appliance.metrics_port)("appliance_sessions") == 1


# ----- the dashboard ----------------------------------------------------------------------


def exported_names(metrics: ApplianceMetrics) -> set[str]:
    """Every series name the registry can export, observed yet or not."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    return {family.name + suffix for family in metrics.registry.collect() for suffix in suffixes[family.type]}


def test_every_dashboard_query_uses_exported_metrics(appliance: Appliance) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    assert len({p["id"] for p in panels}) == len(panels)
    names = exported_names(appliance.metrics)
    queried = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\bappliance_[a-z_]+", target["expr"]))
            assert used and used <= names, (panel["title"], used - names)
            queried |= used
    wanted = {"appliance_nfs_request_seconds_count", "appliance_nfs_request_seconds_bucket",
              "appliance_fuse_request_seconds_count", "appliance_chunk_cache_hits_total",
              "appliance_session_read_bytes_total", "appliance_session_written_bytes_total",
              "appliance_store_logical_bytes", "appliance_store_stored_bytes", "appliance_store_dedup_ratio",
              "appliance_checksum_failures_total", "appliance_rpc_errors_total", "appliance_sessions",
              "appliance_session_overlay_bytes", "appliance_ingest_bytes_total", "appliance_hydration_chunks"}
    assert wanted <= queried, wanted - queried
