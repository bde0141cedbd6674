"""The appliance's configuration: one TOML file, read once at start.

The dataclasses below are the schema. Each field's metadata holds the check that turns
a TOML value into the field's value (or refuses it with a reason), and its default;
`_build` walks the fields of a section, so every key is validated the same way and a
new key is one line here. Invariants that span keys live in `__post_init__`. Any
refusal becomes one `ConfigError` naming the file, the dotted key and the reason,
because a service that starts with a half-understood configuration fails later, far
from the typo that caused it.

Every key has a default except `store.path` (and the identity of a vSphere connection).
Secrets are never in the file: a vSphere password comes from an environment variable
or a file only root can read, and is read by `resolve_secrets` at start, not by
`config check` (which may run elsewhere, without the service's environment).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.errors import ConfigError
from appliance.hypervisor.accel import ACCELERATORS, QEMU

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
    """https only: the connection carries the vSphere password."""
    url = text(value)
    try:
        hostname = urlsplit(url).hostname
    except ValueError:
        hostname = None
    if not url.startswith("https://") or not hostname:
        raise Invalid(f'"{url}" is not an https:// URL of a vCenter or ESXi host')
    return url


def section(cls: type) -> Check:
    return lambda value: _build(cls, value)


def table_array(cls: type) -> Check:
    """An array of tables (`[[a.b]]`): each built like a section, errors keyed `b[i].key`."""
    def check(value: Any) -> tuple[Any, ...]:
        _expect(value, list, "an array of tables")
        built = []
        for index, item in enumerate(value):
            try:
                built.append(_build(cls, item))
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


# --- the schema --------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreConfig:
    path: Path = required(absolute_path)


@dataclass(frozen=True)
class CacheConfig:
    #: Decompressed chunks kept in memory: a boot storm reads the same OS blocks from every VM.
    chunk_cache_mib: int = option(1024, integer(16, 1 << 20))


@dataclass(frozen=True)
class NfsConfig:
    enabled: bool = option(True, boolean)
    bind: str = option("127.0.0.1", ip_address)
    port: int = option(2049, tcp_port)
    mount_port: int = option(20048, tcp_port)
    portmap: bool = option(True, boolean)
    export_path: str = option("/", nfs_path)
    allow: tuple[Network, ...] = option((ipaddress.ip_network("127.0.0.0/8"),), networks)
    read_only: bool = option(False, boolean)
    #: Off by default: ESXi works as root and cannot create a VM on a root-squashed datastore.
    root_squash: bool = option(False, boolean)

    def __post_init__(self) -> None:
        if self.port and self.port == self.mount_port:
            raise Invalid(f"{self.port} is also the NFS port (nfs.port)", "mount_port")


@dataclass(frozen=True)
class FuseConfig:
    mountpoint: Path | None = option(None, absolute_path)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = option(True, boolean)
    bind: str = option("127.0.0.1", ip_address)
    port: int = option(9750, tcp_port)


@dataclass(frozen=True)
class ApiConfig:
    """The HTTP API's listener and the file holding its bearer token."""

    enabled: bool = option(True, boolean)
    bind: str = option("127.0.0.1", ip_address)
    port: int = option(9751, tcp_port)
    token_file: Path | None = option(None, secret_file)


@dataclass(frozen=True)
class LimitsConfig:
    max_sessions: int = option(64, integer(1, 100_000))
    max_instant_boots: int = option(16, integer(1, 10_000))
    #: Absent: sessions live until deleted or committed.
    session_expiry_hours: float | None = option(None, positive_number)
    #: What ends an expired session whose VM runs: "stop" (power off, drop the overlay) or
    #: "migrate" (to expiry_migrate_to: a production datastore, or a directory for QEMU guests).
    expiry_action: str = option("stop", one_of("stop", "migrate"))
    expiry_migrate_to: str | None = option(None, text)

    def __post_init__(self) -> None:
        if self.expiry_action == "migrate" and self.expiry_migrate_to is None:
            raise Invalid('required when expiry_action is "migrate": where the disks go', "expiry_migrate_to")


