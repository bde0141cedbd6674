"""How a client finds and may use a running appliance's API: its token and its address.

The token is a random secret in a root-only file: ``api.token_file`` from the config,
or ``STORE/api.token`` made on first start. A serving process writes
``STORE/serve.json`` (its pid, API URL and token file) and removes it on exit, so the
CLI on the same host acts through the running server instead of fighting it for the
datastore lock.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.durable import create_durably, replace_atomically
from appliance.errors import ConfigError

#: Where every resource of the API lives (`appliance.api.app` serves it, the client calls it).
PREFIX = "/api/v1"
TOKEN_NAME = "api.token"
RUNTIME_NAME = "serve.json"
TOKEN_BYTES = 32


def token_path(store_path: Path, configured: Path | None) -> Path:
    return configured if configured is not None else store_path / TOKEN_NAME


def load_token(path: Path, create: bool = False) -> str:
    """The token in `path` (made when `create` and absent); refused unless only its owner can read it."""
    if create:
        create_durably(path, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode())
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the API token: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(str(path), f"the API token is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if len(token) < 16:
        raise ConfigError(str(path), f"the API token holds {len(token)} characters; at least 16 are required")
    return token


@dataclass(frozen=True)
class RuntimeInfo:
    """What `serve.json` says about the serving process."""

    pid: int
    api_url: str
    token_file: str
    tls_cert_file: str | None = None  # the API's certificate when it serves https (the CLI trusts exactly it)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def write_runtime(store_path: Path, info: RuntimeInfo) -> None:
    replace_atomically(store_path / RUNTIME_NAME, json.dumps(asdict(info)).encode())


def remove_runtime(store_path: Path) -> None:
    (store_path / RUNTIME_NAME).unlink(missing_ok=True)


def read_runtime(store_path: Path) -> RuntimeInfo | None:
    """The running server of this store, or None when there is none (or it died)."""
    try:
        info = RuntimeInfo(**json.loads((store_path / RUNTIME_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return info if info.alive() else None
