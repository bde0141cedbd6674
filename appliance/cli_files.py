"""The `appliance files` commands: browse, fetch and search files inside restore points."""

from __future__ import annotations

import argparse
import contextlib
import json
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli_args import POINT_ARG, VM_ARG, VOLUME_ARG, Command, store_path
from appliance.errors import UsageError
from appliance.progress import Progress, human_bytes
from appliance.store import Store, open_store

if TYPE_CHECKING:
    from appliance.flr.browse import PointFiles
    from appliance.flr.filesystems import FileNode
    from appliance.store.reader import ReadPath


@contextlib.contextmanager
def _read_path(args: argparse.Namespace) -> Iterator[tuple[Store, ReadPath]]:
    from appliance.store.reader import ReadPath

    with open_store(store_path(args)) as store, store.reader_lock(), ReadPath(store) as read_path:
        yield store, read_path


@contextlib.contextmanager
def _point_files(args: argparse.Namespace, point_ref: str) -> Iterator[PointFiles]:
    from appliance.flr.browse import PointFiles

    with _read_path(args) as (store, read_path):
        with store.env.begin() as txn:
            point = store.catalog.resolve(txn, args.vm, point_ref)
        files = PointFiles(read_path, point)
        yield files
        print(f"read {files.chunks_read} chunks of the store", file=sys.stderr)


def _when(mtime_ns: int | None) -> str:
    return "-" if mtime_ns is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mtime_ns // 1_000_000_000))