@dataclass(frozen=True)
class QemuConfig:
    """How `instant-boot --qemu` and QEMU recovery groups run guests on this host."""

    #: "auto": KVM only if it boots a probe guest with the real boot's options, and TCG
    #: again for a guest that still fails to start under it; "kvm"/"tcg": exactly that.
    accel: str = option("auto", one_of(*ACCELERATORS))
    #: The QEMU system emulator: a name looked up in PATH, or an absolute path.
    binary: str = option(QEMU, text)


@dataclass(frozen=True)
class ProtectionConfig:
    """What discovery reports for VMs in vCenter (see `appliance discover`)."""

    #: The policy a VM nobody announced falls under: listed, never silently skipped.
    default_policy: str = option("default: daily backup, keep 14 restore points", text)
    #: A protected VM whose newest restore point is older than this is reported stale.
    stale_after_hours: float = option(26.0, positive_number)


@dataclass(frozen=True, kw_only=True)
class VsphereLogin:
    """How the appliance logs in to vCenter or ESXi; `appliance.vsphere.settings` builds on it too."""

    url: str = required(https_url)
    user: str = required(text)
    password_env: str | None = option(None, env_name)
    password_file: Path | None = option(None, secret_file)
    verify_tls: bool = option(True, boolean)
    #: The CA (PEM) that signed vCenter's certificate, when it is not a public one (VMCA).
    ca_file: Path | None = option(None, absolute_path)
    #: One datastore per appliance, mounted under this name on every host that boots from it.
    datastore_name: str = option("instant-recovery", datastore_name)
    #: Seconds for one API call or short task; long waits (boot, Storage vMotion) take their own.
    timeout: float = option(60.0, positive_number)

    def __post_init__(self) -> None:
        # Exactly one: a password given twice leaves the operator guessing which one is used.
        if self.password_env and self.password_file:
            raise Invalid("give password_env or password_file, not both", "password_file")
        if not (self.password_env or self.password_file):
            raise Invalid("missing: give password_env (a variable name) or password_file", "password_env")

    def read_password(self, environ: Mapping[str, str] = os.environ) -> Secret:
        """The password from the variable or the file, read now; refusals keyed `password_env`/`password_file`.

        The file is checked again (owner, mode): it may have changed since the
        configuration was read.
        """
        if self.password_env is not None:
            value = environ.get(self.password_env, "")
            if not value:
                raise Invalid(f"environment variable {self.password_env} is not set or empty", "password_env")
            return Secret(value)
        assert self.password_file is not None  # __post_init__ demands one of the two
        try:
            value = secret_file(str(self.password_file)).read_text().rstrip("\r\n")
        except Invalid as exc:
            raise Invalid(exc.reason, "password_file") from None
        except OSError as exc:
            raise Invalid(f"cannot read {self.password_file}: {exc.strerror}", "password_file") from None
        if not value:
            raise Invalid(f"{self.password_file} is empty", "password_file")
        return Secret(value)


@dataclass(frozen=True, kw_only=True)
class VsphereConnection(VsphereLogin):
    name: str = required(connection_name)
    #: The address ESXi mounts this appliance's export from; defaults to nfs.bind.
    nfs_server_address: str | None = option(None, host)


@dataclass(frozen=True)
class VsphereConfig:
    connections: tuple[VsphereConnection, ...] = option((), table_array(VsphereConnection))


