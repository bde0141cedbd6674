"""The `appliance replicate` and `appliance api-certificate` commands: restore points to and from another site."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli_args import VM_ARG, Command, store_path
from appliance.errors import ConfigError, UsageError
from appliance.progress import human_bytes

if TYPE_CHECKING:
    from appliance.config import ApplianceConfig


def _config(args: argparse.Namespace) -> ApplianceConfig:
    from appliance.config import config_from_table, read_table

    table = read_table(Path(args.config))
    if args.store:
        table.setdefault("store", {})["path"] = str(Path(args.store).absolute())
    return config_from_table(table, args.config)


def _print_report(doc: dict[str, Any]) -> None:
    print(f"{doc['direction']} {doc['remote']}: {len(doc['points_sent'])} points sent, {doc['points_skipped']} "
          f"already there or older, {len(doc['points_removed'])} removed; {doc['chunks_sent']} chunks, "
          f"{human_bytes(doc['wire_bytes_sent'])} sent and "
          f"{human_bytes(doc['wire_bytes_received'])} received for {human_bytes(doc['logical_bytes'])} of disks "
          f"in {doc['seconds']:.1f} s")


def _through_server(args: argparse.Namespace) -> int:
    """The running server's job (its configuration names the remotes), followed to its end."""
    from appliance.api.client import ApiClient
    from appliance.cli_recovery import follow

    client = ApiClient.for_store(store_path(args))
    if client is None:
        raise UsageError(f"no `appliance serve` runs for {args.store}: give --config FILE to replicate from "
                         "this process instead")
    with client:
        job = client.call("POST", "/replications", {"remote": args.remote, "direction": args.direction,
                                                    "vms": args.vm or None, "remove_vanished": args.remove_vanished})
        return follow(client, job, args.json, render=lambda result: _print_report(
            {**result, "direction": args.direction, "remote": args.remote}))


def cmd_replicate(args: argparse.Namespace) -> int:
    from appliance.config_checks import Invalid
    from appliance.replication.remote import link_for
    from appliance.replication.run import ReplicationReport, replicate
    from appliance.replication.service import settings_of
    from appliance.store import open_store
    from appliance.store.catalog import RestorePoint

    if args.config is None:
        if args.rate_limit_mib is not None or args.streams is not None:
            raise UsageError("--rate-limit-mib and --streams go with --config; a server's job takes its remote's")
        return _through_server(args)
    config = _config(args)
    try:
        remote = config.remote(args.remote)
    except Invalid as exc:
        raise ConfigError(args.config, exc.reason, exc.key) from None
    settings = settings_of(remote)
    if args.rate_limit_mib is not None:
        settings = replace(settings, rate_limit=args.rate_limit_mib * (1 << 20))
    if args.streams is not None:
        settings = replace(settings, streams=args.streams)

    def on_point(point: RestorePoint, report: ReplicationReport) -> None:
        print(f"{args.direction}: {point.vm} {point.id}: {report.chunks_sent} chunks "
              f"({human_bytes(report.chunk_bytes_sent)}) sent so far", file=sys.stderr)

    with open_store(config.store.path) as store:
        link = link_for(settings)
        report = replicate(store, settings, args.direction, args.vm or None, link, on_point,
                           remove_vanished=args.remove_vanished)
    doc = {**report.to_json(), "direction": args.direction, "remote": remote.name,
           "wire_bytes_sent": link.sent, "wire_bytes_received": link.received}
    if args.json:
        print(json.dumps(doc))
    else:
        _print_report(doc)
    return 0


def cmd_api_certificate(args: argparse.Namespace) -> int:
    from appliance.api.tls import api_identity

    if args.config is None:
        identity = api_identity(store_path(args), None, None)
    else:
        config = _config(args)
        identity = api_identity(config.store.path, config.api.tls_cert, config.api.tls_key)
    print(json.dumps({"certificate": str(identity.cert_file), "fingerprint": identity.fingerprint})
          if args.json else identity.fingerprint)
    return 0


def register(command: Command) -> None:
    sub = command("replicate", cmd_replicate, "send restore points to another appliance, or fetch its points")
    sub.epilog = ("Only chunks the other side lacks travel, compressed as stored; the receiver checks each "
                  "against its ID and adds a point only when all its chunks are there, so an interrupted run "
                  "leaves nothing visible and the next run resumes. Per VM, only points newer than the "
                  "target's newest are sent: the target's own retention is never undone.")
    sub.add_argument("direction", choices=("push", "pull"), help="push: from this store; pull: into this store")
    sub.add_argument("--config", metavar="FILE", help="TOML configuration naming the [[remotes]]: replicate from "
                     "this process (default: as a job of the `serve` running this store, with its configuration)")
    sub.add_argument("--remote", required=True, metavar="NAME", help="the [[remotes]] entry to replicate with")
    sub.add_argument("--vm", action="append", type=VM_ARG, metavar="VM", help="only this VM; repeatable (default: all)")
    sub.add_argument("--rate-limit-mib", type=float, metavar="MIB_PER_S",
                     help="with --config: bytes on the link per second, in MiB (default: the remote's rate_limit_mib)")
    sub.add_argument("--streams", type=int, choices=range(1, 33), metavar="N",
                     help="with --config: parallel transfers (default: the remote's streams)")
    sub.add_argument("--remove-vanished", action="store_true",
                     help="then delete the target's points (of VMs the source has) that the source no longer has; "
                     "points a session holds at the target stay")
    sub.add_argument("--json", action="store_true", help="print the report as one JSON object")

    sub = command("api-certificate", cmd_api_certificate,
                  "print the SHA-256 fingerprint of this appliance's API certificate (made if absent)")
    sub.epilog = "Copy it into the other appliance's [[remotes]] entry: it pins this certificate."
    sub.add_argument("--config", metavar="FILE", help="TOML configuration (store and api.tls_*; default: the store's "
                     "self-signed certificate)")
    sub.add_argument("--json", action="store_true", help="print the certificate path and fingerprint as JSON")
