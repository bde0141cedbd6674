"""The `appliance session` commands: offline on the store, or through the API of the `serve` that holds it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli_args import POINT_ARG, SESSION_ARG, VM_ARG, Command, store_path
from appliance.store import Store, open_store

if TYPE_CHECKING:
    from appliance.datastore.namespace import Namespace
    from appliance.store.reader import ReadPath

@contextlib.contextmanager
def _datastore(args: argparse.Namespace) -> Iterator[tuple[Store, Namespace, ReadPath]]:
    from appliance.datastore.layout import ensure_tree
    from appliance.datastore.namespace import Namespace
    from appliance.store.reader import ReadPath

    with open_store(store_path(args)) as store, store.reader_lock(), ReadPath(store) as read_path:
        namespace = Namespace(store.env)
        ensure_tree(namespace)
        yield store, namespace, read_path


def _print_sessions(found: Sequence[Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps([dataclasses.asdict(s) for s in found], indent=2))
        return
    print(f"{'SESSION':<24} {'VM':<20} {'POINT':<22} {'CREATED (UTC)':<20} EXPIRES (UTC)")
    for s in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.created))
        expires = "-" if s.expires is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.expires))
        print(f"{s.name:<24} {s.vm:<20} {s.point:<22} {created:<20} {expires}")


def cmd_session(args: argparse.Namespace) -> int:
    """Offline on the store, or through the API of the `serve` that holds it."""
    from appliance.api.client import ApiClient
    from appliance import session_commit
    from appliance.datastore import sessions

    client = ApiClient.for_store(store_path(args))
    if client is not None:
        with client:
            return _session_via_api(client, args)
    with _datastore(args) as (store, namespace, read_path):
        if args.session_command == "create":
            expires = None if args.expires_hours is None else time.time() + args.expires_hours * 3600
            info = sessions.create_session(store, namespace, read_path, args.vm, args.point, args.name, expires)
            print(f"created session {info.name} of {info.vm} point {info.point}")
        elif args.session_command == "list":
            _print_sessions(sessions.list_sessions(namespace), args.json)
        elif args.session_command == "commit":
            point = session_commit.commit_session(store, namespace, read_path, args.name)
            _print_committed(args.name, point.id, point.vm)
        elif args.session_command == "export":
            session_commit.export_session_disk(store, namespace, read_path, args.name, args.disk, Path(args.output))
            print(f"exported session {args.name} disk {args.disk} to {args.output}", file=sys.stderr)
        else:
            sessions.delete_session(store, namespace, args.name)
            print(f"deleted session {args.name}")
    return 0


def _print_committed(name: str, point: str, vm: str) -> None:
    print(f"committed session {name} as point {point} of {vm}", file=sys.stderr)
    print(point)


def _session_via_api(client: Any, args: argparse.Namespace) -> int:
    from appliance.datastore.sessions import SessionInfo

    if args.session_command == "create":
        doc = client.call("POST", "/sessions", {"vm": args.vm, "point": args.point, "name": args.name,
                                               "expires_hours": args.expires_hours})
        print(f"created session {doc['name']} of {doc['vm']} point {doc['point']}")
    elif args.session_command == "list":
        found = [SessionInfo(**dict(doc, disks=tuple(doc["disks"]))) for doc in client.call("GET", "/sessions")]
        _print_sessions(found, args.json)
    elif args.session_command == "commit":
        doc = client.call("POST", f"/sessions/{args.name}/commit")
        _print_committed(args.name, doc["id"], doc["vm"])
    elif args.session_command == "export":
        client.call("POST", f"/sessions/{args.name}/export",
                    {"disk": args.disk, "output": os.path.abspath(args.output)})
        print(f"exported session {args.name} disk {args.disk} to {args.output}", file=sys.stderr)
    else:
        client.call("DELETE", f"/sessions/{args.name}")
        print(f"deleted session {args.name}")
    return 0


def register(command: Command) -> None:
    """Add `session` and its actions to the `appliance` parser."""
    sub = command("session", cmd_session, "writable sessions of restore points")
    session_commands = sub.add_subparsers(dest="session_command", required=True, metavar="ACTION")
    action = session_commands.add_parser("create", help="make a writable session of a restore point")
    action.add_argument("--vm", required=True, type=VM_ARG)
    action.add_argument("--point", required=True, type=POINT_ARG, help="point id, unique prefix, or latest")
    action.add_argument("--name", required=True, type=SESSION_ARG)
    action.add_argument("--expires-hours", type=float, metavar="H",
                        help="a serving appliance ends the session after H hours (default: limits.session_expiry_hours)")
    action = session_commands.add_parser("list", help="list sessions")
    action.add_argument("--json", action="store_true")
    action = session_commands.add_parser("commit", help="store a session's disks as a new restore point")
    action.add_argument("name", type=SESSION_ARG)
    action = session_commands.add_parser("export", help="write a session disk's merged view to a file")
    action.add_argument("name", type=SESSION_ARG)
    action.add_argument("--disk", type=int, default=0)
    action.add_argument("--output", required=True)
    action = session_commands.add_parser("delete", help="drop a session and its overlay")
    action.add_argument("name", type=SESSION_ARG)
