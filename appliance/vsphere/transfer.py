"""Reading disk files from an ESXi datastore: the transport behind vSphere backups.

The appliance has no VDDK (a proprietary C library), so it reads the files a backup
snapshot points to over HTTPS from the datastore file service that vCenter and ESXi
serve, `GET /folder/<path>?dcPath=<datacenter>&dsName=<datastore>`, with one byte range
per request, to the `Endpoint` that `appliance.vsphere.endpoints` picks: the ESXi host
that runs the VM, directly.

`DiskTransport` is what the backup job needs from any transport, so an NFC reader
(port 902) can stand beside this one. `FolderTransport` trusts an answer only when it
is exactly the range asked for: a `200` (the server ignored the Range), a
`Content-Range` that differs from the request or a body of another length is an
error, never data. `503` (host busy) and dropped connections are retried with backoff;
`401` (the session expired) logs in again first.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import time
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import quote, urlencode

from pyVmomi import vim

from appliance.errors import TransferError
from appliance.vsphere.client import Session, tls_context
from appliance.vsphere.endpoints import Endpoint

#: Attempts per request before the read fails; the pause doubles from FIRST_PAUSE up to LAST_PAUSE.
ATTEMPTS = 6
FIRST_PAUSE = 0.2
LAST_PAUSE = 5.0
#: Descriptors are a few hundred bytes; anything larger is not a descriptor.
DESCRIPTOR_LIMIT = 64 * 1024

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_DATASTORE_PATH = re.compile(r"\[([^\]]+)\] ?(.*)")


@dataclass(frozen=True)
class DatastoreFile:
    """A file as vSphere names it, `[datastore] folder/name.vmdk`, and the datacenter that holds it."""

    datacenter: str  # inventory path of the datacenter, folders included: "Europe/DC1"
    datastore: str
    path: str  # inside the datastore, "/"-separated

    @classmethod
    def parse(cls, datacenter: str, name: str) -> DatastoreFile:
        match = _DATASTORE_PATH.fullmatch(name)
        if match is None or not match.group(2):
            raise TransferError(f"{name!r} is not a datastore path like '[datastore] folder/disk.vmdk'")
        return cls(datacenter, match.group(1), match.group(2))

    def sibling(self, name: str) -> DatastoreFile:
        """A file named relative to this one's folder, as a descriptor names its extents."""
        folder = self.path.rsplit("/", 1)[0] + "/" if "/" in self.path else ""
        return DatastoreFile(self.datacenter, self.datastore, folder + name)

    def __str__(self) -> str:
        return f"[{self.datastore}] {self.path}"


