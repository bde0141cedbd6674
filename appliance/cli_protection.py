"""`appliance backup --from-vsphere VM` and `appliance backup-jobs`: backups the appliance takes from vSphere.

Without --config, the backup is a job of the `serve` running this store (its
configuration names the connections, and its scheduler would otherwise race it); with
--config, it runs in this process, which is refused while a server runs the store: two
processes backing up one VM would sweep each other's snapshots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from appliance.cli_args import Command, store_path
from appliance.errors import ConfigError, UsageError
from appliance.progress import human_bytes


def _print_backup(result: dict[str, Any]) -> None:
    disks = ", ".join(f"{disk['label']} {disk['mode']} ({human_bytes(disk['changed_bytes'])})"
                      for disk in result["disks"])
    print(f"{result['vm']}: point {result['point']}, {result['consistency']}-consistent; {disks}; "
          f"read {human_bytes(result['bytes_read'])} in {result['requests']} requests, {result['seconds']:.1f} s",
          file=sys.stderr)
    print(result["point"])


def backup_from_vsphere(args: argparse.Namespace) -> int:
    from appliance.api.client import ApiClient

    if args.disks or args.vm or args.parent or args.changed_areas or args.vmx or args.nvram:
        raise UsageError("--from-vsphere reads the VM's disks and files from vSphere: give no disks, --vm, "
                         "--parent, --changed-areas, --vmx or --nvram with it")
    options = {"quiesce": args.quiesce, "enable_cbt": not args.no_enable_cbt, "streams": args.streams}
    client = ApiClient.for_store(store_path(args))
    if args.config is None:
        if client is None:
            raise UsageError(f"no `appliance serve` runs for {args.store}: give --config FILE to back up from "
                             "this process instead")
        from appliance.cli_recovery import follow

        with client:
            job = client.call("POST", "/backups", {"vm": args.from_vsphere, "connection": args.connection, **options})
            return follow(client, job, args.json, args.detach, render=_print_backup)
    if client is not None:
        client.close()
        raise UsageError("`appliance serve` runs this store: drop --config to run the backup as its job")
    return _backup_here(args, options)


def _backup_here(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from appliance.config import config_from_table, read_table
    from appliance.config_checks import Invalid
    from appliance.jobs import Job
    from appliance.protection.intents import Intents
    from appliance.protection.job import BackupOptions, back_up_vm
    from appliance.store import open_store
    from appliance.vsphere.client import Session
    from appliance.vsphere.settings import settings_for

    table = read_table(Path(args.config))
    if args.store:
        table.setdefault("store", {})["path"] = str(Path(args.store).absolute())
    config = config_from_table(table, args.config)
    connections = {connection.name: connection for connection in config.vsphere.connections}
    name = args.connection or (next(iter(connections)) if len(connections) == 1 else None)
    if name is None or name not in connections:
        raise ConfigError(args.config, f"name one of the [[vsphere.connections]] with --connection "
                          f"(configured: {', '.join(connections) or 'none'})", "vsphere.connections")
    try:
        settings = settings_for(connections[name], config.nfs.bind, config.nfs.export_path)
    except Invalid as exc:
        raise ConfigError(args.config, exc.reason, exc.key) from None
    job = Job(id=f"{time.strftime('%Y%m%d-%H%M%S')}-cli", kind="backup", params={"vm": args.from_vsphere},
              created=time.time())
    with open_store(config.store.path) as store:
        session = Session(settings)
        try:
            result = back_up_vm(store, session, name, args.from_vsphere, BackupOptions(**options), job,
                                Intents(store.path / "backup-intents"))
        finally:
            session.close()
    doc = result.to_json()
    if args.json:
        print(json.dumps(doc))
    else:
        _print_backup(doc)
    return 0


def cmd_backup_jobs(args: argparse.Namespace) -> int:
    from appliance.cli_recovery import cmd_jobs, server_client

    if args.jobs_command in ("show", "cancel"):
        return cmd_jobs(args)
    with server_client(args) as client:
        found = client.call("GET", "/backups")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"{'JOB':<24} {'VM':<20} {'STATE':<12} {'CREATED (UTC)':<20} POINT / ERROR")
    for job in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job["created"]))
        outcome = (job["result"] or {}).get("point") or job["error"] or ""
        print(f"{job['id']:<24} {job['params']['vm']:<20} {job['state']:<12} {created:<20} {outcome}")
    return 0


def add_vsphere_arguments(sub: argparse.ArgumentParser) -> None:
    """`backup`'s flags for a backup taken from vSphere."""
    group = sub.add_argument_group("backup from vSphere (instead of disk image files)")
    group.add_argument("--from-vsphere", metavar="VM", help="snapshot this vSphere VM and back up its disks "
                       "(CBT incremental after the first point)")
    group.add_argument("--connection", metavar="NAME", help="the [[vsphere.connections]] entry (default: the only one)")
    group.add_argument("--quiesce", choices=("yes", "try", "no"), default="try",
                       help="quiesce the guest: yes (or fail), try (else crash-consistent; the default), no")
    group.add_argument("--no-enable-cbt", action="store_true", help="do not turn CBT on for a VM that lacks it")
    group.add_argument("--streams", type=int, choices=range(1, 9), default=4, metavar="N",
                       help="parallel HTTPS connections reading the disks (1-8, default 4)")
    group.add_argument("--config", metavar="FILE", help="TOML configuration naming the connections: back up from "
                       "this process (default: as a job of the `serve` running this store)")
    group.add_argument("--json", action="store_true", help="print the job's (or the backup's) report as JSON")
    group.add_argument("--detach", action="store_true", help="print the job id and return at once")


def register(command: Command) -> None:
    from appliance.cli_recovery import add_job_actions

    add_job_actions(command("backup-jobs", cmd_backup_jobs, "backups from vSphere run by the appliance"),
                    "every backup job (the default)", "ask a backup to stop (its snapshot is removed)")
