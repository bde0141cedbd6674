"""Checks that turn TOML values into configuration values, or refuse them with a reason.

`appliance.config` declares its schema with these: `option`/`required`/`part` attach a
check to each field, and `Invalid` carries the reason up to the one `ConfigError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.api.tls import normal_fingerprint
from appliance.errors import InvalidName
from appliance.names import VM_NAME
from appliance.schedule import parse_cron, parse_window

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Check = Callable[[Any], Any]

_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
    (list, "an array"), (dict, "a table"),
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONNECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class Invalid(Exception):
    """A refused value; `key` is relative to the table being built, filled in on the way up."""

    def __init__(self, reason: str, key: str = "") -> None:
        super().__init__(reason)
        self.reason, self.key = reason, key

    def under(self, name: str) -> Invalid:
        """The same refusal seen from the enclosing table, where the key starts with `name`."""
        separator = "" if not self.key or self.key.startswith("[") else "."
        return Invalid(self.reason, f"{name}{separator}{self.key}")


class Secret:
    """A password held in memory; its repr and str never show it (configs get logged)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password itself, for the one call that sends it to vSphere."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


# --- checks: TOML value -> field value, or Invalid(reason) ---------------------------------

def _type_name(value: Any) -> str:
    return next((name for kind, name in _TOML_TYPES if isinstance(value, kind)), "a date or time")


def _expect(value: Any, kind: type, name: str) -> None:
    # type() rather than isinstance: TOML's true is a bool, and bool is an int to Python.
    if type(value) is not kind:
        raise Invalid(f"expected {name}, got {_type_name(value)}")


def boolean(value: Any) -> bool:
    _expect(value, bool, "a boolean (true or false)")
    return bool(value)


def integer(low: int, high: int) -> Check:
    def check(value: Any) -> int:
        _expect(value, int, "an integer")
        if not low <= value <= high:
            raise Invalid(f"{value} is out of range {low}..{high}")
        return int(value)
    return check


#: 0 binds any free port (the log says which); only useful where clients ask the portmapper.
tcp_port = integer(0, 65535)


def positive_number(value: Any) -> float:
    if type(value) not in (int, float):
        raise Invalid(f"expected a number, got {_type_name(value)}")
    if not value > 0:
        raise Invalid(f"{value} must be greater than 0")
    return float(value)


def text(value: Any) -> str:
    """A non-empty string: an empty name or path is always a mistake, never a choice."""
    _expect(value, str, "a string")
    if not value.strip():
        raise Invalid("must not be empty")
    return str(value)


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str:
        if text(value) not in choices:
            raise Invalid(f'"{value}" is not one of: {", ".join(choices)}')
        return str(value)
    return check


#: vSphere keeps datastore names to 42 characters; brackets and "/" would break "[name] path".
_DATASTORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,41}")


def matching(pattern: re.Pattern[str], problem: str) -> Check:
    """A name that must match `pattern` whole; `problem` completes the refusal after the name."""
    def check(value: Any) -> str:
        name = text(value)
        if not pattern.fullmatch(name):
            raise Invalid(f'"{name}" {problem}')
        return name
    return check


datastore_name = matching(_DATASTORE_NAME, 'must be 1 to 42 letters, digits, ".", "_" or "-", '
                                           'starting with a letter or digit')


def ip_address(value: Any) -> str:
    """A literal address: a host name could resolve to another address after a reboot."""
    try:
        return str(ipaddress.ip_address(text(value)))
    except ValueError:
        raise Invalid(f'"{value}" is not an IP address (e.g. "0.0.0.0", "127.0.0.1", "::")') from None


def host(value: Any) -> str:
    name = text(value)
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        labels = name.rstrip(".").split(".")
        if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise Invalid(f'"{name}" is neither an IP address nor a host name') from None
        return name


def absolute_path(value: Any) -> Path:
    """Absolute only: the service starts in /, so a relative path would mean something else there."""
    path = Path(text(value))
    if not path.is_absolute():
        raise Invalid(f'"{value}" is not an absolute path')
    return path


