"""Schemathesis against a live `serve`: every operation, every check, every phase, stateful included.

Two runs: a fixed seed, so a failure reproduces, and a random one, printed, so each CI
run also tries cases no earlier run tried. Any failure (a 500, an undocumented status, a
schema-valid request refused, a schema-violating one accepted, a wrong Allow) fails the
test with schemathesis's own report, which names the request to replay.

The fuzzer finds the store's session and asks for exports to any absolute path it
makes up, as an operator with the token may. So the server runs in a mount namespace of
its own where every file system is read-only except the test's folder: what it is asked
to write elsewhere is refused by the kernel (and answered 409), not written on this host.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_api import API, Api
from tests.test_nfs_serve import Serve, store  # noqa: F401  (the served-store fixture)

SCHEMATHESIS = Path(sys.executable).with_name("st")
SETTINGS = Path(__file__).with_name("schemathesis.toml")
PHASES = "examples,coverage,fuzzing,stateful"

#: Run "$@" with every mount read-only but $1's folder ($1 is shifted off first). FUSE mounts
#: (another process's, maybe busy) are left alone: remounting one asks its daemon.
CONFINE = """
set -e
work=$1; shift
mount --bind "$work" "$work"
awk '{for (i = 7; i <= NF; i++) if ($i == "-") { print $5, $(i + 1); break }}' /proc/self/mountinfo |
while read -r point type; do
  case "$point:$type" in
    /proc*|/sys*|/dev*|"$work":*|*:fuse*) ;;
    *) timeout 5 mount -o remount,bind,ro "$point" 2>/dev/null || true ;;
  esac
done
exec "$@"
"""


class ConfinedServe(Serve):
    """`serve` that can write only into the test's own folder (the store and its log live there)."""

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", CONFINE, "confine",
                                 str(self.store.parent), *self.command()], stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture
def api(store: Path) -> Iterator[Api]:
    server = ConfinedServe(store)
    server.start()
    running = Api(server)
    yield running
    running.close()
    assert server.stop() == 0


def test_the_confined_server_cannot_write_outside_its_folder(api: Api, tmp_path: Path) -> None:
    outside = Path("/var/tmp") / f"appliance-fuzz-{os.getpid()}.img"
    answer = api.client.post("/sessions/s1/export", json={"output": str(outside)})
    assert answer.status_code == 409 and "Read-only file system" in answer.json()["message"], answer.text
    assert not outside.exists()
    inside = tmp_path / "inside.img"
    assert api.client.post("/sessions/s1/export", json={"output": str(inside)}).status_code == 204
    assert inside.stat().st_size > 0


def run_schemathesis(api: Api, seed: int, max_examples: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(SETTINGS), "--no-color", "run", f"{api.base}{API}/openapi.json",
         "--header", f"Authorization: Bearer {api.token}", "--checks", "all", "--phases", PHASES,
         "--seed", str(seed), "--max-examples", str(max_examples), "--workers", "1"],
        capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, random.randrange(1 << 31)], ids=["fixed-seed", "random-seed"])
def test_schemathesis_finds_nothing(api: Api, seed: int) -> None:
    print(f"schemathesis seed {seed}")
    result = run_schemathesis(api, seed, 100 if seed == 1 else 50)
    assert "Stateful" in result.stdout, result.stdout[-3000:]
    assert result.returncode == 0, f"seed {seed}:\n{result.stdout[-12000:]}\n{result.stderr[-2000:]}"
    assert re.search(r"(\d+) generated, \1 passed", result.stdout), result.stdout[-3000:]
    assert "Internal error" not in api.server.log_text() and "Traceback" not in api.server.log_text()
