"""Export rules: client networks, squashing, and the permission bits ACCESS reports."""

from __future__ import annotations

import pytest

from appliance.datastore.vfs import Attributes, Kind
from nfs_export.exports import (
    ACCESS3_DELETE,
    ACCESS3_EXECUTE,
    ACCESS3_EXTEND,
    ACCESS3_LOOKUP,
    ACCESS3_MODIFY,
    ACCESS3_READ,
    Export,
    Identity,
    parse_networks,
)
from nfs_export.rpc import AuthFlavor, Credential

ALL = 0x3F
RW_FILE = ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND
RWX_DIR = ACCESS3_READ | ACCESS3_LOOKUP | ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE


def attributes(kind: Kind = Kind.FILE, mode: int = 0o640, uid: int = 1000, gid: int = 100,
               read_only: bool = False) -> Attributes:
    return Attributes(inode=5, generation=1, kind=kind, mode=mode, nlink=1, uid=uid, gid=gid, size=0, used=0,
                      atime_ns=0, mtime_ns=0, ctime_ns=0, read_only=read_only)


@pytest.mark.parametrize(("networks", "client", "allowed"), [
    (["127.0.0.0/8"], "127.0.0.1", True),
    (["127.0.0.0/8"], "::ffff:127.0.0.1", True),
    (["10.9.9.0/24"], "127.0.0.1", False),
    (["10.9.9.0/24", "192.168.1.7"], "192.168.1.7", True),
    (["10.9.9.1/24"], "10.9.9.200", True),  # host bits are forgiven, as in exports(5)
    (["fd00::/8"], "fd00::1", True),
])
def test_client_networks(networks: list[str], client: str, allowed: bool) -> None:
    export = Export(allow=parse_networks(networks))
    assert export.allows(client) is allowed
    assert export.allows(client) is allowed  # cached answer


@pytest.mark.parametrize(("squash", "credential", "identity"), [
    (False, Credential(AuthFlavor.AUTH_SYS, 0, 0, (0, 5)), Identity(0, 0, (0, 5))),
    (True, Credential(AuthFlavor.AUTH_SYS, 0, 0, (0, 5)), Identity(65534, 65534, (65534, 5))),
    (True, Credential(AuthFlavor.AUTH_SYS, 1000, 100, (100,)), Identity(1000, 100, (100,))),
    (False, Credential(), Identity(65534, 65534)),
])
def test_identities(squash: bool, credential: Credential, identity: Identity) -> None:
    assert Export(root_squash=squash).identity(credential) == identity


@pytest.mark.parametrize(("who", "target", "granted"), [
    (Identity(1000, 100), attributes(), RW_FILE),
    (Identity(2000, 100), attributes(), ACCESS3_READ),
    (Identity(2000, 7, (100,)), attributes(), ACCESS3_READ),
    (Identity(2000, 7), attributes(), 0),
    (Identity(0, 0), attributes(), RW_FILE),
    (Identity(0, 0), attributes(mode=0o100), RW_FILE | ACCESS3_EXECUTE),
    (Identity(0, 0), attributes(Kind.DIRECTORY, 0o700), RWX_DIR),
    (Identity(1000, 100), attributes(Kind.DIRECTORY, 0o500), ACCESS3_READ | ACCESS3_LOOKUP),
    (Identity(0, 0), attributes(read_only=True), ACCESS3_READ),
    (Identity(0, 0), attributes(Kind.DIRECTORY, 0o555, read_only=True), ACCESS3_READ | ACCESS3_LOOKUP),
])
def test_access_bits(who: Identity, target: Attributes, granted: int) -> None:
    assert Export().access(target, who) == granted


def test_a_read_only_export_grants_no_changes() -> None:
    assert Export(read_only=True).access(attributes(), Identity(0, 0)) == ACCESS3_READ


def test_owner_override_lets_the_creator_write_a_0444_file() -> None:
    export, owner, target = Export(), Identity(1000, 100), attributes(mode=0o444)
    assert not export.may(target, owner, ACCESS3_MODIFY)
    assert export.may(target, owner, ACCESS3_MODIFY, owner_override=True)
    assert not export.may(target, Identity(1, 1), ACCESS3_MODIFY, owner_override=True)
    assert export.may(target, owner, ALL & ~ACCESS3_EXECUTE & ~ACCESS3_LOOKUP & ~ACCESS3_DELETE,
                      owner_override=True)
