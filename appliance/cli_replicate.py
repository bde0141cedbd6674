"""The `appliance replicate` and `appliance api-certificate` commands: restore points to and from another site."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli_args import VM_ARG, Command, store_path
from appliance.errors import ConfigError
from appliance.progress import human_bytes

if TYPE_CHECKING:
    from appliance.config import ApplianceConfig


def _config(args: argparse.Namespace) -> ApplianceConfig:
    from appliance.config import config_from_table, read_table

    table = read_table(Path(args.config))
    if args.store:
        table.setdefault("store", {})["path"] = str(Path(args.store).absolute())
    return config_from_table(table, args.config)


def cmd_replicate(args: argparse.Namespace) -> int:
    from appliance.config_checks import Invalid
    from appliance.replication.remote import RemoteSettings
    from appliance.replication.run import ReplicationReport, replicate
    from appliance.store import open_store
    from appliance.store.catalog import RestorePoint

    config = _config(args)
    try:
        remote = config.remote(args.remote)
        token = remote.read_token().reveal()
    except Invalid as exc:
        raise ConfigError(args.config, exc.reason, exc.key) from None
    rate = args.rate_limit_mib if args.rate_limit_mib is not None else remote.rate_limit_mib
    settings = RemoteSettings(remote.name, remote.url, token, remote.fingerprint,
                              None if rate is None else rate * (1 << 20), args.streams or remote.streams)

    def on_point(point: RestorePoint, report: ReplicationReport) -> None:
        print(f"{args.direction}: {point.vm} {point.id}: {report.chunks_sent} chunks "
              f"({human_bytes(report.chunk_bytes_sent)}) sent so far", file=sys.stderr)

    with open_store(config.store.path) as store:
        report, link = replicate(store, settings, args.direction, args.vm or None, on_point)
    doc = {**report.to_json(), "direction": args.direction, "remote": remote.name,
           "wire_bytes_sent": link.sent, "wire_bytes_received": link.received}
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"{args.direction} {remote.name}: {len(report.points_sent)} points sent, {report.points_skipped} "
              f"already there or older; {report.chunks_sent} chunks, {human_bytes(link.sent)} sent and "
              f"{human_bytes(link.received)} received for {human_bytes(report.logical_bytes)} of disks "
              f"in {report.seconds:.1f} s")
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
    sub.add_argument("--config", metavar="FILE", required=True, help="TOML configuration naming the [[remotes]]")
    sub.add_argument("--remote", required=True, metavar="NAME", help="the [[remotes]] entry to replicate with")
    sub.add_argument("--vm", action="append", type=VM_ARG, metavar="VM", help="only this VM; repeatable (default: all)")
    sub.add_argument("--rate-limit-mib", type=float, metavar="MIB_PER_S",
                     help="bytes on the link per second, in MiB (default: the remote's rate_limit_mib, or none)")
    sub.add_argument("--streams", type=int, choices=range(1, 33), metavar="N",
                     help="parallel transfers (default: the remote's streams, 4)")
    sub.add_argument("--json", action="store_true", help="print the report as one JSON object")

    sub = command("api-certificate", cmd_api_certificate,
                  "print the SHA-256 fingerprint of this appliance's API certificate (made if absent)")
    sub.epilog = "Copy it into the other appliance's [[remotes]] entry: it pins this certificate."
    sub.add_argument("--config", metavar="FILE", help="TOML configuration (store and api.tls_*; default: the store's "
                     "self-signed certificate)")
    sub.add_argument("--json", action="store_true", help="print the certificate path and fingerprint as JSON")