def _line(node: FileNode) -> str:
    mode = "-" if node.mode is None else stat.filemode(
        node.mode | {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(node.kind, stat.S_IFREG))
    link = f" -> {node.target}" if node.kind == "symlink" else ""
    name = node.name + ("/" if node.kind == "dir" else "")
    return f"{mode:<10} {node.size:>14} {_when(node.mtime_ns):<19} {name}{link}"


class Advance:
    """A progress line fed by increments: extraction reports the bytes it copies as it copies them."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, count: int) -> None:
        self.done += count
        self.progress(self.done, self.total)


def cmd_files_ls(args: argparse.Namespace) -> int:
    with _point_files(args, args.point) as files:
        if args.path is None:
            disks = range(len(files.point.disks)) if args.disk is None else [args.disk]
            listing = {disk: [volume.to_json() for volume in files.volumes(disk)] for disk in disks}
            if args.json:
                print(json.dumps({str(disk): volumes for disk, volumes in listing.items()}, indent=2))
                return 0
            for disk, volumes in listing.items():
                print(f"disk {disk} ({human_bytes(files.disk(disk).size)})")
                for volume in volumes:
                    problem = volume.get("refused") or volume.get("error")
                    print(f"  partition {volume['partition']}  {volume['scheme']:<4} {human_bytes(int(str(volume['size']))):>10}"
                          f"  {volume['format']:<9} {volume['type']}" + (f"  ({problem})" if problem else ""))
            return 0
        filesystem, node = files.locate(args.disk or 0, args.partition, args.path)
        found = filesystem.children(node) if node.kind == "dir" else [node]
        if args.json:
            print(json.dumps([entry.to_json() for entry in found], indent=2))
        else:
            for entry in found:
                print(_line(entry))
    return 0


def cmd_files_get(args: argparse.Namespace) -> int:
    from appliance.flr.extract import extract_file

    with _point_files(args, args.point) as files:
        filesystem, node = files.locate(args.disk or 0, args.partition, args.path)
        with Progress(f"get {node.name}") as progress:
            written = extract_file(filesystem, node, Path(args.output), Advance(progress, node.size))
        if args.json:
            print(json.dumps({**node.to_json(), "output": args.output, "bytes": written}))
        else:
            print(f"wrote {args.output} ({human_bytes(written)})", file=sys.stderr)
    return 0


def cmd_files_dump(args: argparse.Namespace) -> int:
    from appliance.flr.extract import copy_to, write_archive

    if args.output is None and sys.stdout.isatty():
        raise UsageError("files dump writes an archive: give --output FILE or redirect standard output")
    with _point_files(args, args.point) as files:
        filesystem, top = files.locate(args.disk or 0, args.partition, args.path)
        with Progress(f"dump {top.path}") as progress:
            advance = Advance(progress, 0)
            members = copy_to(None if args.output is None else Path(args.output),
                              lambda target: write_archive(filesystem, top, target, args.format, advance))
        print(f"{members} entries, {human_bytes(advance.done)} of file data", file=sys.stderr)
    return 0


def cmd_files_find(args: argparse.Namespace) -> int:
    from appliance.flr.browse import newest_points
    from appliance.flr.index import search

    with _read_path(args) as (store, read_path):
        with store.env.begin() as txn:
            points = newest_points(store.catalog.vm_points(txn, args.vm), args.points)
        matches = []
        for found in search(store, read_path, points, args.pattern):
            matches.append(found)
            if not args.json:
                node = found.node
                print(f"{found.point}  disk {found.disk} partition {found.partition}  {node.size:>14}  "
                      f"{_when(node.mtime_ns)}  {node.path}")
    if args.json:
        print(json.dumps([found.to_json() for found in matches], indent=2))
    return 0


def cmd_files_index(args: argparse.Namespace) -> int:
    from appliance.flr.index import build_index

    with _read_path(args) as (store, read_path):
        with store.env.begin() as txn:
            points = store.catalog.vm_points(txn, args.vm)
            chosen = points if args.all else [store.catalog.resolve(txn, args.vm, args.point)]
        for point in chosen:
            started = time.monotonic()
            count = build_index(store, read_path, point)
            print(f"indexed point {point.id}: {count} files in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


def register(command: Command) -> None:
    """Add `files` and its actions to the `appliance` parser."""
    sub = command("files", lambda args: int(args.files_handler(args)), "browse, fetch and search files in restore points")
    actions = sub.add_subparsers(dest="files_command", required=True, metavar="ACTION")

    def action(name: str, handler: object, help_text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        parser.set_defaults(files_handler=handler)
        parser.add_argument("--vm", required=True, type=VM_ARG)
        parser.add_argument("--json", action="store_true")
        return parser

    def where(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--point", default="latest", type=POINT_ARG, help="point id, unique prefix, or latest (default)")
        parser.add_argument("--disk", type=int, metavar="N", help="disk number, 0 first (default 0)")
        parser.add_argument("--partition", type=VOLUME_ARG, metavar="K",
                            help="partition number, or an LVM2 logical volume as K/VG/LV "
                                 "(default: the disk's only file system)")

    parser = action("ls", cmd_files_ls, "list a folder, or without PATH the disks' partitions and file systems")
    where(parser)
    parser.add_argument("path", nargs="?", metavar="PATH")
    parser = action("get", cmd_files_get, "copy one file out, keeping its mode and mtime")
    where(parser)
    parser.add_argument("path", metavar="PATH")
    parser.add_argument("--output", required=True, metavar="FILE", help="a new local file")
    parser = action("dump", cmd_files_dump, "stream a folder as a tar or zip archive")
    where(parser)
    parser.add_argument("path", metavar="PATH")
    parser.add_argument("--format", choices=("tar", "zip"), default="tar")
    parser.add_argument("--output", metavar="FILE", help="a new local file (default: standard output)")
    parser = action("find", cmd_files_find, "search file names (a glob) across restore points")
    parser.add_argument("pattern", metavar="NAME-GLOB")
    parser.add_argument("--points", default="all", help="all (default), latest, or N: the newest N points")
    parser = action("index", cmd_files_index, "index a point's files now, so find answers without parsing them "
                    "(a serving appliance indexes new points by itself)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--point", default="latest", type=POINT_ARG, help="point id, unique prefix, or latest (default)")
    which.add_argument("--all", action="store_true", help="every point of the VM")
