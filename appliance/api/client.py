"""The CLI's way to act on a running appliance: its HTTP API, with the store's token.

Errors come back as the appliance's own exceptions (the server names the kind), so a
command fails with the same message and exit code whether it ran here or in the server.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from appliance import errors
from appliance.api.access import PREFIX, RuntimeInfo, load_token, read_runtime
from appliance.api.tls import trusting

#: Generous: a commit of a large session answers only when it is stored.
REQUEST_TIMEOUT_SECONDS = 3600.0


def _error_of(kind_name: str, message: str) -> errors.ApplianceError:
    """The server's error as the same kind here (its exit code included)."""
    kind = getattr(errors, kind_name, None)
    if isinstance(kind, type) and issubclass(kind, errors.ApplianceError):
        try:
            return kind(message)
        except TypeError:  # a kind built from parts (ConfigError): keep the message and exit code
            error = errors.ApplianceError(message)
            error.exit_code = kind.exit_code
            return error
    return errors.ApplianceError(message)


class ApiClient:
    def __init__(self, base_url: str, token: str, verify: ssl.SSLContext | bool = True) -> None:
        self._client = httpx.Client(base_url=base_url + PREFIX, timeout=REQUEST_TIMEOUT_SECONDS, verify=verify,
                                    headers={"Authorization": f"Bearer {token}"})

    @classmethod
    def for_store(cls, store_path: Path) -> ApiClient | None:
        """A client of the server that runs this store, or None when none runs."""
        info: RuntimeInfo | None = read_runtime(store_path)
        if info is None:
            return None
        verify: ssl.SSLContext | bool = True
        if info.tls_cert_file is not None:
            verify = trusting(Path(info.tls_cert_file).read_text())
        return cls(info.api_url, load_token(Path(info.token_file)), verify)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **request: Any) -> httpx.Response:
        """The server's answer; an error answer raised as the appliance error it names."""
        try:
            response = self._client.request(method, path, **request)
        except httpx.HTTPError as exc:
            raise errors.ApplianceError(f"the appliance's API at {self._client.base_url} did not answer: {exc}") from None
        if response.is_success:
            return response
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "message" in doc:
            raise _error_of(str(doc.get("error")), str(doc["message"]))
        raise errors.ApplianceError(f"the appliance's API answered {response.status_code} to {method} {path}")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._send(method, path, json=body)
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError:
            return None

    def exchange(self, method: str, path: str, content: bytes | None = None,
                 params: list[tuple[str, str]] | None = None, content_type: str = "application/octet-stream") -> bytes:
        """A request and its answer as bytes (replication's chunk lists, records and manifests)."""
        return self._send(method, path, content=content, params=params, headers={"Content-Type": content_type}).content

    def wait_job(self, job_id: str, poll_seconds: float = 0.5, on_change: Any = None) -> dict[str, Any]:
        """Poll a job until it finishes; `on_change(job)` sees each new state of it."""
        seen = None
        while True:
            job = self.call("GET", f"/jobs/{job_id}")
            marker = (job["state"], len(job["steps"]), len(job["log"]))
            if marker != seen and on_change is not None:
                on_change(job)
            seen = marker
            if job["finished"] is not None:
                return job
            time.sleep(poll_seconds)