@dataclass(frozen=True)
class ApplianceConfig:
    store: StoreConfig = part(StoreConfig)
    cache: CacheConfig = part(CacheConfig)
    nfs: NfsConfig = part(NfsConfig)
    fuse: FuseConfig = part(FuseConfig)
    metrics: MetricsConfig = part(MetricsConfig)
    api: ApiConfig = part(ApiConfig)
    limits: LimitsConfig = part(LimitsConfig)
    vsphere: VsphereConfig = part(VsphereConfig)
    protection: ProtectionConfig = part(ProtectionConfig)
    qemu: QemuConfig = part(QemuConfig)

    def __post_init__(self) -> None:
        if not self.nfs.enabled and self.fuse.mountpoint is None:
            raise Invalid("nothing to serve: NFS is off and fuse.mountpoint is not set", "nfs.enabled")
        listeners = list(self._listeners())
        for index, (key, bind, number) in enumerate(listeners):
            for other_key, other_bind, other_number in listeners[:index]:
                if number and number == other_number and _overlap(bind, other_bind):
                    raise Invalid(f"port {number} is also {other_key} on {other_bind}", key)
        wildcard = ipaddress.ip_address(self.nfs.bind).is_unspecified
        seen: set[str] = set()
        for index, connection in enumerate(self.vsphere.connections):
            where = f"vsphere.connections[{index}]"
            if connection.name in seen:
                raise Invalid(f'another connection is already named "{connection.name}"', f"{where}.name")
            seen.add(connection.name)
            if connection.nfs_server_address is None and wildcard:
                raise Invalid(f"required while nfs.bind is {self.nfs.bind}: the address ESXi mounts from",
                              f"{where}.nfs_server_address")

    def _listeners(self) -> Iterator[tuple[str, str, int]]:
        if self.nfs.enabled:
            yield "nfs.port", self.nfs.bind, self.nfs.port
            yield "nfs.mount_port", self.nfs.bind, self.nfs.mount_port
        if self.metrics.enabled:
            yield "metrics.port", self.metrics.bind, self.metrics.port
        if self.api.enabled:
            yield "api.port", self.api.bind, self.api.port


def _overlap(first: str, second: str) -> bool:
    """Whether two listeners' addresses collide: the same one, or either is a wildcard."""
    a, b = ipaddress.ip_address(first), ipaddress.ip_address(second)
    return a == b or a.is_unspecified or b.is_unspecified


def _build(cls: type, table: Any) -> Any:
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


# --- entry points ------------------------------------------------------------------------

def read_table(path: Path) -> dict[str, Any]:
    """The file's TOML as a table, or ConfigError naming the file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None


def build_document(schema: type, table: Mapping[str, Any], source: str) -> Any:
    """Validate a TOML document against a schema dataclass; `source` names it in errors."""
    try:
        return _build(schema, dict(table))
    except Invalid as exc:
        raise ConfigError(source, exc.reason, exc.key) from None


def config_from_table(table: Mapping[str, Any], source: str) -> ApplianceConfig:
    """Validate a whole configuration; `source` names where it came from in errors."""
    config: ApplianceConfig = build_document(ApplianceConfig, table, source)
    return config


def load_config(path: Path) -> ApplianceConfig:
    return config_from_table(read_table(path), str(path))


def resolve_secrets(config: ApplianceConfig, source: str,
                    environ: Mapping[str, str] = os.environ) -> dict[str, Secret]:
    """Every vSphere connection's password, by connection name, read at start.

    Done when the service starts rather than at the first vSphere call, so a missing
    variable or unreadable file stops the start with one line instead of failing a
    backup hours later.
    """
    secrets: dict[str, Secret] = {}
    for index, connection in enumerate(config.vsphere.connections):
        try:
            secrets[connection.name] = connection.read_password(environ)
        except Invalid as exc:
            raise ConfigError(source, exc.reason, exc.under(f"vsphere.connections[{index}]").key) from None
    return secrets


def summary(config: ApplianceConfig) -> str:
    """One line saying what the configuration will serve, for `config check` and the log."""
    nfs = config.nfs
    if nfs.enabled:
        access = ("ro" if nfs.read_only else "rw") + (", root_squash" if nfs.root_squash else "")
        served = (f"NFS on {nfs.bind}:{nfs.port} (MOUNT {nfs.mount_port}, portmap {'on' if nfs.portmap else 'off'}) "
                  f"exporting {nfs.export_path} to {', '.join(map(str, nfs.allow))} ({access})")
    else:
        served = "NFS off"
    fuse = f"FUSE at {config.fuse.mountpoint}" if config.fuse.mountpoint else "FUSE off"
    metrics = f"metrics on {config.metrics.bind}:{config.metrics.port}" if config.metrics.enabled else "metrics off"
    api = f"API on {config.api.bind}:{config.api.port}" if config.api.enabled else "API off"
    count = len(config.vsphere.connections)
    return (f"store {config.store.path}; {served}; {fuse}; {metrics}; {api}; cache {config.cache.chunk_cache_mib} MiB; "
            f"{count} vSphere connection{'' if count == 1 else 's'}")
