"""The `[store]` section: where the store's directory is and, for an S3 store, where its packs are.

Apart from `appliance.config` because an S3 store's settings are a schema of their own,
used by `appliance init` (from flags or a file) as well as by `serve` and `config check`.
The S3 keys describe a store when it is created; afterwards the store's own config
records them, and a `[store]` table that names another bucket or prefix is refused rather
than silently pointing the appliance at other data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.config_checks import (
    Invalid,
    absolute_path,
    bucket_name,
    env_name,
    http_url,
    object_prefix,
    one_of,
    option,
    required,
    secret_file,
    text,
)
from appliance.store.s3 import S3Location

S3_KEYS = ("endpoint", "bucket", "prefix", "region", "access_key_env", "secret_key_env", "credentials_file",
           "ca_file")


@dataclass(frozen=True)
class StoreConfig:
    path: Path = required(absolute_path)
    #: "local" (packs under path) or "s3"; absent: whatever the store was created with.
    backend: str | None = option(None, one_of("local", "s3"))
    endpoint: str | None = option(None, http_url)
    bucket: str | None = option(None, bucket_name)
    prefix: str = option("", object_prefix)
    region: str = option("us-east-1", text)
    #: The S3 keys: two variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY if neither is named), or a root-only
    #: TOML file with access_key_id and secret_access_key. Never stored in the store's own files.
    access_key_env: str | None = option(None, env_name)
    secret_key_env: str | None = option(None, env_name)
    credentials_file: Path | None = option(None, secret_file)
    #: The CA (PEM) that signed the endpoint's certificate, when it is a private one.
    ca_file: Path | None = option(None, absolute_path)

    def __post_init__(self) -> None:
        if self.backend != "s3":
            given = [key for key in S3_KEYS if getattr(self, key) not in (None, "", "us-east-1")]
            if given:
                raise Invalid('only for backend = "s3"', given[0])
            return
        for key in ("endpoint", "bucket"):
            if getattr(self, key) is None:
                raise Invalid('required when backend = "s3"', key)
        if self.credentials_file is not None and (self.access_key_env or self.secret_key_env):
            raise Invalid("give credentials_file or access_key_env and secret_key_env, not both", "credentials_file")
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise Invalid("give access_key_env and secret_key_env together", "access_key_env")

    def s3_location(self) -> S3Location | None:
        if self.backend != "s3":
            return None
        assert self.endpoint is not None and self.bucket is not None  # __post_init__
        return S3Location(
            endpoint=self.endpoint, bucket=self.bucket, prefix=self.prefix, region=self.region,
            ca_file=None if self.ca_file is None else str(self.ca_file),
            access_key_env=self.access_key_env, secret_key_env=self.secret_key_env,
            credentials_file=None if self.credentials_file is None else str(self.credentials_file),
        )

    def matches(self, recorded: S3Location | None) -> None:
        """Refuse a section that names another backend, bucket or prefix than the store was created with."""
        if self.backend is None:
            return
        if (self.backend == "s3") != (recorded is not None):
            where = "in an S3 bucket" if recorded is not None else "in its own directory"
            raise Invalid(f"the store at {self.path} keeps its packs {where}", "backend")
        wanted = self.s3_location()
        if wanted is not None and recorded is not None:
            for key in ("endpoint", "bucket", "prefix"):
                if getattr(wanted, key) != getattr(recorded, key):
                    raise Invalid(f"the store at {self.path} was created with {key} {getattr(recorded, key)!r}", key)
