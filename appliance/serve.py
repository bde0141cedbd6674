"""Running the datastore: one process, one trio loop, one shared datastore object.

`serve_datastore` runs the NFS server, the FUSE mount (either may be off), the HTTP API,
the metrics endpoint and the job runner as tasks of one nursery over one `Datastore`. `serve_options` turns a
validated configuration file (`appliance.config`) into the options it takes. The process
holds the store's reader lock (GC will not delete packs under it) and the datastore lock
(sessions are not committed or deleted under it). SIGINT/SIGTERM end every task: FUSE
unmounts and NFS unregisters from the portmapper before the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from appliance.api.access import RuntimeInfo, load_token, remove_runtime, token_path, write_runtime
from appliance.api.tls import api_identity
from appliance.protection.scheduler import BackupScheduler, PolicyBackups
from appliance.protection.service import BackupService
from appliance.replication.service import SCHEDULE_CHECK_SECONDS, ReplicationService
from appliance.config import (ApplianceConfig, LimitsConfig, PolicyConfig, ProtectionConfig, QemuConfig, RemoteConfig,
                              VsphereConnection, default_policy)
from appliance.control import EXPIRY_CHECK_SECONDS, Control
from appliance.datastore.datastore import Datastore
from appliance.datastore.files_view import with_files
from appliance.datastore.sessions import datastore_lock
from appliance.durable import create_durably
from appliance.errors import ApplianceError, StoreBusy, StoreError
from appliance.events import event
from appliance.flr.index import build_index, unindexed
from appliance.flr.parsers import ParsersMissing
from appliance.fuse_adapter import serve_fuse
from appliance.hydration import Hydrator, hydrated_tier, hydrating
from appliance.store import ReadPath, Store, open_store
from appliance.jobs import JobRunner
from appliance.recovery.orchestrator import Recovery
from appliance.recovery.targets import ConfiguredTargets
from appliance.store.cache import MemoryChunkCache
from appliance.store.refresh import RefreshReport, refresh
from appliance.metrics import ApplianceMetrics, serve_metrics
from appliance.vsphere.inventory import VmInfo
from appliance.vsphere.tags import vm_tags, with_tags
from nfs_export import Export, serve_nfs

#: A serving appliance keeps whole booted disks' working sets decompressed; a one-shot
#: restore needs far less (`reader.DEFAULT_CACHE_BYTES`).
DEFAULT_SERVE_CACHE_BYTES = 1 << 30
#: How often a serving appliance looks for restore points whose files are not indexed yet.
INDEX_CHECK_SECONDS = 30.0
#: A shared bucket is re-read every quarter of the GC grace period, within these bounds.
REFRESH_MIN_SECONDS = 2.0
REFRESH_MAX_SECONDS = 300.0
#: Seals NFS file handles; kept with the store so handles survive restarts (and moves).
HANDLE_KEY_NAME = "nfs-handle.key"
HANDLE_KEY_BYTES = 32


@dataclass(frozen=True)
class ServeOptions:
    """What `serve_datastore` serves, and where."""

    export: Export
    bind: str = "127.0.0.1"
    nfs_port: int = 2049
    mount_port: int = 20048
    register_portmap: bool = True
    mountpoint: Path | None = None
    cache_bytes: int = DEFAULT_SERVE_CACHE_BYTES
    nfs_enabled: bool = True
    metrics_address: tuple[str, int] | None = ("127.0.0.1", 9750)  # (bind, port) of /metrics; None: off
    api_address: tuple[str, int] | None = ("127.0.0.1", 9751)  # (bind, port) of the HTTP API; None: off
    token_file: Path | None = None  # the API token; None: STORE/api.token, made on first start
    tls: bool = False  # the API serves https (with tls_cert/tls_key, or the store's self-signed certificate)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: LimitsConfig = LimitsConfig()
    vsphere: tuple[VsphereConnection, ...] = ()  # where instant boots run (secrets checked at start)
    protection: ProtectionConfig = ProtectionConfig()
    policies: tuple[PolicyConfig, ...] = ()  # which VMs are backed up when, and kept how long
    qemu: QemuConfig = QemuConfig()  # how guests run on this host (instant-boot --qemu)
    remotes: tuple[RemoteConfig, ...] = ()  # other appliances to replicate with, on demand or on schedule
    hydrated_dir: Path | None = None  # the hydrated tier of decompressed chunks on a local disk; None: none
    hydrated_bytes: int = 64 << 30
    hydrate: str = "newest"  # which points the tier keeps hydrated: newest, policies or off


def serve_options(config: ApplianceConfig) -> ServeOptions:
    """The options a configuration asks for (the CLI has already applied its flags)."""
    nfs = config.nfs
    export = Export(path=nfs.export_path, allow=nfs.allow, read_only=nfs.read_only, root_squash=nfs.root_squash)
    return ServeOptions(export=export, bind=nfs.bind, nfs_port=nfs.port, mount_port=nfs.mount_port,
                        register_portmap=nfs.portmap, mountpoint=config.fuse.mountpoint,
                        cache_bytes=config.cache.chunk_cache_mib << 20, nfs_enabled=nfs.enabled,
                        metrics_address=(config.metrics.bind, config.metrics.port) if config.metrics.enabled else None,
                        api_address=(config.api.bind, config.api.port) if config.api.enabled else None,
                        token_file=config.api.token_file, tls=config.api.tls, tls_cert=config.api.tls_cert,
                        tls_key=config.api.tls_key,
                        limits=config.limits, vsphere=config.vsphere.connections, protection=config.protection,
                        policies=config.policies,
                        qemu=config.qemu, remotes=config.remotes, hydrated_dir=config.cache.hydrated_dir,
                        hydrated_bytes=int(config.cache.hydrated_gib * (1 << 30)), hydrate=config.cache.hydrate)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def handle_secret(store_path: Path) -> bytes:
    """The store's NFS handle secret, made (random, mode 0600, fsynced) on first use."""
    path = store_path / HANDLE_KEY_NAME
    create_durably(path, os.urandom(HANDLE_KEY_BYTES))
    secret = path.read_bytes()
    if len(secret) != HANDLE_KEY_BYTES:
        raise StoreError(f"{path} holds {len(secret)} bytes, not a {HANDLE_KEY_BYTES}-byte handle key; "
                         "restore it from a backup (a new key makes every NFS client's handles stale)")
    return secret


