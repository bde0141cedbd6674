"""How the appliance reaches vSphere and how ESXi reaches the appliance: the `[vsphere]` table.

Validated by the same checks as the rest of the configuration (`appliance.config`), so
a typo is refused at start with one line naming the key, not at the first instant
boot. The password is never a value here: `password_env` names a variable and
`password_file` a file only its owner can read; `password()` reads it when a
connection is made.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import (
    Invalid,
    Secret,
    VsphereLogin,
    absolute_path,
    host,
    nfs_path,
    option,
    positive_number,
    required,
    section,
    text,
)
from appliance.errors import ConfigError

#: The table these settings are read from; refusals name keys under it.
TABLE = "vsphere"
#: vSphere keeps datastore names to 42 characters; brackets and "/" would break "[name] path".
_DATASTORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,41}")


def datastore_name(value: Any) -> str:
    name = text(value)
    if not _DATASTORE_NAME.fullmatch(name):
        raise Invalid(f'"{name}" must be 1 to 42 letters, digits, ".", "_" or "-", starting with a letter or digit')
    return name


@dataclass(frozen=True, kw_only=True)
class VsphereSettings(VsphereLogin):
    """The login (`url` of vCenter or one ESXi host, `user`, password source, `verify_tls`) and what
    the instant-boot steps need to put the appliance's export on a host."""

    #: The CA (PEM) that signed vCenter's certificate, when it is not a public one (VMCA).
    ca_file: Path | None = option(None, absolute_path)
    #: The address ESXi mounts the appliance's export from; a name or IP that every host resolves alike.
    nfs_server: str = required(host)
    #: The export ESXi mounts (`nfs.export_path` of the appliance).
    export_path: str = option("/", nfs_path)
    #: One datastore per appliance, mounted under this name on every host that boots from it.
    datastore_name: str = option("instant-recovery", datastore_name)
    #: Seconds for one API call or short task; long waits (boot, Storage vMotion) take their own.
    timeout: float = option(60.0, positive_number)

    def password(self, environ: Mapping[str, str] = os.environ) -> Secret:
        """The password, read now (the file may have been rotated since the start)."""
        try:
            return self.read_password(environ)
        except Invalid as exc:
            raise ConfigError("vSphere settings", exc.reason, exc.under(TABLE).key) from None


def from_mapping(table: Mapping[str, Any], source_name: str) -> VsphereSettings:
    """Validate the `[vsphere]` table; `source_name` (the file) starts every refusal."""
    try:
        settings: VsphereSettings = section(VsphereSettings)(dict(table))
    except Invalid as exc:
        raise ConfigError(source_name, exc.reason, exc.under(TABLE).key) from None
    return settings
