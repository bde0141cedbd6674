"""The `appliance` command line.

argparse rather than typer/click: the CLI is started hundreds of times by tests and
scripts, and the stdlib parser adds no import time and no dependency. Every
ApplianceError and usage error becomes one line on stderr and the error's exit code; no
traceback. Anything else is a bug: one "internal error" line and exit code 1, the
traceback in the system log and, with --debug, on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli_args import POINT_ARG, VM_ARG, Handler, OneLineParser, report_internal_error, store_path
from appliance.cli_files import register as register_file_commands
from appliance.cli_protection import add_vsphere_arguments, backup_from_vsphere
from appliance.cli_protection import register as register_protection_commands
from appliance.cli_recovery import register as register_recovery_commands
from appliance.cli_replicate import register as register_replicate_commands
from appliance.cli_sessions import register as register_session_commands
from appliance.cli_store import register as register_store_commands
from appliance.cli_store import register_init as register_init_command
from appliance.errors import ApplianceError, ConfigError, DamageFound, UsageError
from appliance.hypervisor.accel import ACCELERATORS
from appliance.progress import Progress, human_bytes
from appliance.store import open_store

if TYPE_CHECKING:
    from appliance.config import ApplianceConfig



def cmd_backup(args: argparse.Namespace) -> int:
    from appliance.ingest.backup import backup

    if args.from_vsphere:
        return backup_from_vsphere(args)
    if not args.vm or not args.disks:
        raise UsageError("give --vm and the disk image files (or --from-vsphere VM)")

    config_files = {suffix: Path(path) for suffix, path in ((".vmx", args.vmx), (".nvram", args.nvram)) if path}
    with open_store(store_path(args)) as store, Progress(f"backup {args.vm}") as progress:
        point = backup(
            store,
            args.vm,
            [Path(d) for d in args.disks],
            config_files=config_files,
            parent_ref=args.parent,
            changed_areas=[Path(c) for c in args.changed_areas] if args.changed_areas else None,
            progress=progress,
        )
    stats = point.stats
    seconds = max(stats["seconds"], 1e-6)
    print(
        f"scanned {human_bytes(stats['scanned_bytes'])} (read {human_bytes(stats['read_bytes'])}) in "
        f"{seconds:.1f}s ({human_bytes(stats['scanned_bytes'] / seconds)}/s), {int(stats['new_chunks'])} new chunks, "
        f"{human_bytes(stats['new_stored_bytes'])} newly stored",
        file=sys.stderr,
    )
    print(point.id)
    return 0


def cmd_points(args: argparse.Namespace) -> int:
    with open_store(store_path(args)) as store, store.env.begin() as txn:
        points = store.catalog.vm_points(txn, args.vm) if args.vm else store.catalog.points(txn)
    if args.json:
        print(json.dumps([p.to_json() for p in points], indent=2))
        return 0
    print(f"{'VM':<20} {'POINT':<22} {'CREATED (UTC)':<20} {'DISKS':>5} {'SIZE':>10}  PARENT")
    for p in points:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.created))
        size = human_bytes(sum(d.size for d in p.disks))
        print(f"{p.vm:<20} {p.id:<22} {created:<20} {len(p.disks):>5} {size:>10}  {p.parent or '-'}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from appliance.restore import restore_disk

    with open_store(store_path(args)) as store:
        with store.env.begin() as txn:
            point = store.catalog.resolve(txn, args.vm, args.point)
        with Progress(f"restore {args.vm} disk {args.disk}") as progress:
            restore_disk(store, point, args.disk, Path(args.output), overwrite=args.force, progress=progress)
    print(f"restored {args.vm} point {point.id} disk {args.disk} to {args.output}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from appliance.store.verify import MAX_LISTED_PROBLEMS, verify

    with open_store(store_path(args)) as store, Progress("verify") as progress:
        report = verify(store, full=args.full, progress=progress)
    for problem in report.problems[:MAX_LISTED_PROBLEMS]:
        print(f"damage: {problem}", file=sys.stderr)
    summary = (
        f"{report.packs} packs, {report.records} records, {report.chunks} chunks, "
        f"{report.map_entries} map entries checked"
    )
    if report.problems:
        raise DamageFound(f"store {args.store} is damaged: {len(report.problems)} problems ({summary})")
    print(f"store {args.store} is sound: {summary}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from appliance.protection.retention import Retention
    from appliance.store.gc import prune

    rule = Retention(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    with open_store(store_path(args)) as store:
        removed, report = prune(store, args.vm, rule)
    for point in removed:
        print(f"removed {point.vm} {point.id}")
    print(
        f"gc: {report.removed_chunks} chunks dropped, {report.repacked_packs} packs repacked, "
        f"{report.deleted_packs} packs deleted, {human_bytes(report.reclaimed_bytes)} reclaimed"
        + (f", {report.deferred_packs} packs deferred (readers active)" if report.deferred_packs else "")
    )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from appliance.store.gc import collect_garbage

    with open_store(store_path(args)) as store:
        report = collect_garbage(store)
    print(json.dumps(dataclasses.asdict(report)))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from appliance.store.stats import store_statistics

    with open_store(store_path(args)) as store:
        stats = store_statistics(store)
    if args.json:
        print(json.dumps(stats.to_json(), indent=2))
        return 0
    rows = [
        ("VMs", str(stats.vms)),
        ("restore points", str(stats.points)),
        ("logical bytes", human_bytes(stats.logical_bytes)),
        ("referenced bytes", human_bytes(stats.referenced_bytes)),
        ("unique chunk bytes", human_bytes(stats.unique_bytes)),
        ("stored bytes", human_bytes(stats.stored_bytes)),
        ("chunks", str(stats.chunks)),
        ("packs", str(stats.packs)),
        ("dedup ratio", f"{stats.dedup_ratio:.2f}x"),
        ("compression ratio", f"{stats.compression_ratio:.2f}x"),
        ("logical / stored", f"{stats.total_ratio:.2f}x"),
    ]
    for name, value in rows:
        print(f"{name:<20} {value}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from appliance.serve import mount_datastore

    mount_datastore(store_path(args), Path(args.mountpoint), cache_bytes=args.cache_mib << 20)
    return 0


#: Serve flags and the configuration keys they override: a flag given on the command line
#: wins over the file, a flag left out leaves the file's value (or the default) alone.
SERVE_FLAGS: tuple[tuple[str, str, str], ...] = (
    # (argparse dest, flag as the operator types it, config key)
    ("store", "--store", "store.path"),
    ("bind", "--bind", "nfs.bind"),
    ("nfs_port", "--nfs-port", "nfs.port"),
    ("mount_port", "--mount-port", "nfs.mount_port"),
    ("portmap", "--no-portmap", "nfs.portmap"),
    ("export_path", "--export-path", "nfs.export_path"),
    ("export_allow", "--export-allow", "nfs.allow"),
    ("read_only", "--read-only", "nfs.read_only"),
    ("root_squash", "--root-squash/--no-root-squash", "nfs.root_squash"),
    ("mount", "--mount", "fuse.mountpoint"),
    ("cache_mib", "--cache-mib", "cache.chunk_cache_mib"),
    ("hydrated_dir", "--hydrated-dir", "cache.hydrated_dir"),
    ("hydrated_gib", "--hydrated-gib", "cache.hydrated_gib"),
    ("hydrate", "--hydrate", "cache.hydrate"),
    ("metrics", "--no-metrics", "metrics.enabled"),
    ("metrics_port", "--metrics-port", "metrics.port"),
    ("api", "--no-api", "api.enabled"),
    ("api_port", "--api-port", "api.port"),
    ("api_tls", "--api-tls", "api.tls"),
    ("accel", "--accel", "qemu.accel"),
)
#: Flags that name paths: made absolute here, as the configuration only takes absolute ones.
PATH_FLAGS = frozenset({"store", "mount", "hydrated_dir"})


def _serve_config(args: argparse.Namespace) -> ApplianceConfig:
    """The configuration file (if any) with the command line's flags laid over it.

    Flags are merged into the file's table before validation, so both go through the
    same checks; a refused value that came from a flag is reported as that flag.
    """
    from appliance.config import config_from_table, read_table

    if args.config is None and not args.store:
        raise ApplianceError("no store given: pass --store DIR, set APPLIANCE_STORE or use --config FILE")
    table: dict[str, Any] = read_table(Path(args.config)) if args.config else {}
    flag_for_key: dict[str, str] = {}
    for dest, flag, key in SERVE_FLAGS:
        value = getattr(args, dest)
        if value is None or (dest in PATH_FLAGS and not value):  # an empty APPLIANCE_STORE is no store
            continue
        section, name = key.split(".")
        part = table.setdefault(section, {})
        if isinstance(part, dict):  # else validation reports the file's own mistake
            part[name] = os.path.abspath(value) if dest in PATH_FLAGS else value
            flag_for_key[key] = flag
    try:
        return config_from_table(table, args.config or "command line")
    except ConfigError as exc:
        if exc.key in flag_for_key:
            raise UsageError(f"{flag_for_key[exc.key]}: {exc.reason}") from None
        raise


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.config import resolve_secrets, summary
    from appliance.serve import serve_datastore, serve_options

    config = _serve_config(args)
    resolve_secrets(config, args.config or "command line")
    if config.store.backend is not None:
        from appliance.config_checks import Invalid
        from appliance.store.repository import read_store_config

        try:
            config.store.matches(read_store_config(config.store.path).s3)
        except Invalid as exc:
            raise ConfigError(args.config or "command line", exc.reason, exc.under("store").key) from None
    print(f"appliance: {summary(config)}", file=sys.stderr)
    serve_datastore(config.store.path, serve_options(config))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from appliance.config import load_config, summary

    config = load_config(Path(args.file))
    print(f"{args.file}: OK: {summary(config)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None, data_only=args.data_only, accel=args.accel)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="appliance", description="Instant-recovery NFS datastore appliance")
    parser.add_argument("--store", default=os.environ.get("APPLIANCE_STORE"), help="store directory")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    register_init_command(command)

    sub = command("backup", cmd_backup, "ingest disk images, or a vSphere VM's disks, as a new restore point")
    sub.add_argument("--vm", type=VM_ARG)
    sub.add_argument("--vmx", help="the VM's .vmx file to keep with the point")
    sub.add_argument("--nvram", help="the VM's .nvram file to keep with the point")
    sub.add_argument("--parent", type=POINT_ARG, help="parent point (id, prefix or latest) for an incremental backup")
    sub.add_argument("--changed-areas", action="append", help="changed-areas JSON, one per disk, in disk order")
    sub.add_argument("disks", nargs="*", metavar="DISK", help="raw image, VMDK descriptor or sparse VMDK")
    add_vsphere_arguments(sub)

    sub = command("points", cmd_points, "list restore points")
    sub.add_argument("--vm", type=VM_ARG)
    sub.add_argument("--json", action="store_true")

    sub = command("restore", cmd_restore, "write a disk of a restore point to a sparse file")
    sub.add_argument("--vm", required=True, type=VM_ARG)
    sub.add_argument("--point", required=True, type=POINT_ARG, help="point id, unique prefix, or latest")
    sub.add_argument("--disk", type=int, default=0)
    sub.add_argument("--output", required=True)
    sub.add_argument("--force", action="store_true", help="overwrite an existing output file")

    sub = command("verify", cmd_verify, "check every record checksum and every reference")
    sub.add_argument("--full", action="store_true", help="also decompress and re-hash every chunk")

    sub = command("prune", cmd_prune, "drop the points of a VM a retention rule does not keep, then collect garbage")
    sub.epilog = ("Counted as borg and restic do: the newest --keep-last points, then the newest point of each of "
                  "the last N days, ISO weeks and months that have points (local time); a point an earlier rule "
                  "kept does not count again. Points a session or replication holds are never removed.")
    sub.add_argument("--vm", required=True, type=VM_ARG)
    for period in ("last", "daily", "weekly", "monthly"):
        sub.add_argument(f"--keep-{period}", type=int, default=0, metavar="N")

    command("gc", cmd_gc, "reclaim space of chunks no restore point references")

    sub = command("stats", cmd_stats, "space used, dedup and compression ratios")
    sub.add_argument("--json", action="store_true")

    register_session_commands(command)
    register_file_commands(command)
    register_store_commands(command)

    sub = command("mount", cmd_mount, "serve the datastore over FUSE until SIGINT/SIGTERM")
    sub.add_argument("mountpoint")
    sub.add_argument("--cache-mib", type=int, default=1024, help="decompressed-chunk cache size (MiB)")

    sub = command("serve", cmd_serve, "serve the datastore over NFSv3 (and FUSE) until SIGINT/SIGTERM")
    sub.epilog = (
        "Default export: clients in 127.0.0.0/8 only, read-write, root not squashed (ESXi needs "
        "no_root_squash: with root squashed it mounts the datastore but cannot create a VM). "
        "For ESXi on another host: --bind 0.0.0.0 --export-allow <its network>. ESXi finds the "
        "ports through the portmapper on port 111: rpcbind if it runs, else this process serves one. "
        "With --config every setting comes from the file; flags given as well override it."
    )
    # Defaults are None so that a flag left out does not override the configuration file;
    # the defaults named in the help are the configuration's (appliance.config).
    sub.add_argument("--config", metavar="FILE", help="TOML configuration (see deploy/appliance.toml)")
    sub.add_argument("--nfs-port", type=int, help="NFS port (default 2049)")
    sub.add_argument("--mount-port", type=int, help="MOUNT port (default 20048)")
    sub.add_argument("--bind", help="address to listen on (default 127.0.0.1)")
    sub.add_argument("--mount", metavar="MNT", help="also serve the datastore over FUSE at MNT")
    sub.add_argument("--export-allow", action="append", metavar="CIDR",
                     help="client network allowed to mount; repeatable (default 127.0.0.0/8 only)")
    sub.add_argument("--export-path", metavar="PATH",
                     help='the path clients mount, e.g. /datastore (default "/", which is always accepted too)')
    sub.add_argument("--read-only", action="store_true", default=None,
                     help="refuse every change over NFS (NFS3ERR_ROFS)")
    squash = sub.add_mutually_exclusive_group()
    squash.add_argument("--root-squash", dest="root_squash", action="store_true", default=None,
                        help="map uid/gid 0 to 65534 (breaks VM creation from ESXi)")
    squash.add_argument("--no-root-squash", dest="root_squash", action="store_false", default=None,
                        help="keep root as root (the default; what ESXi needs)")
    sub.add_argument("--no-portmap", dest="portmap", action="store_false", default=None,
                     help="neither register with rpcbind nor serve a portmapper on port 111")
    sub.add_argument("--cache-mib", type=int, help="decompressed-chunk cache size (MiB, default 1024)")
    sub.add_argument("--hydrated-dir", metavar="DIR", help="a local disk tier of decompressed chunks (default none)")
    sub.add_argument("--hydrated-gib", type=float, help="the hydrated tier's size limit (GiB, default 64)")
    sub.add_argument("--hydrate", choices=("newest", "policies", "off"),
                     help="the points kept hydrated in the tier (default newest: each VM's newest)")
    sub.add_argument("--no-metrics", dest="metrics", action="store_false", default=None,
                     help="do not serve Prometheus metrics")
    sub.add_argument("--metrics-port", type=int, help="port of http://BIND:PORT/metrics (default 9750)")
    sub.add_argument("--no-api", dest="api", action="store_false", default=None,
                     help="do not serve the HTTP API (the CLI then cannot change sessions while this runs)")
    sub.add_argument("--api-port", type=int, help="port of the HTTP API on 127.0.0.1 (default 9751; 0: any free)")
    sub.add_argument("--api-tls", action="store_true", default=None,
                     help="serve the API over https (the store's self-signed certificate unless api.tls_cert is set)")
    sub.add_argument("--accel", choices=ACCELERATORS,
                     help="QEMU accelerator for instant boots on this host (default auto: KVM if it really runs guests)")

    register_recovery_commands(command)
    register_replicate_commands(command)
    register_protection_commands(command)

    sub = command("config", cmd_config, "validate a configuration file without starting anything")
    config_commands = sub.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    action = config_commands.add_parser("check", help="validate FILE: one OK line, or the error (exit 2)")
    action.add_argument("file", metavar="FILE")

    sub = command("demo", cmd_demo, "back up, restore and serve a disk; instant-boot a VM from its backup over NFS")
    sub.add_argument("--dir", help="work directory (default: a new temporary directory)")
    sub.add_argument("--data-only", action="store_true", help="skip the boot part (QEMU)")
    sub.add_argument("--accel", choices=ACCELERATORS, default="auto",
                     help="QEMU accelerator for the boot part (default auto: KVM if it really runs guests)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ApplianceError as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for the operator, the traceback for the log and --debug
        report_internal_error(exc, args.debug)
        return 1


if __name__ == "__main__":
    sys.exit(main())
