"""Restore-point manifests: a point with everything but its chunks, kept as an object beside the packs.

The LMDB catalog is where points are looked up; the manifests are what it is rebuilt
from (`appliance.store.refresh`), and what other gateways of a shared bucket learn new
points from. So a point's manifest is written after its packs are sealed and before the
catalog commit, and deleted before the catalog forgets the point: a manifest never names
a chunk that no sealed pack holds, and a crash between the two steps leaves a point that
the next refresh adds (or drops) everywhere alike.

Encoding (also what replication sends)::

    u32 (big-endian)  length of the JSON document
    JSON              {"point": RestorePoint.to_json(), "files": [names]}
    maps              one chunk map per disk, in disk order (32 bytes per chunk)
    files             each named file, u32 length then its bytes, in the JSON's order

The maps' lengths follow from the point's disks (`chunks` entries each), so a manifest
whose sizes disagree with its point is refused as a whole. As an object
(``manifests/<point id>.manifest``) it is framed: magic (8), xxh3-64 of the rest (8),
then the encoding compressed with zstd.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Final

import lmdb
import xxhash
import zstandard

from appliance.errors import IntegrityError, InvalidRequest, NotFound
from appliance.names import POINT_REF
from appliance.store import formats
from appliance.store.catalog import Catalog, RestorePoint, referenced_chunks
from appliance.store.packs import PackBackend

MANIFEST_MAGIC: Final = formats.magic_for("instant-recovery-appliance manifest v1")
_LENGTH = struct.Struct(">I")
_FOLDER = "manifests/"
_SUFFIX = ".manifest"
_COMPRESSION_LEVEL = 3


@dataclass(frozen=True)
class Manifest:
    """A restore point, its chunk maps and its small files: everything but the chunks."""

    point: RestorePoint
    maps: tuple[bytes, ...]
    files: dict[str, bytes]

    def chunk_ids(self) -> set[bytes]:
        """The distinct stored chunks the point needs (zero slots need none)."""
        found: set[bytes] = set()
        for chunk_map in self.maps:
            found |= referenced_chunks(chunk_map)
        return found


def manifest_of(txn: lmdb.Transaction, catalog: Catalog, point_id: str) -> Manifest:
    """A committed point's manifest, read from the catalog."""
    point = catalog.get_point(txn, point_id)
    maps = tuple(catalog.chunk_map(txn, point, disk) for disk in range(len(point.disks)))
    return Manifest(point, maps, {name: catalog.file(txn, point, name) for name in point.files})


def encode_manifest(manifest: Manifest) -> bytes:
    names = sorted(manifest.files)
    doc = json.dumps({"point": manifest.point.to_json(), "files": names}).encode()
    parts = [_LENGTH.pack(len(doc)), doc, *manifest.maps]
    for name in names:
        parts += [_LENGTH.pack(len(manifest.files[name])), manifest.files[name]]
    return b"".join(parts)


def decode_manifest(body: bytes) -> Manifest:
    """The manifest in `body`; any disagreement between its parts is an InvalidRequest."""
    try:
        (length,) = _LENGTH.unpack_from(body)
        doc = json.loads(body[4 : 4 + length])
        point = RestorePoint.from_json(doc["point"])
        names = [str(name) for name in doc["files"]]
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(f"not a restore point manifest: {type(exc).__name__}: {exc}") from None
    offset = 4 + length
    maps = []
    for disk in point.disks:
        size = disk.chunks * formats.CHUNK_ID_SIZE
        maps.append(body[offset : offset + size])
        offset += size
        if len(maps[-1]) != size:
            raise InvalidRequest(f"manifest of point {point.id}: the map of disk {disk.name!r} is truncated")
    files = {}
    for name in names:
        if offset + 4 > len(body):
            raise InvalidRequest(f"manifest of point {point.id}: file {name!r} is truncated")
        (size,) = _LENGTH.unpack_from(body, offset)
        files[name] = body[offset + 4 : offset + 4 + size]
        offset += 4 + size
        if len(files[name]) != size:
            raise InvalidRequest(f"manifest of point {point.id}: file {name!r} is truncated")
    if offset != len(body):
        raise InvalidRequest(f"manifest of point {point.id}: {len(body) - offset} bytes after its last part")
    if sorted(names) != sorted(point.files):
        raise InvalidRequest(f"manifest of point {point.id}: its files {names} are not the point's {list(point.files)}")
    return Manifest(point, tuple(maps), files)


class ManifestShelf:
    """The manifests of a store's points, one object each, in the store's pack backend."""

    def __init__(self, packs: PackBackend) -> None:
        self._packs = packs

    @staticmethod
    def name_of(point_id: str) -> str:
        return f"{_FOLDER}{POINT_REF.check(point_id)}{_SUFFIX}"

    def put(self, manifest: Manifest) -> None:
        """Publish a new point's manifest; never replaces another point's (ids are unique, writes create-only)."""
        body = zstandard.ZstdCompressor(level=_COMPRESSION_LEVEL).compress(encode_manifest(manifest))
        name = self.name_of(manifest.point.id)
        if not self._packs.put_object(name, MANIFEST_MAGIC + xxhash.xxh3_64_digest(body) + body, create_only=True):
            raise IntegrityError(f"manifest {name} already exists with other contents: point ids collided")

    def get(self, point_id: str) -> Manifest:
        name = self.name_of(point_id)
        data = self._packs.get_object(name)
        if data is None:
            raise NotFound(f"restore point {point_id} has no manifest")
        head = len(MANIFEST_MAGIC) + 8
        if data[: len(MANIFEST_MAGIC)] != MANIFEST_MAGIC or len(data) < head:
            raise IntegrityError(f"{name}: not a manifest")
        if xxhash.xxh3_64_digest(data[head:]) != data[len(MANIFEST_MAGIC) : head]:
            raise IntegrityError(f"{name}: manifest checksum mismatch")
        try:
            manifest = decode_manifest(zstandard.ZstdDecompressor().decompress(data[head:]))
        except (InvalidRequest, zstandard.ZstdError) as exc:
            raise IntegrityError(f"{name}: {exc}") from None
        if manifest.point.id != point_id:
            raise IntegrityError(f"{name}: holds point {manifest.point.id}")
        return manifest

    def point_ids(self) -> set[str]:
        return {name[len(_FOLDER) : -len(_SUFFIX)] for name in self._packs.list_objects(_FOLDER)
                if name.endswith(_SUFFIX)}

    def delete(self, point_id: str) -> None:
        self._packs.delete_object(self.name_of(point_id))
