"""The `appliance store` commands: the local index rebuilt from, or brought level with, the packs and manifests."""

from __future__ import annotations

import argparse
import json
import sys

from appliance.cli_args import Command, store_path
from appliance.store import open_store


def cmd_store(args: argparse.Namespace) -> int:
    from appliance.store.refresh import rebuild_index, refresh

    if args.store_command == "rebuild-index":
        report, aside = rebuild_index(store_path(args))
        if aside is not None:
            print(f"the old index is kept in {aside}: delete it once the store serves again", file=sys.stderr)
    else:
        with open_store(store_path(args)) as store, store.writer_lock():
            report = refresh(store)
    for point_id in report.incomplete:
        print(f"warning: restore point {point_id} names chunks no pack holds: not added", file=sys.stderr)
    for reason in report.damaged:
        print(f"warning: {reason}: its restore point is not added", file=sys.stderr)
    print(json.dumps({"points_added": report.points_added, "points_dropped": report.points_dropped,
                      "packs_added": report.packs_added, "packs_dropped": report.packs_dropped,
                      "manifests_published": report.manifests_published, "incomplete": report.incomplete,
                      "damaged": report.damaged})
          if args.json else report.summary())
    return 0


def register(command: Command) -> None:
    """Add `store` and its actions to the `appliance` parser."""
    sub = command("store", cmd_store, "the store's local index: rebuild it, or refresh it from a shared bucket")
    actions = sub.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    action = actions.add_parser("rebuild-index", help="build the index afresh from the packs and the points' "
                                "manifests (a damaged or lost index); the old one is kept aside")
    action.add_argument("--json", action="store_true")
    action = actions.add_parser("refresh", help="add the points and packs other gateways of the bucket made, "
                                "drop those they removed (serve does this on its own)")
    action.add_argument("--json", action="store_true")
