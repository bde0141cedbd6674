"""Every `appliance` command that takes a name refuses a bad one the same way.

Exit code 2, one line on stderr, no traceback and no "internal error", before anything
is opened or changed: the store still verifies clean and holds what it held. A NUL
cannot be tested here because no process can receive one in its arguments (execve
strings end at NUL); the rule's own tests and the API's cover it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.datastore import sessions
from appliance.datastore.namespace import Namespace
from appliance.errors import InvalidName
from appliance.store import open_store
from tests.conftest import run_cli
from tests.test_nfs_serve import store  # noqa: F401  (vm1 backed up, session s1 made offline)

#: What an operator (or a script) might pass by mistake.
BAD_NAMES: list[str | bytes] = ["", "x" * 256, "é" * 130, "a/b", "..", b"bad-\xff-utf8"]
NAME = "{}"

#: Each command with the place of the name it takes marked by NAME.
COMMANDS = {
    "backup --vm": ["backup", "--vm", NAME, "IMAGE"],
    "backup --parent": ["backup", "--vm", "vm1", "--parent", NAME, "IMAGE"],
    "points --vm": ["points", "--vm", NAME],
    "restore --vm": ["restore", "--vm", NAME, "--point", "latest", "--output", "OUT"],
    "restore --point": ["restore", "--vm", "vm1", "--point", NAME, "--output", "OUT"],
    "prune --vm": ["prune", "--vm", NAME, "--keep-last", "1"],
    "session create --vm": ["session", "create", "--vm", NAME, "--point", "latest", "--name", "new"],
    "session create --point": ["session", "create", "--vm", "vm1", "--point", NAME, "--name", "new"],
    "session create --name": ["session", "create", "--vm", "vm1", "--point", "latest", "--name", NAME],
    "session commit": ["session", "commit", NAME],
    "session export": ["session", "export", NAME, "--output", "OUT"],
    "session delete": ["session", "delete", NAME],
    "instant-boot --vm": ["instant-boot", "--vm", NAME, "--qemu"],
    "instant-boot --point": ["instant-boot", "--vm", "vm1", "--point", NAME, "--qemu"],
    "instant-boot --session": ["instant-boot", "--vm", "vm1", "--session", NAME, "--qemu"],
    "migrate": ["migrate", NAME, "--to-path", "/nowhere"],
    "stop": ["stop", NAME],
    "jobs show": ["jobs", "show", NAME],
    "jobs cancel": ["jobs", "cancel", NAME],
    "files ls --vm": ["files", "ls", "--vm", NAME],
    "files ls --point": ["files", "ls", "--vm", "vm1", "--point", NAME, "/"],
    "files get --vm": ["files", "get", "--vm", NAME, "/x", "--output", "OUT"],
    "files dump --point": ["files", "dump", "--vm", "vm1", "--point", NAME, "/", "--output", "OUT"],
    "files find --vm": ["files", "find", "--vm", NAME, "*"],
    "files index --point": ["files", "index", "--vm", "vm1", "--point", NAME],
}


def listing(store: Path) -> tuple[str, str]:
    points = run_cli("--store", str(store), "points", "--json", check=True).stdout
    sessions = run_cli("--store", str(store), "session", "list", "--json", check=True).stdout
    return points, sessions


@pytest.mark.parametrize("command", list(COMMANDS), ids=list(COMMANDS))
def test_bad_names_are_one_line_usage_errors(command: str, store: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x01" * 65536)
    before = listing(store)
    for bad in BAD_NAMES:
        arguments: list[str | bytes] = []
        for part in COMMANDS[command]:
            arguments.append(bad if part == NAME else {"IMAGE": str(image), "OUT": str(tmp_path / "out.img")}.get(part, part))
        result = run_cli("--store", str(store), *arguments)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (command, bad, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("appliance: error:"), (command, bad, result.stderr)
        assert "invalid" in lines[0] and "internal error" not in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out.img").exists()
    assert listing(store) == before
    run_cli("--store", str(store), "verify", check=True)


@pytest.mark.parametrize("bad", ["", "nul\x00byte", "a/b", "\udcff"])
def test_lookups_in_the_store_refuse_bad_names_before_lmdb(store: Path, bad: str) -> None:
    """An empty or unsafe name never reaches LMDB as a key (an empty key was a crash)."""
    with open_store(store) as opened, opened.env.begin() as txn:
        for lookup in (lambda: opened.catalog.vm_points(txn, bad), lambda: opened.catalog.resolve(txn, "vm1", bad),
                       lambda: opened.catalog.get_point(txn, bad)):
            with pytest.raises(InvalidName):
                lookup()
        with pytest.raises(InvalidName):
            sessions.get_session(Namespace(opened.env), bad)
