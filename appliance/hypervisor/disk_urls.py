"""How QEMU addresses a session's disk on the appliance's NFS export.

QEMU's nfs:// block driver (libnfs) mounts the URL's directory and opens the file in
it. It takes no port options (only uid, gid, tcp-syn-cnt, readahead, page-cache-size,
debug; a port in the authority is ignored), so it always asks the portmapper on port
111 of HOST for the MOUNT and NFS ports: `appliance serve` must be registered there
(or answer as the portmapper itself, which it does when nothing else listens on 111).

It also cannot follow a VMDK descriptor's extent over nfs://, so the URL names the flat
extent, `<disk>-flat.vmdk`, which QEMU opens as a raw disk. No `readahead` option: libnfs
would keep bytes the guest did not ask for of a disk the guest writes, and not every
libnfs version keeps them coherent with writes.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import quote

from appliance.names import SESSION_NAME, check_component


def session_disk_url(host: str, session: str, disk: str, export_path: str = "/") -> str:
    """The nfs:// URL of disk `disk` (e.g. "vm1" or "vm1_1") of `session` on `host`.

    `export_path` is the path `serve --export-path` exports the datastore under.
    """
    SESSION_NAME.check(session)
    check_component(disk)
    try:
        authority = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        authority = host  # a host name
    path = f"{export_path.rstrip('/')}/sessions/{session}/{disk}-flat.vmdk"
    return f"nfs://{authority}{quote(path)}"
