"""Where a backup reads disk files from, and as whom.

Logged in to an ESXi host, the host's file service takes the SOAP session's cookie.
Logged in to vCenter, reads could go to vCenter's `/folder`, which forwards every byte
through vCenter to a host; instead they go to the host that runs the VM, as VADP
products do: vCenter hands out a one-use *generic service ticket* for the host's URL
(`SessionManager.AcquireGenericServiceTicket`), the host takes it as the cookie
`vmware_cgi_ticket` and answers with a session cookie of its own, which the later
requests carry. On a host the only datacenter is `ha-datacenter`, whatever vCenter
calls it. Hosts whose inventory names the appliance cannot resolve are given an
address in `host_addresses`; `disk_reads = "url"` keeps every read on the configured
URL (for sites where the appliance may not reach the hosts).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, Protocol
from urllib.parse import urlsplit

from pyVmomi import vim

from appliance.vsphere.client import SESSION_COOKIE, Session, faults

#: The one datacenter an ESXi host's own file service knows.
HOST_DATACENTER = "ha-datacenter"
TICKET_COOKIE = "vmware_cgi_ticket"


class Credentials(Protocol):
    """The Cookie header of a request, kept current across expiries; thread-safe."""

    def cookie(self, url: str) -> str: ...
    def answered(self, set_cookie: str | None) -> None: ...
    def refused(self, generation: int) -> None:
        """A 401: log in again (unless another thread did since `generation`)."""
        ...


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int
    datacenter: str | None  # the dcPath every request names; None: each file's own datacenter path
    credentials: Credentials

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


class SessionCookie:
    """The SOAP session's own cookie: what the configured URL (vCenter, or a host) accepts."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def cookie(self, url: str) -> str:
        return self._session.cookie()

    def answered(self, set_cookie: str | None) -> None:
        """The SOAP login's cookie stays the credential; nothing to learn from an answer."""

    def refused(self, generation: int) -> None:
        self._session.renew(generation)


class HostTicket:
    """A service ticket from vCenter for the first request, then the host's own session cookie."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._host_cookie: str | None = None
        self._lock = threading.Lock()

    def cookie(self, url: str) -> str:
        """The host's session cookie once it gave one; until then a fresh ticket (asked for one at a time:
        the readers share one SOAP stub)."""
        with self._lock:
            if self._host_cookie is not None:
                return self._host_cookie
            manager: Any = self._session.connection.content.sessionManager
            spec = vim.SessionManager.HttpServiceRequestSpec(method="httpGet", url=url)
            with faults(f"get a service ticket for {url}"):
                ticket = manager.AcquireGenericServiceTicket(spec)
            return f"{TICKET_COOKIE}={ticket.id}"

    def answered(self, set_cookie: str | None) -> None:
        morsel = SimpleCookie(set_cookie or "").get(SESSION_COOKIE)
        if morsel is not None:
            with self._lock:
                self._host_cookie = f"{SESSION_COOKIE}={morsel.coded_value}"

    def refused(self, generation: int) -> None:
        """The host's session ended: tickets again, and vCenter's session checked first (it may have too)."""
        with self._lock:
            self._host_cookie = None
            self._session.ensure()


def endpoint_for(session: Session, host_name: str) -> Endpoint:
    """Where the disks of a VM that `host_name` runs are read from (see the module docstring)."""
    settings = session.settings
    if settings.disk_reads == "url" or session.on_host or not host_name:
        parts = urlsplit(settings.url)
        return Endpoint(parts.hostname or "", parts.port or 443, None, SessionCookie(session))
    address = dict(settings.host_addresses).get(host_name, f"{host_name}:443")
    where, _, port = address.rpartition(":")
    return Endpoint(where, int(port), HOST_DATACENTER, HostTicket(session))