def secret_file(value: Any) -> Path:
    """A file holding a secret: owned by root (or the user the appliance runs as), mode 0600 or 0400."""
    path = absolute_path(value)
    try:
        info = path.stat()
    except OSError as exc:
        raise Invalid(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise Invalid(f"{path} is not a regular file")
    if info.st_uid not in (0, os.geteuid()):
        raise Invalid(f"{path} is owned by uid {info.st_uid}, not root")
    if info.st_mode & 0o077:
        raise Invalid(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others may use it "
                      "(chmod 600)")
    return path


def read_secret(env: str | None, file: Path | None, keys: tuple[str, str],
                environ: Mapping[str, str]) -> Secret:
    """A secret from the environment variable `env` or the root-only `file` (one is set), read now.

    Refusals are keyed by `keys` (the variable's key, the file's key). The file is checked
    again (owner, mode): it may have changed since the configuration was read.
    """
    env_key, file_key = keys
    if env is not None:
        value = environ.get(env, "")
        if not value:
            raise Invalid(f"environment variable {env} is not set or empty", env_key)
        return Secret(value)
    assert file is not None  # the section's __post_init__ demands one of the two
    try:
        value = secret_file(str(file)).read_text().rstrip("\r\n")
    except Invalid as exc:
        raise Invalid(exc.reason, file_key) from None
    except OSError as exc:
        raise Invalid(f"cannot read {file}: {exc.strerror}", file_key) from None
    if not value:
        raise Invalid(f"{file} is empty", file_key)
    return Secret(value)


def nfs_path(value: Any) -> str:
    """The export path, normalised ("//a/" is "/a"): EXPORT lists it to clients as given."""
    path = text(value)
    parts = path.split("/")
    if not path.startswith("/") or ".." in parts or "." in parts:
        raise Invalid(f'"{path}" must be an absolute path without "." or ".." (e.g. "/datastore")')
    return "/" + "/".join(part for part in parts if part)


def networks(value: Any) -> tuple[Network, ...]:
    """Client networks as `nfs_export.exports.parse_networks` reads them (host bits allowed)."""
    _expect(value, list, "an array of networks")
    if not value:
        raise Invalid('no client could mount: give at least one network (e.g. ["10.0.0.0/24"])')
    found: list[Network] = []
    for index, item in enumerate(value):
        try:
            found.append(ipaddress.ip_network(text(item), strict=False))
        except Invalid as exc:
            raise Invalid(f"item {index}: {exc.reason}") from None
        except ValueError as exc:
            raise Invalid(f'item {index}: "{item}" is not an IP network ({exc})') from None
    return tuple(found)


env_name = matching(_ENV_NAME, "is not an environment variable name")
connection_name = matching(_CONNECTION_NAME, 'must be letters, digits, ".", "_" or "-"')


def https_url(value: Any) -> str:
    """https only: the connection carries a password or a token."""
    url = text(value)
    try:
        hostname = urlsplit(url).hostname
    except ValueError:
        hostname = None
    if not url.startswith("https://") or not hostname:
        raise Invalid(f'"{url}" is not an https:// URL')
    return url


def host_address_table(value: Any) -> tuple[tuple[str, str], ...]:
    """A table of ESXi host names (as the inventory has them) to `address` or `address:port` (443)."""
    _expect(value, dict, "a table of host name = address")
    found = []
    for name, given in value.items():
        address = text(given)
        where, colon, port = address.rpartition(":")
        if not colon:
            where, port = address, "443"
        try:
            host(where)
        except Invalid as exc:
            raise Invalid(f'host "{name}": {exc.reason}') from None
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise Invalid(f'host "{name}": "{address}" has no port from 1 to 65535 after its ":"')
        found.append((str(name), f"{where}:{port}"))
    return tuple(found)


def fingerprint(value: Any) -> str:
    """A certificate's SHA-256 fingerprint, in any of the spellings tools print it."""
    try:
        return normal_fingerprint(text(value))
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def parsed_by(parse: Callable[[str], object]) -> Check:
    """A string that `parse` accepts, kept as written; its ValueError is the refusal (parsed again where used)."""
    def check(value: Any) -> str:
        try:
            parse(text(value))
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return str(value)
    return check


#: Local hours like "22:00-06:00" (`appliance.schedule`).
window = parsed_by(parse_window)
#: A crontab line of five fields, e.g. "30 2 * * mon-fri" (`appliance.schedule`).
cron = parsed_by(parse_cron)


def _strings(value: Any, what: str, check: Callable[[str], str]) -> tuple[str, ...]:
    """An array of strings, each checked by `check` (which raises Invalid); refusals name the item."""
    _expect(value, list, f"an array of {what}")
    found = []
    for index, item in enumerate(value):
        try:
            found.append(check(text(item)))
        except Invalid as exc:
            raise Invalid(f"item {index}: {exc.reason}") from None
    return tuple(found)


def _folder_path(path: str) -> str:
    """An inventory folder path like vSphere shows it ("/DC0/vm/prod"), normalised without a trailing "/"."""
    trimmed = path.rstrip("/")
    if not trimmed.startswith("/") or not all(trimmed[1:].split("/")):
        raise Invalid(f'"{path}" is not an inventory folder path like "/Datacenter/vm/prod"')
    return trimmed


def _tag_name(tag: str) -> str:
    """Either "Category:Tag", or "Tag" for a tag of that name in any category."""
    category, colon, name = tag.rpartition(":")
    if not name.strip() or (colon and not category.strip()):
        raise Invalid(f'"{tag}" is not a tag like "Category:Tag" or "Tag"')
    return tag


def folder_paths(value: Any) -> tuple[str, ...]:
    return _strings(value, "folder paths", _folder_path)


def tag_names(value: Any) -> tuple[str, ...]:
    return _strings(value, 'tags ("Category:Tag" or "Tag")', _tag_name)


def vm_names(value: Any) -> tuple[str, ...]:
    """VM names, each by the rule every VM name follows."""
    _expect(value, list, "an array of VM names")
    try:
        return tuple(VM_NAME.check(text(item)) for item in value)
    except InvalidName as exc:
        raise Invalid(str(exc)) from None


def section(cls: type) -> Check:
    return lambda value: build_section(cls, value)


def table_array(cls: type) -> Check:
    """An array of tables (`[[a.b]]`): each built like a section, errors keyed `b[i].key`."""
    def check(value: Any) -> tuple[Any, ...]:
        _expect(value, list, "an array of tables")
        built = []
        for index, item in enumerate(value):
            try:
                built.append(build_section(cls, item))
            except Invalid as exc:
                raise exc.under(f"[{index}]") from None
        return tuple(built)
    return check


def option(default: Any, check: Check) -> Any:
    """A key with a default; `check` validates and converts what the file gives."""
    return field(default=default, metadata={"check": check})


def required(check: Check) -> Any:
    """A key the file must give."""
    return field(metadata={"check": check})


def part(cls: type) -> Any:
    """A section: built from an empty table when absent, so its own defaults and required keys apply."""
    return field(metadata={"check": section(cls), "section": True})


def build_section(cls: type, table: Any) -> Any:
    """Validate one TOML table against a schema dataclass and construct it."""
    _expect(table, dict, "a table")
    known = {f.name: f for f in fields(cls)}
    for name in table:
        if name not in known:
            raise Invalid(f"unknown key (known here: {', '.join(known)})", name)
    values: dict[str, Any] = {}
    for name, spec in known.items():
        raw = table.get(name, {} if spec.metadata.get("section") else MISSING)
        if raw is MISSING:
            if spec.default is MISSING:
                raise Invalid("missing; this key has no default", name)
            continue
        try:
            values[name] = spec.metadata["check"](raw)
        except Invalid as exc:
            raise exc.under(name) from None
    return cls(**values)


def http_url(value: Any) -> str:
    """An S3 endpoint: http only for a gateway on this host or a lab, which the operator chooses by writing it."""
    url = text(value).rstrip("/")
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise Invalid(f'"{value}" is not an http:// or https:// URL of a host (e.g. "https://s3.example.net:9000")')
    return url


#: S3's bucket naming rule: 3 to 63 lower-case letters, digits, "." and "-", starting and ending with a letter or digit.
bucket_name = matching(re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
                       'is not an S3 bucket name (3-63 of a-z, 0-9, ".", "-")')


def object_prefix(value: Any) -> str:
    """A key prefix ending in "/" (added if missing), without "//", "." or ".." parts: keys stay one tree."""
    _expect(value, str, "a string")
    if not value:
        return ""
    parts = value.rstrip("/").split("/")
    if value.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise Invalid(f'"{value}" is not a key prefix like "appliance/site-a/"')
    return "/".join(parts) + "/"
