"""The rules for the names users give and look up: VMs, sessions, restore-point refs, job ids, volumes.

One `NameRule` per kind, applied wherever a name enters: the CLI's arguments, the API's
request models and path parameters, and every lookup in the store and the datastore, so
an empty, overlong or unsafe name gets the same one-line error everywhere and never
reaches LMDB or the file system. The API's OpenAPI document states each rule from the
same object (`NameRule.json_schema`), so the document and the check cannot disagree.

VM and session names become single path components of the datastore served over FUSE
and NFS. They are up to 80 characters (vSphere's own limit for a VM name) of the Basic
Multilingual Plane, without control characters, surrogates, '/' or '\\', and not starting
with '.'. At most 3 UTF-8 bytes a character keeps every such name within a file
system's 255-byte component limit, so a character count in the schema is the whole rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from appliance.errors import InvalidName, NameTooLong

MAX_NAME_BYTES = 255

#: Printable characters of the BMP, without '/', '\\', C0/C1 controls, DEL or surrogates,
#: in a syntax that Python's `re`, ECMA-262 (JSON Schema) and Rust's regex all read alike.
_PATH_SAFE = r" -\-.0-\[\]-~\u00a0-\ud7ff\ue000-\ufffd"
_PATH_SAFE_FIRST = r" -\-0-\[\]-~\u00a0-\ud7ff\ue000-\ufffd"
_ID_CHARACTERS = r"0-9A-Za-z\-"


@dataclass(frozen=True)
class NameRule:
    """A kind of name: its longest length (in characters) and the characters it may use."""

    kind: str
    max_length: int
    first: str
    rest: str
    allowed: str

    @property
    def pattern(self) -> str:
        return f"^[{self.first}][{self.rest}]*$"

    def check(self, name: str) -> str:
        """Return `name` if it follows the rule, else raise InvalidName saying what is wrong."""
        if re.fullmatch(self.pattern, name) and len(name) <= self.max_length:
            return name
        raise self._refusal(name)

    def _refusal(self, name: str) -> InvalidName:
        shown = repr(name) if len(name) <= 40 else repr(name[:40]) + "..."
        if not name:
            problem = "is empty"
        elif len(name) > self.max_length:
            return NameTooLong(f"invalid {self.kind} {shown}: is longer than {self.max_length} characters")
        elif not re.fullmatch(f"[{self.first}]", name[0]):
            problem = f"may not start with {name[0]!r}"
        else:
            position, bad = next((i, c) for i, c in enumerate(name) if not re.fullmatch(f"[{self.rest}]", c))
            problem = f"may not contain {bad!r} (character {position + 1})"
        return InvalidName(f"invalid {self.kind} {shown}: {problem}; {self.allowed}")

    def json_schema(self) -> dict[str, Any]:
        """The rule as a JSON Schema string type (OpenAPI 3.1)."""
        return {"type": "string", "minLength": 1, "maxLength": self.max_length, "pattern": self.pattern,
                "description": f"{self.kind}: {self.allowed}"}


_PATH_NAME_RULE = ("1-80 printable characters (no '/', '\\' or control characters, "
                   "none outside the Basic Multilingual Plane), not starting with '.'")
_ID_RULE = "1-64 letters, digits and '-'"

VM_NAME = NameRule("VM name", 80, _PATH_SAFE_FIRST, _PATH_SAFE, _PATH_NAME_RULE)
SESSION_NAME = NameRule("session name", 80, _PATH_SAFE_FIRST, _PATH_SAFE, _PATH_NAME_RULE)
POINT_REF = NameRule("restore point", 64, _ID_CHARACTERS, _ID_CHARACTERS,
                     f"'latest', a point id or a unique prefix of one: {_ID_RULE}")
JOB_ID = NameRule("job id", 64, _ID_CHARACTERS, _ID_CHARACTERS, _ID_RULE)
#: A volume of a disk: a partition number, or an LVM2 logical volume as PARTITION/VG/LV (LVM's names are
#: up to 127 of [A-Za-z0-9+_.-]); what `appliance.flr.volumes.Volume.name` spells.
VOLUME_REF = NameRule("partition", 266, "0-9", r"0-9A-Za-z+_.\-/",
                      "a partition number, or a logical volume as PARTITION/VG/LV (e.g. 2/vg0/root)")


def check_component(name: str) -> str:
    """Return `name` if a client may create it inside a session directory.

    Looser than the name rules: hypervisors create dot-files such as `.lck-<fileid>`,
    and a file system, not a person, chose the name.
    """
    if name in ("", ".", ".."):
        raise InvalidName(f"invalid file name {name!r}")
    if "/" in name or "\x00" in name:
        raise InvalidName(f"invalid file name {name!r}: may not contain '/' or NUL")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise NameTooLong(f"file name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return name
