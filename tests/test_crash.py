"""kill -9 of a running ingest at random moments: no partial point, a clean verify."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli, sha256_of, write_image


@pytest.mark.slow
def test_kill_9_during_ingest_leaves_store_consistent(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    # zstd level 19 slows ingest to ~2 s for this image, so most kills land mid-ingest:
    # between pack writes, around a pack seal, or during the commit.
    run_cli("--store", store, "init", "--chunk-size", str(256 << 10), "--compression-level", "19", check=True)
    base = write_image(tmp_path / "base.img", 16 << 20, seed=1)
    run_cli("--store", store, "backup", "--vm", "vm", str(base), check=True)
    big = write_image(tmp_path / "big.img", 160 << 20, seed=2)
    rng = random.Random(42)
    committed = 1
    for attempt in range(10):
        child = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--store", store, "backup", "--vm", "vm", str(big)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        time.sleep(rng.uniform(0.05, 2.5))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        points = json.loads(run_cli("--store", store, "points", "--json", check=True).stdout)
        # Killed before its commit: no new point. Finished, or killed after the commit
        # but before exiting: one new point, which must be whole (restored below).
        if child.returncode == 0:
            assert len(points) == committed + 1
        assert len(points) in (committed, committed + 1), f"attempt {attempt}"
        committed = len(points)
        verified = run_cli("--store", store, "verify", "--full")
        assert verified.returncode == 0, verified.stderr
    run_cli("--store", store, "gc", check=True)
    assert not list(Path(store, "packs", "tmp").glob("*"))
    assert run_cli("--store", store, "verify", "--full").returncode == 0
    run_cli("--store", store, "backup", "--vm", "vm", str(big), check=True)
    points = json.loads(run_cli("--store", store, "points", "--json", check=True).stdout)
    for number, point in enumerate(points):
        out = tmp_path / f"out-{number}.img"
        run_cli("--store", store, "restore", "--vm", "vm", "--point", point["id"], "--output", str(out), check=True)
        assert sha256_of(out) == sha256_of(base if number == 0 else big)
        out.unlink()
