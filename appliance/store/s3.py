"""Packs as immutable objects in an S3 bucket, behind the same `PackBackend` interface as a directory.

A pack is written to a local temporary file (as for the local backend), and `seal` PUTs
it whole as ``<prefix>packs/XX/<id:016x>.pack`` with ``If-None-Match: *``: a second
writer of the same id fails instead of replacing bytes an index may already point at.
Chunks are read back with ranged GETs that must return exactly the bytes asked.

obstore (Rust's object_store) is the client: its calls release the GIL, so the read
path's worker threads fetch in parallel, and it retries what is worth retrying (5xx,
dropped connections, timeouts of reads) with exponential backoff and jitter. What still
fails after that becomes a `StoreError` with the engine's reason; a missing or short
object is an `IntegrityError` naming the object, because the index promised it.

Only where the store's objects are and how to find its credentials is recorded in the
store's config (`S3Location`); the keys themselves come from the environment or a
root-only file each time the store is opened.
"""

from __future__ import annotations

import hashlib
import os
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    InvalidPathError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from appliance.config_checks import Invalid, read_secret, secret_file
from appliance.errors import ConfigError, IntegrityError, StoreError, StoreUnreachable
from appliance.store.formats import RecordHeader
from appliance.store.pack_index import encode_pack_index, index_object_name
from appliance.store.packs import PackWriter, pack_name, unsealed_in, unsealed_path

DEFAULT_ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
DEFAULT_SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
_REASON_LIMIT = 300
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where a store's packs live and where its credentials are found (never the credentials)."""

    endpoint: str
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    ca_file: str | None = None
    access_key_env: str | None = None
    secret_key_env: str | None = None
    credentials_file: str | None = None

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


@dataclass(frozen=True, slots=True)
class S3Retry:
    """How long a request may take and how often a transient failure is tried again.

    The defaults ride out an engine restart (a few seconds) but not an outage: a
    backup or an NFS read then fails with the reason rather than hanging.
    """

    max_retries: int = 30
    first_backoff: float = 0.2
    max_backoff: float = 4.0
    give_up_after: float = 60.0
    request_timeout: float = 30.0
    connect_timeout: float = 5.0


def read_credentials(location: S3Location, source: str,
                     environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The access key and secret key, read now; a missing one is a ConfigError naming the key to fix.

    Either `credentials_file` (root-only TOML with access_key_id and secret_access_key)
    or two environment variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY unless named).
    """
    if location.credentials_file is not None:
        try:
            path = secret_file(location.credentials_file)
            table = tomllib.loads(path.read_text())
        except Invalid as exc:
            raise ConfigError(source, exc.reason, "credentials_file") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(source, f"cannot read {location.credentials_file}: {exc}", "credentials_file") from None
        access, secret = table.get("access_key_id"), table.get("secret_access_key")
        if not (isinstance(access, str) and access and isinstance(secret, str) and secret):
            raise ConfigError(source, f"{location.credentials_file} must give access_key_id and secret_access_key "
                                      "as strings", "credentials_file")
        return access, secret
    found = []
    for env, key in ((location.access_key_env or DEFAULT_ACCESS_KEY_ENV, "access_key_env"),
                     (location.secret_key_env or DEFAULT_SECRET_KEY_ENV, "secret_key_env")):
        try:
            found.append(read_secret(env, None, (key, key), environ).reveal())
        except Invalid as exc:
            raise ConfigError(source, f"no S3 credentials: {exc.reason}", exc.key) from None
    return found[0], found[1]


def _reason(exc: BaseException) -> str:
    """The engine's first line of complaint, short enough for one log line."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return line if len(line) <= _REASON_LIMIT else line[:_REASON_LIMIT] + "..."


