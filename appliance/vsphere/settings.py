"""How the appliance reaches vSphere and how ESXi reaches the appliance.

A `VsphereSettings` is one `[[vsphere.connections]]` entry of the configuration (the
login, datastore name, timeout) plus where ESXi mounts the appliance's export from:
`settings_for` joins them for a serving appliance. `from_mapping` validates the same
keys from one table with the configuration's checks, naming the key on refusal. The
password is never a value here: `password_env` names a variable and `password_file`
a file only its owner can read; `password()` reads it when a connection is made.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from appliance.config import VsphereConnection, VsphereLogin
from appliance.config_checks import Invalid, Secret, host, nfs_path, option, required, section
from appliance.errors import ConfigError

#: The table these settings are read from; refusals name keys under it.
TABLE = "vsphere"


@dataclass(frozen=True, kw_only=True)
class VsphereSettings(VsphereLogin):
    """The login (`url` of vCenter or one ESXi host, `user`, password source, `verify_tls`) and what
    the instant-boot steps need to put the appliance's export on a host."""

    #: The address ESXi mounts the appliance's export from; a name or IP that every host resolves alike.
    nfs_server: str = required(host)
    #: The export ESXi mounts (`nfs.export_path` of the appliance).
    export_path: str = option("/", nfs_path)

    def password(self, environ: Mapping[str, str] = os.environ) -> Secret:
        """The password, read now (the file may have been rotated since the start)."""
        try:
            return self.read_password(environ)
        except Invalid as exc:
            raise ConfigError("vSphere settings", exc.reason, exc.under(TABLE).key) from None


def from_mapping(table: Mapping[str, Any], source_name: str) -> VsphereSettings:
    """Validate one table of these keys; `source_name` (the file) starts every refusal."""
    try:
        settings: VsphereSettings = section(VsphereSettings)(dict(table))
    except Invalid as exc:
        raise ConfigError(source_name, exc.reason, exc.under(TABLE).key) from None
    return settings


def settings_for(connection: VsphereConnection, nfs_server: str, export_path: str) -> VsphereSettings:
    """A configured connection's settings, with the address and path ESXi mounts the export at."""
    login = {spec.name: getattr(connection, spec.name) for spec in fields(VsphereLogin)}
    return VsphereSettings(**login, nfs_server=nfs_server, export_path=export_path)
