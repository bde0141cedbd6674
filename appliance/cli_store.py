"""The store's own commands: `init` (a new store, or one more gateway of a store in S3), and `store`
(the local index rebuilt from, or brought level with, the packs and manifests)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from appliance.cli_args import Command, store_path
from appliance.config_store import StoreConfig as StoreSettings
from appliance.errors import ConfigError, UsageError
from appliance.progress import human_bytes
from appliance.store import init_store, open_store
from appliance.store.repository import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL

#: init's S3 flags, by `[store]` key: the same checks as in a configuration file.
S3_INIT_FLAGS = ("endpoint", "bucket", "prefix", "region", "ca_file", "credentials_file", "access_key_env",
                 "secret_key_env")


def _init_settings(args: argparse.Namespace) -> StoreSettings:
    """The `[store]` section of --config, or one built from --store and the --s3-* flags (refusals name the flag)."""
    from appliance.config import build_document, load_config

    if args.config:
        return load_config(Path(args.config)).store
    table: dict[str, Any] = {"path": os.path.abspath(store_path(args))}
    given = {key: getattr(args, f"s3_{key}") for key in S3_INIT_FLAGS if getattr(args, f"s3_{key}") is not None}
    if given:
        table.update(given, backend="s3")
    try:
        settings: StoreSettings = build_document(StoreSettings, table, "command line")
    except ConfigError as exc:
        if exc.key in S3_INIT_FLAGS:
            raise UsageError(f"--s3-{exc.key.replace('_', '-')}: {exc.reason}") from None
        raise
    return settings


def cmd_init(args: argparse.Namespace) -> int:
    settings = _init_settings(args)
    location = settings.s3_location()
    config = init_store(settings.path, chunk_size=args.chunk_size, compression_level=args.compression_level,
                        s3=location, join=args.join, gc_grace_seconds=args.gc_grace_minutes * 60.0)
    where = "" if location is None else f", packs in {location.url(location.prefix)}, gateway {config.gateway}"
    print(f"initialised store {settings.path} (id {config.store_id}, chunk size {human_bytes(config.chunk_size)}"
          f"{where})")
    if args.join:
        from appliance.store.refresh import refresh

        with open_store(settings.path) as store, store.writer_lock():
            print(f"joined: {refresh(store).summary()}")
    return 0


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


def register_init(command: Command) -> None:
    """Add `init` to the `appliance` parser."""
    sub = command("init", cmd_init, "create an empty store")
    sub.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes, power of two")
    sub.add_argument("--compression-level", type=int, default=DEFAULT_COMPRESSION_LEVEL, help="zstd level")
    sub.add_argument("--config", metavar="FILE", help="create the store its [store] section describes")
    sub.add_argument("--join", action="store_true",
                     help="become one more gateway of the store already in the S3 bucket and prefix")
    sub.add_argument("--gc-grace-minutes", type=float, default=60.0, metavar="M",
                     help="in a shared bucket, how long packs GC condemned stay readable (default 60)")
    for key in S3_INIT_FLAGS:
        sub.add_argument(f"--s3-{key.replace('_', '-')}", dest=f"s3_{key}",
                         help="keep packs in this S3 bucket (the [store] key of that name)" if key == "bucket" else
                         f"the [store] key {key} of an S3 store")


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
