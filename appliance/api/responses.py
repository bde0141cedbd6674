"""How the API answers with an error, and how its OpenAPI document says so.

Every error, whether a route raised it, the request failed its schema, the path is
unknown or the method is wrong, is answered with the same body (`ErrorBody`) and a
status from one table (`STATUSES`). Routes name the appliance errors they can raise
(`documented`), and the document's responses are built from that same table, so a
status the server answers with is a status the document declares.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from appliance import errors

#: Appliance errors -> HTTP status, first match wins (subclasses before their bases).
STATUSES: tuple[tuple[type[errors.ApplianceError], int], ...] = (
    (errors.Unauthorized, 401),
    (errors.NotFound, 404),
    (errors.MethodNotAllowed, 405),
    (errors.AlreadyExists, 409),
    (errors.SessionBusy, 409),
    (errors.TryAgain, 409),
    (errors.NotConfigured, 409),
    (errors.OutputRefused, 409),
    (errors.UnreadableVolume, 409),
    (errors.IsADirectory, 409),
    (errors.RangeNotSatisfiable, 416),
    (errors.ChunksMissing, 409),
    (errors.ChunkRefused, 422),
    (errors.StoreBusy, 503),
    (errors.LimitReached, 429),
    (errors.InvalidRequest, 422),
    (errors.InvalidName, 400),
    (errors.UsageError, 400),
    (errors.ConfigError, 400),
    (errors.ReadOnly, 403),
    (errors.BackupRefused, 409),
    (errors.VsphereError, 502),
)


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="the kind of error (the appliance's error class), e.g. NotFound")
    message: str = Field(description="one line that names what was refused and why")


class ErrorResponse(JSONResponse):
    """JSON kept to ASCII: a message may quote a name with characters UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode()


def status_for(kind: type[errors.ApplianceError]) -> int:
    return next((status for known, status in STATUSES if issubclass(kind, known)), 500)


def error_response(exc: errors.ApplianceError, headers: dict[str, str] | None = None) -> ErrorResponse:
    return ErrorResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status_for(type(exc)),
                         headers=headers)


def documented(*kinds: type[errors.ApplianceError], takes_input: bool = True) -> dict[int | str, dict[str, Any]]:
    """The `responses` of an operation that can raise `kinds`.

    Every operation can answer 401 (no token) and one that takes a path parameter or a
    body can answer 422 (the request breaks its schema).
    """
    every: list[type[errors.ApplianceError]] = [errors.Unauthorized, *kinds]
    if takes_input:
        every.append(errors.InvalidRequest)
    by_status: dict[int, list[str]] = {}
    for kind in every:
        by_status.setdefault(status_for(kind), []).append(kind.__name__)
    return {status: {"model": ErrorBody, "description": " or ".join(names)} for status, names in sorted(by_status.items())}


def _field_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location)


def install_error_handlers(app: FastAPI) -> None:
    """Route errors, schema failures and unknown paths all answer with an `ErrorBody`."""

    @app.exception_handler(errors.ApplianceError)
    async def appliance_error(request: Request, exc: errors.ApplianceError) -> ErrorResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> ErrorResponse:
        problems = "; ".join(f"{_field_path(problem['loc'])}: {problem['msg']}" for problem in exc.errors())
        return error_response(errors.InvalidRequest(problems or "the request does not match its schema"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> ErrorResponse:
        if exc.status_code == 404:
            return error_response(errors.NotFound(f"no resource at {request.url.path}"))
        if exc.status_code == 400:  # a body that is not JSON at all
            return error_response(errors.InvalidRequest(str(exc.detail)))
        return ErrorResponse({"error": "HTTPError", "message": str(exc.detail)}, status_code=exc.status_code)


class MethodCheck:
    """ASGI middleware: a method a path does not answer gets 405 with the path's whole `Allow`.

    The router answers from the first route whose path matches, so a path served by two
    routes (GET and POST /sessions) would name only one of its methods.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            allowed = self._allowed(scope)
            if allowed and scope["method"] not in allowed:
                listed = ", ".join(sorted(allowed))
                refusal = errors.MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']} (allowed: {listed})")
                await error_response(refusal, headers={"Allow": listed})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> set[str]:
        """The methods of every route whose path matches, whatever its method."""
        allowed: set[str] = set()
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            methods = getattr(route, "methods", None)
            if match != Match.NONE and methods:
                allowed |= methods
        return allowed

