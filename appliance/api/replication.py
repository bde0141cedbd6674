"""Replication as API resources: what another appliance pushes to, or pulls from, this one.

Bodies are binary (`appliance.replication.wire`), not JSON: chunk IDs and compressed
records would grow by a third in base64, and the records go to disk as they came.
Every route needs the API token like any other; a pushing appliance is a client of
this API, with its own copy of this appliance's token.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from appliance import errors
from appliance.api.access import PREFIX
from appliance.api.models import PointRef, PointRemoval, ReplicationCreate, VmName
from appliance.api.responses import documented
from appliance.control import Control
from appliance.replication.local import LocalSource, LocalTarget
from appliance.replication.service import ReplicationService
from appliance.replication.wire import decode_ids, decode_pairs, encode_ids
from appliance.store.manifests import decode_manifest, encode_manifest

#: A record stream of one batch is at most `run.BATCH_BYTES` plus headers; this leaves room.
MAX_BODY_BYTES = 256 << 20
BINARY = "application/octet-stream"
#: The OpenAPI document's word for a binary body (FastAPI cannot infer it from `Request`).
BINARY_SCHEMA = {"schema": {"type": "string", "format": "binary"}}
BINARY_BODY = {"requestBody": {"required": True, "content": {BINARY: BINARY_SCHEMA}}}


def binary_answer(*kinds: type[errors.ApplianceError]) -> dict[int | str, dict[str, Any]]:
    """The `responses` of an operation answering binary (200), with its errors."""
    return {200: {"description": "binary (see the README)",
                  "content": {BINARY: BINARY_SCHEMA}}, **documented(*kinds)}


async def _body(request: Request) -> bytes:
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_BODY_BYTES:
        raise errors.InvalidRequest(f"a body of {declared} bytes is over the limit of {MAX_BODY_BYTES}")
    body = await request.body()
    if not body:
        raise errors.InvalidRequest("the body is empty: this operation takes a binary body (see the README)")
    if len(body) > MAX_BODY_BYTES:
        raise errors.InvalidRequest(f"a body of {len(body)} bytes is over the limit of {MAX_BODY_BYTES}")
    return body


def _json(doc: Any) -> Response:
    return Response(json.dumps(doc), media_type="application/json")


def replication_routes(app: FastAPI, control: Control, service: ReplicationService | None) -> None:
    if service is not None:
        _job_routes(app, service)
    source = LocalSource(control.store)
    target = LocalTarget(control.store)
    base = f"{PREFIX}/replication"

    @app.get(f"{base}/identity", responses=documented(takes_input=False))
    def identity() -> dict[str, object]:
        """This store's ID, chunk size and chunk-ID scheme: two stores replicate only when the last two agree."""
        return target.identity().to_json()

    @app.get(f"{base}/points", responses=documented())
    def points(vm: Annotated[VmName | None, Query()] = None) -> list[dict[str, object]]:
        """Restore points, oldest first, of one VM (of all when none is named)."""
        return [point.to_json() for point in source.points(None if vm is None else [vm])]

    @app.get(f"{base}/points/{{point}}/manifest", responses=binary_answer(errors.NotFound))
    def manifest(point: PointRef) -> Response:
        """A point's manifest: the point, its chunk maps and its config files (binary)."""
        return Response(encode_manifest(source.manifest(point)), media_type=BINARY)

    @app.post(f"{base}/records", responses=binary_answer(errors.NotFound, errors.IntegrityError),
              openapi_extra=BINARY_BODY)
    async def records(request: Request) -> Response:
        """A chunk stream of the (chunk ID, base ID) pairs in the body: stored records, or deltas against the bases."""
        pairs = decode_pairs(await _body(request))
        return Response(await run_in_threadpool(source.records, pairs), media_type=BINARY)

    @app.post(f"{base}/missing", responses=binary_answer(), openapi_extra=BINARY_BODY)
    async def missing(request: Request) -> Response:
        """Which of the chunk IDs in the body this store lacks."""
        ids = decode_ids(await _body(request))
        return Response(encode_ids(await run_in_threadpool(target.missing, ids)), media_type=BINARY)

    @app.post(f"{base}/chunks", responses=documented(errors.ChunkRefused, errors.ChunksMissing, errors.StoreBusy),
              openapi_extra=BINARY_BODY)
    async def chunks(request: Request) -> Response:
        """Keep a chunk stream; each chunk must hash to its ID, or the whole batch is refused."""
        body = await _body(request)
        return _json({"stored": await run_in_threadpool(target.store, body)})

    @app.post(f"{base}/points", responses=documented(errors.ChunksMissing, errors.StoreBusy), openapi_extra=BINARY_BODY)
    async def commit(request: Request) -> Response:
        """Add a restore point from its manifest, once every chunk it names is here."""
        manifest = decode_manifest(await _body(request))
        return _json({"committed": await run_in_threadpool(target.commit, manifest)})

    @app.post(f"{base}/removals", responses=documented(errors.StoreBusy))
    async def removals(body: PointRemoval) -> dict[str, list[str]]:
        """Delete restore points the replicating source no longer has (points a session holds stay)."""
        return {"removed": await run_in_threadpool(target.remove, body.points)}


def _job_routes(app: FastAPI, service: ReplicationService) -> None:
    """The jobs this appliance runs against its configured remotes."""

    @app.get(f"{PREFIX}/remotes", responses=documented(takes_input=False))
    def remotes() -> list[dict[str, Any]]:
        """The configured remotes and their schedules (never their tokens)."""
        return service.remotes()

    @app.post(f"{PREFIX}/replications", status_code=202, responses=documented(errors.NotFound, errors.TryAgain))
    async def start(body: ReplicationCreate) -> dict[str, Any]:
        """Push or pull now; poll the job for its figures (bytes on the wire, chunks and points sent)."""
        return service.submit(body.remote, body.direction, body.vms, body.remove_vanished).to_dict()