class S3PackBackend:
    """`PackBackend` on an S3 bucket; one client shared by all threads (obstore's is thread-safe)."""

    def __init__(self, location: S3Location, credentials: tuple[str, str], temp_dir: Path,
                 retry: S3Retry = S3Retry()) -> None:
        self.location = location
        self._temp_dir = temp_dir
        self._prefix = location.prefix
        self._retry = retry
        client: dict[str, Any] = {
            "allow_http": location.endpoint.startswith("http://"),
            "timeout": timedelta(seconds=retry.request_timeout),
            "connect_timeout": timedelta(seconds=retry.connect_timeout),
        }
        if location.ca_file is not None:
            try:
                client["root_certificate"] = Path(location.ca_file).read_bytes()
            except OSError as exc:
                raise ConfigError(location.ca_file, f"cannot read the S3 CA file: {exc.strerror}", "ca_file") from None
        self.client = S3Store(
            location.bucket,
            endpoint=location.endpoint,
            region=location.region,
            access_key_id=credentials[0],
            secret_access_key=credentials[1],
            virtual_hosted_style_request=False,
            client_options=client,  # type: ignore[arg-type]
            retry_config={
                "max_retries": retry.max_retries,
                "retry_timeout": timedelta(seconds=retry.give_up_after),
                "backoff": {"init_backoff": timedelta(seconds=retry.first_backoff),
                            "max_backoff": timedelta(seconds=retry.max_backoff), "base": 2},
            },
        )

    def key_of(self, pack_id: int) -> str:
        return f"{self._prefix}packs/{pack_name(pack_id)}"

    def name_of(self, pack_id: int) -> str:
        return self.location.url(self.key_of(pack_id))

    def _call(self, what: str, key: str, call: Callable[[], T]) -> T:
        """Run one request; the engine's refusals become the appliance's errors, naming the object."""
        try:
            return call()
        except FileNotFoundError:
            raise IntegrityError(f"pack object {self.location.url(key)} is missing") from None
        except AlreadyExistsError:
            raise
        except (BaseError, OSError) as exc:
            if " 416 " in str(exc):  # a range wholly past the end: the object is shorter than the index says
                raise IntegrityError(f"pack object {self.location.url(key)} is truncated ({what})") from None
            refused = StoreError if isinstance(exc, (PermissionDeniedError, UnauthenticatedError, InvalidPathError,
                                                     PreconditionError, NotSupportedError)) else StoreUnreachable
            raise refused(f"S3 {what} of {self.location.url(key)} failed: {_reason(exc)}") from None

    def open_writer(self, pack_id: int) -> PackWriter:
        key = self.key_of(pack_id)

        def publish(file: BinaryIO, temp_path: Path, records: list[tuple[int, RecordHeader]]) -> None:
            data = temp_path.read_bytes()
            if not self._put(key, data, create_only=True):
                raise StoreError(f"pack object {self.location.url(key)} already exists: another writer "
                                 "uses this bucket and prefix")
            self.put_object(index_object_name(pack_id), encode_pack_index(records))
            temp_path.unlink()

        return PackWriter(unsealed_path(self._temp_dir, pack_id), pack_id, publish)

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether the object is exactly `data`: a PUT retried after a lost answer finds its own first try."""
        meta = self._call("HEAD", key, lambda: obstore.head(self.client, key))
        etag = (meta.get("e_tag") or "").strip('"')
        return meta["size"] == len(data) and etag == hashlib.md5(data, usedforsecurity=False).hexdigest()

    def read_range(self, pack_id: int, offset: int, length: int) -> bytes:
        key = self.key_of(pack_id)
        data = self._call("GET", key, lambda: obstore.get_range(self.client, key, start=offset, length=length))
        if len(data) != length:
            raise IntegrityError(f"pack object {self.location.url(key)} is truncated: wanted {length} bytes "
                                 f"at offset {offset}, got {len(data)}")
        return bytes(data)

    def pack_size(self, pack_id: int) -> int:
        key = self.key_of(pack_id)
        return int(self._call("HEAD", key, lambda: obstore.head(self.client, key))["size"])

    def list_keys(self, under: str) -> list[str]:
        """Every key below `<prefix><under>`, whole (one list call pages through them all)."""
        prefix = f"{self._prefix}{under}"
        pages = self._call("LIST", prefix, lambda: list(obstore.list(self.client, prefix=prefix)))
        return [entry["path"] for page in pages for entry in page]

    def list_packs(self) -> Iterator[int]:
        ids = []
        for key in self.list_keys("packs/"):
            try:
                pack_id = int(key.rsplit("/", 1)[-1].removesuffix(".pack"), 16)
            except ValueError:
                continue  # not a pack: never ours to list or delete
            if key == self.key_of(pack_id):
                ids.append(pack_id)
        yield from sorted(ids)

    def list_unsealed(self) -> Iterator[Path]:
        return unsealed_in(self._temp_dir)

    def put_object(self, name: str, data: bytes, create_only: bool = False) -> bool:
        return self._put(f"{self._prefix}{name}", data, create_only)

    def _put(self, key: str, data: bytes, create_only: bool) -> bool:
        """PUT `data`; with `create_only`, False if another object is there already.

        obstore does not retry a PUT whose connection dropped (an engine restart): it cannot
        know whether the object landed. Here it can: a create-only PUT that finds an object
        holding exactly `data` is our own earlier try, and an overwrite may simply be sent
        again. So a PUT is retried with backoff for as long as reads would be.
        """
        deadline = time.monotonic() + self._retry.give_up_after
        backoff = self._retry.first_backoff
        while True:
            try:
                self._call("PUT", key, lambda: obstore.put(self.client, key, data, mode="create" if create_only
                                                           else "overwrite", use_multipart=False))
                return True
            except AlreadyExistsError:
                return self._holds(key, data)
            except StoreUnreachable:
                if time.monotonic() + backoff > deadline:
                    raise
                time.sleep(backoff)
                backoff = min(2 * backoff, self._retry.max_backoff)

    def get_object(self, name: str) -> bytes | None:
        key = f"{self._prefix}{name}"
        try:
            return bytes(self._call("GET", key, lambda: obstore.get(self.client, key).bytes()))
        except IntegrityError:
            return None

    def list_objects(self, under: str) -> list[str]:
        return sorted(key[len(self._prefix):] for key in self.list_keys(under))

    def delete_object(self, name: str) -> None:
        key = f"{self._prefix}{name}"
        self._call("DELETE", key, lambda: obstore.delete(self.client, key))

    def delete(self, pack_id: int) -> None:
        key = self.key_of(pack_id)
        self._call("DELETE", key, lambda: obstore.delete(self.client, key))
        self.delete_object(index_object_name(pack_id))  # left behind by a crash, it names no listed pack: harmless

    def close(self) -> None:
        """Nothing to release: connections close with the client."""
