"""Names that users give (VMs, sessions) become single path components in the
datastore namespace served over FUSE and NFS, so they are checked once, here."""

from __future__ import annotations

from appliance.errors import InvalidName, NameTooLong

MAX_NAME_BYTES = 255


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a safe single path component, else raise InvalidName."""
    problem = None
    if not name:
        problem = "is empty"
    elif name in (".", "..") or name.startswith("."):
        problem = "may not start with '.'"
    elif "/" in name or "\\" in name:
        problem = "may not contain '/' or '\\'"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        problem = "may not contain NUL or control characters"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise NameTooLong(f"invalid {kind} name {name[:40]!r}...: is longer than {MAX_NAME_BYTES} bytes")
    if problem:
        raise InvalidName(f"invalid {kind} name {name!r}: {problem}")
    return name


def check_component(name: str) -> str:
    """Return `name` if a client may create it inside a session directory.

    Looser than `check_name`: hypervisors create dot-files such as `.lck-<fileid>`.
    """
    if name in ("", ".", ".."):
        raise InvalidName(f"invalid file name {name!r}")
    if "/" in name or "\x00" in name:
        raise InvalidName(f"invalid file name {name!r}: may not contain '/' or NUL")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise NameTooLong(f"file name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return name
