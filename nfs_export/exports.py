"""Export rules: which clients may mount, who a caller counts as, what they may do.

An export is the whole datastore (the VFS root). Rules follow the Linux exports(5)
meanings an administrator already knows: allowed client networks, ro/rw, and
root_squash (uid/gid 0 become the anonymous id). ESXi needs no_root_squash: it works as
root, and a squashed root can mount the datastore but create no VM, which is why
squashing is off by default. AUTH_NONE callers are always anonymous.

Permission bits are checked here, in one place, for every procedure that reads or
changes something, with the two exceptions every NFS server makes: root may do
anything the file system allows, and the owner of a file may read and write it
whatever its mode (a file created 0444 must still take the creator's writes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from appliance.datastore.vfs import Attributes, Kind
from nfs_export.rpc import NOBODY, AuthFlavor, Credential

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# ACCESS3 bits (RFC 1813 section 3.3.4)
ACCESS3_READ = 0x0001
ACCESS3_LOOKUP = 0x0002
ACCESS3_MODIFY = 0x0004
ACCESS3_EXTEND = 0x0008
ACCESS3_DELETE = 0x0010
ACCESS3_EXECUTE = 0x0020
CHANGING = ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE
LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.0/8"),)


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs or single addresses as given on a command line (host bits are allowed)."""
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


@dataclass(slots=True)
class Identity:
    """The caller after squashing: the ids permission checks and new files use."""

    uid: int
    gid: int
    gids: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.gids


@dataclass(frozen=True, slots=True)
class Export:
    """One export of the VFS root.

    MNT accepts "/" and `path` (and directories below either); EXPORT lists `path`.
    `export_id` goes into every file handle, so it must stay the same across restarts.
    """

    path: str = "/"
    allow: tuple[Network, ...] = LOOPBACK_ONLY
    read_only: bool = False
    root_squash: bool = False
    anon_uid: int = NOBODY
    anon_gid: int = NOBODY
    export_id: int = 1
    _allowed: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def allows(self, client: str) -> bool:
        """Whether a client address may use this export (cached: asked on every call)."""
        known = self._allowed.get(client)
        if known is None:
            address = ipaddress.ip_address(client)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            known = any(address in network for network in self.allow)
            self._allowed[client] = known
        return known

    def identity(self, credential: Credential) -> Identity:
        if credential.flavor is AuthFlavor.AUTH_NONE:
            return Identity(self.anon_uid, self.anon_gid)
        if not self.root_squash:
            return Identity(credential.uid, credential.gid, credential.gids)
        uid = self.anon_uid if credential.uid == 0 else credential.uid
        gid = self.anon_gid if credential.gid == 0 else credential.gid
        return Identity(uid, gid, tuple(self.anon_gid if g == 0 else g for g in credential.gids))

    def access(self, attributes: Attributes, who: Identity) -> int:
        """The ACCESS3 bits `who` holds on an object (before owner overrides)."""
        if who.is_root:
            bits = 0o7 if attributes.kind is Kind.DIRECTORY or attributes.mode & 0o111 else 0o6
        elif who.uid == attributes.uid:
            bits = attributes.mode >> 6 & 0o7
        elif who.in_group(attributes.gid):
            bits = attributes.mode >> 3 & 0o7
        else:
            bits = attributes.mode & 0o7
        granted = ACCESS3_READ if bits & 0o4 else 0
        if attributes.kind is Kind.DIRECTORY:
            granted |= (ACCESS3_LOOKUP if bits & 0o1 else 0) | (CHANGING if bits & 0o2 else 0)
        else:
            granted |= (ACCESS3_EXECUTE if bits & 0o1 else 0) | (ACCESS3_MODIFY | ACCESS3_EXTEND if bits & 0o2 else 0)
        if self.read_only or attributes.read_only:
            granted &= ~CHANGING
        return granted

    def may(self, attributes: Attributes, who: Identity, wanted: int, *, owner_override: bool = False) -> bool:
        """Whether `who` holds all `wanted` bits; the owner passes too if `owner_override`."""
        if owner_override and who.uid == attributes.uid:
            return True
        return self.access(attributes, who) & wanted == wanted