class DiskTransport(Protocol):
    """How a backup reads the files of a snapshot's disks; safe to call from several threads."""

    def read_file(self, file: DatastoreFile, limit: int) -> bytes:
        """A whole small file (a descriptor); TransferError if it is larger than `limit`."""
        ...

    def read_range(self, file: DatastoreFile, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`, or TransferError."""
        ...

    def close(self) -> None: ...


def datacenter_path(datacenter: vim.Datacenter) -> str:
    """The `dcPath` of a datacenter: its name after the folders it is nested in, below the root."""
    names = [datacenter.name]
    parent = datacenter.parent
    while isinstance(parent, vim.Folder) and parent.parent is not None:
        names.append(parent.name)
        parent = parent.parent
    return "/".join(reversed(names))


def folder_target(file: DatastoreFile) -> str:
    """The request target of a file: every name percent-encoded, so spaces, `#`, `?` and `&` survive."""
    query = urlencode({"dcPath": file.datacenter, "dsName": file.datastore}, quote_via=quote)
    return f"/folder/{quote(file.path, safe='/')}?{query}"


class _Retry(Exception):
    """One attempt failed in a way the next may not; `renew` says the login must be made again first."""

    def __init__(self, reason: str, renew: bool = False) -> None:
        super().__init__(reason)
        self.renew = renew


class FolderTransport:
    """`/folder` reads over one keep-alive HTTPS connection per calling thread."""

    def __init__(self, session: Session, endpoint: Endpoint) -> None:
        self._session = session
        self._endpoint = endpoint
        self._tls: ssl.SSLContext = tls_context(session.settings)
        self._timeout = session.settings.timeout
        self._local = threading.local()
        self._connections: list[http.client.HTTPSConnection] = []
        self._lock = threading.Lock()
        self.requests = 0  # answered requests, retries included (for the job's report)

    def read_file(self, file: DatastoreFile, limit: int) -> bytes:
        def attempt(connection: http.client.HTTPSConnection) -> bytes:
            response = self._get(connection, file, {})
            body = self._body(connection, response, limit + 1, file)
            if response.status != 200:
                raise self._refusal(response.status, file, body)
            announced = response.getheader("Content-Length")
            if announced is not None and announced.isdigit() and len(body) < min(int(announced), limit + 1):
                connection.close()
                raise _Retry(f"{file}: the answer ended after {len(body)} of {announced} bytes")
            if len(body) > limit:
                raise TransferError(f"{file} is larger than {limit} bytes: not a disk descriptor")
            return body

        return self._with_retries(attempt, file)

    def read_range(self, file: DatastoreFile, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        last = offset + length - 1

        def attempt(connection: http.client.HTTPSConnection) -> bytes:
            response = self._get(connection, file, {"Range": f"bytes={offset}-{last}"})
            if response.status == 206:
                answered = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range", "").strip())
                if answered is None or (int(answered.group(1)), int(answered.group(2))) != (offset, last):
                    response.close()
                    connection.close()
                    raise TransferError(f"{file}: asked for bytes {offset}-{last}, the server answered the range "
                                        f"{response.getheader('Content-Range')!r}")
                if response.length is not None and response.length != length:
                    response.close()
                    connection.close()
                    raise TransferError(f"{file}: asked for {length} bytes, the answer announces {response.length}")
                body = self._body(connection, response, length, file)
                if len(body) != length:
                    connection.close()
                    raise _Retry(f"{file}: the answer for bytes {offset}-{last} ended after {len(body)} bytes")
                return body
            if response.status == 200:
                response.close()
                connection.close()
                raise TransferError(f"{file}: the server ignored the byte range {offset}-{last} and sent the whole "
                                    "file (200 instead of 206); refusing to guess which bytes are which")
            raise self._refusal(response.status, file, self._body(connection, response, 4096, file))

        return self._with_retries(attempt, file)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def _with_retries(self, attempt: "_Attempt", file: DatastoreFile) -> bytes:
        pause = FIRST_PAUSE
        for number in range(1, ATTEMPTS + 1):
            generation = self._session.generation
            try:
                return attempt(self._connection())
            except _Retry as retry:
                if number == ATTEMPTS:
                    raise TransferError(f"{retry} (gave up after {ATTEMPTS} attempts)") from None
                if retry.renew:
                    self._endpoint.credentials.refused(generation)
                time.sleep(pause)
                pause = min(pause * 2, LAST_PAUSE)
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPSConnection:
        connection: http.client.HTTPSConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPSConnection(self._endpoint.address, self._endpoint.port,
                                                     timeout=self._timeout, context=self._tls)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _get(self, connection: http.client.HTTPSConnection, file: DatastoreFile,
             headers: dict[str, str]) -> http.client.HTTPResponse:
        endpoint = self._endpoint
        target = folder_target(file if endpoint.datacenter is None else replace(file, datacenter=endpoint.datacenter))
        cookie = endpoint.credentials.cookie(f"https://{endpoint}{target}")
        try:
            connection.request("GET", target, headers={**headers, "Cookie": cookie})
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _Retry(f"{file}: connection to {endpoint} failed: {exc or type(exc).__name__}") from None
        endpoint.credentials.answered(response.getheader("Set-Cookie"))
        self.requests += 1
        if response.status == 401:
            response.read()
            raise _Retry(f"{file}: the session was refused (401)", renew=True)
        if response.status == 503:
            response.read()
            raise _Retry(f"{file}: the host is busy (503)")
        return response

    @staticmethod
    def _body(connection: http.client.HTTPSConnection, response: http.client.HTTPResponse, limit: int,
              file: DatastoreFile) -> bytes:
        """Up to `limit` bytes of the body; a body left unread (or cut off) takes its connection with it."""
        parts, got = [], 0
        try:
            while got < limit:
                part = response.read(limit - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _Retry(f"{file}: the answer broke off: {exc or type(exc).__name__}") from None
        if not response.isclosed():
            connection.close()
        return b"".join(parts)

    @staticmethod
    def _refusal(status: int, file: DatastoreFile, body: bytes) -> TransferError:
        what = {404: "no such file", 500: "the host cannot open it (a running VM's live disk is locked)",
                403: "permission denied"}.get(status, "refused")
        detail = body.decode("utf-8", "replace").strip().splitlines()
        return TransferError(f"{file}: {what} (HTTP {status}{': ' + detail[0][:200] if detail else ''})")


class _Attempt(Protocol):
    def __call__(self, connection: http.client.HTTPSConnection) -> bytes: ...