def mount_datastore(store_path: Path, mountpoint: Path, cache_bytes: int = DEFAULT_SERVE_CACHE_BYTES) -> None:
    """Serve the datastore at `mountpoint` in the foreground; returns after a clean unmount."""
    _logging()
    with (
        open_store(store_path) as store,
        store.reader_lock(),
        datastore_lock(store),
        ReadPath(store, cache=MemoryChunkCache(cache_bytes)) as read_path,
    ):
        datastore = Datastore(store, read_path)
        try:
            trio.run(serve_fuse, with_files(datastore), mountpoint)
        finally:
            datastore.close()


async def _then_stop(scope: trio.CancelScope, serve: Callable[..., Awaitable[None]], *args: Any,
                     task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a server task; when it ends by itself (FUSE saw the signal), end the others."""
    await serve(*args, task_status=task_status)
    scope.cancel()


async def _serve_api(recovery: Recovery, replication: ReplicationService, backups: BackupService, token: str,
                     options: ServeOptions, *,
                     task_status: trio.TaskStatus[tuple[str, str | None]] = trio.TASK_STATUS_IGNORED) -> None:
    """The HTTP API on hypercorn; announces its URL in STORE/serve.json while it runs."""
    assert options.api_address is not None
    host, port = options.api_address
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("appliance.api")
    store_path = recovery.control.store.path
    identity = api_identity(store_path, options.tls_cert, options.tls_key) if options.tls else None
    if identity is not None:
        config.certfile, config.keyfile = str(identity.cert_file), str(identity.key_file)

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        app = await trio.to_thread.run_sync(partial(_api_app, recovery, replication, backups, token))
        await hypercorn_serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(run)
        url = urls[0]
        write_runtime(store_path, RuntimeInfo(os.getpid(), url, str(token_path(store_path, options.token_file)),
                                              None if identity is None else str(identity.cert_file)))
        task_status.started((url, None if identity is None else identity.fingerprint))
        try:
            await trio.sleep_forever()
        finally:
            remove_runtime(store_path)


def _api_app(recovery: Recovery, replication: ReplicationService, backups: BackupService, token: str) -> Any:
    """The API's ASGI app, its modules imported only now, in a worker thread, while NFS already answers:
    FastAPI and pydantic are a third of the start-up's imports, and a restarted appliance's NFS clients
    wait for their handles to work again, not for the API."""
    from appliance.api.app import build_app

    return cast(Any, build_app(recovery.control, token, recovery, replication,  # hypercorn types ASGI apps its own way
                               backups=backups))


async def _replicate_on_schedule(replication: ReplicationService) -> None:
    """Start each remote's scheduled job when it is due (a remote without a schedule never is)."""
    while True:
        replication.start_due()
        await trio.sleep(SCHEDULE_CHECK_SECONDS)


async def _back_up_on_schedule(scheduler: BackupScheduler, targets: ConfiguredTargets, control: Control,
                               options: ServeOptions, hydrator: Hydrator | None) -> None:
    """Start the backup of every VM whose policy says it is due: discovery each round, so a new VM is
    backed up (by the default policy if no other names it) without anyone announcing it. The same round
    tells the hydrator which VMs' policies keep them hydrated."""
    want_tags = any(policy.tags for policy in options.policies)
    names = [connection.name for connection in options.vsphere]
    while True:
        inventories = await trio.to_thread.run_sync(_inventories, targets, names, want_tags)
        if hydrator is not None:
            hydrator.mark(scheduler.hydration_marks(inventories))
        newest = {vm.name: vm.newest_created for vm in await trio.to_thread.run_sync(control.vms)}
        scheduler.start_due(inventories, newest.get)
        await trio.sleep(SCHEDULE_CHECK_SECONDS)


def _inventories(targets: ConfiguredTargets, connections: list[str], want_tags: bool) -> dict[str, list[VmInfo]]:
    """Each reachable connection's VMs (with their tags when a policy selects by tag)."""
    found = {}
    for name in connections:
        try:
            vms = targets.inventory(name)
            if want_tags:
                _, settings = targets.vsphere_settings(name)
                vms = with_tags(vms, vm_tags(settings, settings.password()))
        except ApplianceError as exc:
            event("backup.discovery_failed", logging.WARNING, connection=name, reason=str(exc))
            continue
        found[name] = vms
    return found


async def _refresh_from_bucket(store: Store) -> None:
    """Learn the points and packs other gateways of a shared bucket made or removed.

    More often than the GC grace period, so no reader here still uses a pack when it is deleted.
    """
    interval = min(REFRESH_MAX_SECONDS, max(REFRESH_MIN_SECONDS, store.config.gc_grace_seconds / 4))
    while True:
        try:
            report = await trio.to_thread.run_sync(_refresh_now, store)
        except StoreBusy:
            pass  # a backup or GC of this appliance holds the writer lock: next round
        except ApplianceError as exc:
            event("store.refresh_failed", logging.WARNING, reason=str(exc))
        else:
            if report.points_added or report.points_dropped or report.packs_dropped or report.incomplete:
                event("store.refreshed", detail=report.summary())
        await trio.sleep(interval)


def _refresh_now(store: Store) -> RefreshReport:
    with store.writer_lock():
        return refresh(store)


async def _index_new_points(control: Control) -> None:
    """Index each restore point's files once, newest first, one at a time, in a worker thread.

    A point whose indexing fails is logged and not tried again in this process; without the
    optional parsers there is nothing to index with, said once.
    """
    failed: set[str] = set()
    while True:
        for point in await trio.to_thread.run_sync(unindexed, control.store):
            if point.id in failed:
                continue
            try:
                await trio.to_thread.run_sync(build_index, control.store, control.datastore.read_path, point)
            except ParsersMissing as exc:
                event("files.index_off", logging.WARNING, reason=str(exc))
                return
            except ApplianceError as exc:
                failed.add(point.id)
                event("files.index_failed", logging.WARNING, vm=point.vm, point=point.id, reason=str(exc))
        await trio.sleep(INDEX_CHECK_SECONDS)


async def _expire_periodically(control: Control) -> None:
    while True:
        await trio.to_thread.run_sync(control.expire_sessions)
        await trio.sleep(EXPIRY_CHECK_SECONDS)


async def _serve(recovery: Recovery, replication: ReplicationService, backups: BackupService,
                 backup_schedule: Callable[[], Awaitable[None]] | None, metrics: ApplianceMetrics, secret: bytes,
                 token: str, options: ServeOptions) -> None:
    control = recovery.control
    vfs = with_files(control.datastore)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.jobs.run)
            if options.vsphere and (options.protection.scheduled_backups or backups.intents.left()):
                backups.reconcile([connection.name for connection in options.vsphere])
            if options.metrics_address is not None:
                host, port = options.metrics_address
                bound = await nursery.start(partial(serve_metrics, metrics, host=host, port=port))
                event("metrics.serving", url=f"http://{host}:{bound}/metrics")
            if options.nfs_enabled:
                service = await nursery.start(partial(
                    serve_nfs, vfs, handle_secret=secret, export=options.export, host=options.bind,
                    nfs_port=options.nfs_port, mount_port=options.mount_port,
                    register_portmap=options.register_portmap, observe_call=metrics.observe_call))
                event("nfs.serving", address=options.bind, nfs_port=service.nfs_port,
                      mount_port=service.mount_port, export=options.export.path,
                      allow=",".join(map(str, options.export.allow)),
                      access="ro" if options.export.read_only else "rw",
                      root="squashed" if options.export.root_squash else "not-squashed")
            if options.mountpoint is not None:
                await nursery.start(_then_stop, nursery.cancel_scope, partial(serve_fuse, observe_op=metrics.observe_op),
                                    vfs, options.mountpoint)
                event("datastore.mounted", via="fuse", mountpoint=str(options.mountpoint))
            if options.api_address is not None:
                url, fingerprint = await nursery.start(_serve_api, recovery, replication, backups, token, options)
                event("api.serving", url=url, **({} if fingerprint is None else {"tls_fingerprint": fingerprint}))
            nursery.start_soon(_expire_periodically, control)
            nursery.start_soon(_index_new_points, control)
            nursery.start_soon(_replicate_on_schedule, replication)
            if control.store.config.backend == "s3":
                nursery.start_soon(_refresh_from_bucket, control.store)
            if backup_schedule is not None:
                nursery.start_soon(backup_schedule)
            async for signum in signals:
                event("appliance.stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _single_cause(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one user-facing error inside a task group's exception, if that is all it holds."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        item = pending.pop()
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        else:
            leaves.append(item)
    if len(leaves) == 1 and isinstance(leaves[0], (ApplianceError, OSError)):
        return leaves[0]
    return None


def serve_datastore(store_path: Path, options: ServeOptions) -> None:
    """Serve the datastore over NFS and/or FUSE in the foreground until SIGINT/SIGTERM."""
    _logging()
    with (
        open_store(store_path) as store,
        store.reader_lock(),
        datastore_lock(store),
        hydrated_tier(store, options.hydrated_dir, options.hydrated_bytes) as tier,
        ReadPath(store, cache=MemoryChunkCache(options.cache_bytes), tier=tier) as read_path,
        hydrating(store, read_path, tier, options.hydrate, options.policies) as hydrator,
    ):
        secret = handle_secret(store.path)
        token = load_token(token_path(store.path, options.token_file), create=options.token_file is None)
        metrics = ApplianceMetrics()
        datastore = Datastore(store, read_path, session_io=metrics)
        metrics.watch(datastore, hydrator)
        control = Control(datastore, options.limits, JobRunner(store.path / "jobs"))
        metrics.watch_jobs(control.jobs)
        targets = ConfiguredTargets(control, options.bind, options.export.path, options.vsphere, options.qemu)
        recovery = Recovery(control, targets, options.protection, options.policies)
        control.set_session_ender(recovery.end_expired)
        replication = ReplicationService(store, control.jobs, options.remotes, metrics)
        backups = BackupService(store, control.jobs, control.activities, targets.vsphere_settings, metrics,
                                committed=None if hydrator is None else lambda _: hydrator.request())
        schedule = None
        if options.vsphere and options.protection.scheduled_backups:
            scheduler = BackupScheduler(options.policies, default_policy(options.protection, options.policies),
                                        PolicyBackups(backups, store))
            schedule = partial(_back_up_on_schedule, scheduler, targets, control, options, hydrator)
        try:
            trio.run(_serve, recovery, replication, backups, schedule, metrics, secret, token, options)
        except BaseExceptionGroup as group:
            cause = _single_cause(group)
            if cause is None:
                raise
            raise cause from None
        finally:
            datastore.close()
