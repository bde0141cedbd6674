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
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config_cache import CacheConfig
from appliance.config_store import StoreConfig
from appliance.errors import ConfigError
from appliance.hypervisor.accel import ACCELERATORS, QEMU
from appliance.config_checks import (
    Invalid,
    Network,
    Secret,
    absolute_path,
    boolean,
    host_address_table,
    connection_name,
    cron,
    folder_paths,
    tag_names,
    fingerprint,
    vm_names,
    window,
    datastore_name,
    env_name,
    host,
    https_url,
    integer,
    ip_address,
    networks,
    nfs_path,
    one_of,
    option,
    part,
    positive_number,
    read_secret,
    required,
    secret_file,
    build_section,
    table_array,
    tcp_port,
    text,
)


# --- the schema --------------------------------------------------------------------------

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
    #: https, with `tls_cert`/`tls_key` or else a self-signed certificate made in the store on first start.
    #: Another appliance replicating with this one pins the certificate's fingerprint.
    tls: bool = option(False, boolean)
    tls_cert: Path | None = option(None, absolute_path)
    tls_key: Path | None = option(None, secret_file)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise Invalid("give tls_cert and tls_key together (or neither, for a self-signed certificate)", "tls_cert")
        if self.tls_cert is not None and not self.tls:
            raise Invalid("tls_cert is set but tls is false: set tls = true to serve https", "tls")


@dataclass(frozen=True, kw_only=True)
class RemoteConfig:
    """Another appliance to replicate with: where its API is, its token, and its pinned certificate."""

    name: str = required(connection_name)
    url: str = required(https_url)
    token_env: str | None = option(None, env_name)
    token_file: Path | None = option(None, secret_file)
    #: SHA-256 of the remote API's certificate, as `appliance api-certificate` prints it there.
    fingerprint: str = required(fingerprint)
    #: Bytes per second on the link (both directions together); absent: as fast as it goes.
    rate_limit_mib: float | None = option(None, positive_number)
    streams: int = option(4, integer(1, 32))
    #: A scheduled job every so many hours (absent: only on demand), in `direction`, of `vms` (empty: all),
    #: starting only inside `window` ("22:00-06:00", local time) when one is given.
    every_hours: float | None = option(None, positive_number)
    direction: str = option("push", one_of("push", "pull"))
    vms: tuple[str, ...] = option((), vm_names)
    window: str | None = option(None, window)
    #: Scheduled jobs also delete the target's points the source no longer has (never points a session holds).
    remove_vanished: bool = option(False, boolean)

    def __post_init__(self) -> None:
        if bool(self.token_env) == bool(self.token_file):
            raise Invalid("give exactly one of token_env (a variable name) or token_file", "token_env")

    def read_token(self, environ: Mapping[str, str] = os.environ) -> Secret:
        """The remote's API token, read now; refusals keyed `token_env`/`token_file`."""
        return read_secret(self.token_env, self.token_file, ("token_env", "token_file"), environ)


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
    """Which policy covers the VMs no `[[policies]]` entry selects, and when a point is stale."""

    #: The name of the policy that backs up every VM no other policy selects (fail-safe: nothing
    #: is only listed). A `[[policies]]` entry of this name sets its schedule and retention;
    #: without one it is every 24 hours, keep_last 14, quiesce "try", enable_cbt true.
    default_policy: str = option("default", connection_name)
    #: A protected VM whose newest restore point is older than this is reported stale.
    stale_after_hours: float = option(26.0, positive_number)
    #: `serve` backs up every VM of every connection as its policy says. False: backups run only when
    #: asked, for an appliance that only boots VMs (a second site's, whose vCenter is not its to protect).
    scheduled_backups: bool = option(True, boolean)


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """A backup policy: which VMs of which connection, when, how, and how long their points are kept."""

    name: str = required(connection_name)
    #: A `[[vsphere.connections]]` name; absent: the only one configured (the default policy: every one).
    connection: str | None = option(None, connection_name)
    #: Exactly one of the two: every so many hours since the VM's newest point, or a crontab line
    #: (local time); either way a backup starts only inside `window` ("22:00-06:00") when one is given.
    every_hours: float | None = option(None, positive_number)
    cron: str | None = option(None, cron)
    window: str | None = option(None, window)
    #: Retention as borg and restic count it: the newest `keep_last` points, then the newest point of
    #: each of the last `keep_daily` days, `keep_weekly` ISO weeks, `keep_monthly` months that have points.
    keep_last: int = option(0, integer(0, 100_000))
    keep_daily: int = option(0, integer(0, 100_000))
    keep_weekly: int = option(0, integer(0, 100_000))
    keep_monthly: int = option(0, integer(0, 100_000))
    quiesce: str = option("try", one_of("try", "yes", "no"))
    #: Turn changed block tracking on for a VM that lacks it (its next backup is then incremental).
    enable_cbt: bool = option(True, boolean)
    #: Parallel HTTPS connections reading one VM's disks.
    streams: int = option(4, integer(1, 8))
    #: The VMs covered: by name, by inventory folder (subfolders included), by tag, or every VM.
    vms: tuple[str, ...] = option((), vm_names)
    folders: tuple[str, ...] = option((), folder_paths)
    tags: tuple[str, ...] = option((), tag_names)
    all: bool = option(False, boolean)
    #: Keep the newest point of these VMs hydrated (with `[cache] hydrate = "policies"`).
    hydrate: bool = option(False, boolean)

    def __post_init__(self) -> None:
        if (self.every_hours is None) == (self.cron is None):
            raise Invalid('give exactly one schedule: every_hours = N or cron = "m h dom mon dow"', "every_hours")
        if not (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly):
            raise Invalid("keeps nothing: give keep_last, keep_daily, keep_weekly or keep_monthly greater than 0",
                          "keep_last")

    def selects_any(self) -> bool:
        return bool(self.vms or self.folders or self.tags or self.all)


def default_policy(protection: ProtectionConfig, policies: tuple[PolicyConfig, ...]) -> PolicyConfig:
    """The policy of every VM no other policy selects: the entry named `protection.default_policy`, or else
    the built-in one (every 24 hours, keep_last 14, quiesce "try", enable_cbt true)."""
    name = protection.default_policy
    return next((policy for policy in policies if policy.name == name),
                PolicyConfig(name=name, every_hours=24.0, keep_last=14))


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
    #: Where backups read disk files: "host", the ESXi host that runs the VM, directly (logged in to
    #: vCenter, with a service ticket per host), or "url", the url above (vCenter forwards to a host).
    disk_reads: str = option("host", one_of("host", "url"))
    #: How the appliance reaches ESXi hosts whose inventory names it cannot resolve: {"esx01" = "10.0.0.5"}.
    host_addresses: tuple[tuple[str, str], ...] = option((), host_address_table)

    def __post_init__(self) -> None:
        # Exactly one: a password given twice leaves the operator guessing which one is used.
        if self.password_env and self.password_file:
            raise Invalid("give password_env or password_file, not both", "password_file")
        if not (self.password_env or self.password_file):
            raise Invalid("missing: give password_env (a variable name) or password_file", "password_env")

    def read_password(self, environ: Mapping[str, str] = os.environ) -> Secret:
        """The password from the variable or the file, read now; refusals keyed `password_env`/`password_file`."""
        return read_secret(self.password_env, self.password_file, ("password_env", "password_file"), environ)


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
    remotes: tuple[RemoteConfig, ...] = option((), table_array(RemoteConfig))
    policies: tuple[PolicyConfig, ...] = option((), table_array(PolicyConfig))

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
        names: set[str] = set()
        for index, remote in enumerate(self.remotes):
            if remote.name in names:
                raise Invalid(f'another remote is already named "{remote.name}"', f"remotes[{index}].name")
            names.add(remote.name)
        self._check_policies()

    def _check_policies(self) -> None:
        """Names unique, connections known, every policy but the default selects something, no VM named twice."""
        connections = [connection.name for connection in self.vsphere.connections]
        seen: set[str] = set()
        named: dict[str, list[tuple[str | None, str]]] = {}
        for index, policy in enumerate(self.policies):
            where = f"policies[{index}]"
            if policy.name in seen:
                raise Invalid(f'another policy is already named "{policy.name}"', f"{where}.name")
            seen.add(policy.name)
            default = policy.name == self.protection.default_policy
            if not connections:
                raise Invalid("no [[vsphere.connections]] is configured to back up from", f"{where}.connection")
            if policy.connection is not None and policy.connection not in connections:
                raise Invalid(f'no [[vsphere.connections]] is named "{policy.connection}" '
                              f"(known: {', '.join(connections)})", f"{where}.connection")
            if len(connections) > 1 and (policy.connection is None) != default:
                reason = ("the default policy covers the VMs of every connection: remove connection" if default
                          else f"several connections are configured: name one ({', '.join(connections)})")
                raise Invalid(reason, f"{where}.connection")
            if not default and not policy.selects_any():
                raise Invalid("selects no VM: give vms, folders, tags or all = true (or make it the "
                              "protection.default_policy)", f"{where}.vms")
            scope = policy.connection if len(connections) > 1 else None
            for vm in policy.vms:
                for other_scope, other in named.get(vm, []):
                    if None in (scope, other_scope) or scope == other_scope:
                        raise Invalid(f'VM "{vm}" is also named by policy "{other}": a VM has one policy',
                                      f"{where}.vms")
                named.setdefault(vm, []).append((scope, policy.name))

    def remote(self, name: str) -> RemoteConfig:
        found = [remote for remote in self.remotes if remote.name == name]
        if not found:
            known = ", ".join(remote.name for remote in self.remotes) or "none is configured"
            raise Invalid(f'no remote named "{name}" ({known})', "remotes")
        return found[0]

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
        return build_section(schema, dict(table))
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
    return (f"store {config.store.path}; {served}; {fuse}; {metrics}; {api}; {config.cache.describe()}; "
            f"{count} vSphere connection{'' if count == 1 else 's'}")

