"""The README's first command: the demo runs end to end on embedded defaults.

The whole demo boots a VM from its backup over NFS (QEMU, root): CI has both, so the
test asserts the boot part ran, never that it was skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.demo.guest_image import BOOTED_MARKER
from tests.conftest import run_cli


def data_part_held(stdout: str) -> None:
    assert stdout.count("-> identical") == 3
    assert "restore point unchanged: True" in stdout
    assert "is sound" in stdout


@pytest.mark.slow
def test_demo_boots_a_vm_from_its_backup_over_nfs(tmp_path: Path) -> None:
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), check=True)
    out = result.stdout
    data_part_held(out)
    assert "boot part skipped" not in out
    assert re.search(r"QEMU pid \d+ under (kvm|tcg), disk nfs://127\.0\.0\.1/sessions/demo-boot/demo-guest-flat\.vmdk", out)
    assert re.search(rf"guest console: SYSLINUX .* \| {BOOTED_MARKER}", out)
    assert re.search(r"/guest/started = 'booted [0-9a-f-]{36}\\n'", out)
    assert "the guest now runs on " + str(tmp_path / "demo" / "boot" / "production" / "demo-boot" / "demo-guest.raw") in out
    assert "power off: powerdown" in out
    [(lines, migrated)] = re.findall(r"/guest/progress has (\d+) lines \((\d+) by the end of the migration\)", out)
    assert int(lines) >= int(migrated) + 2
    assert re.search(r"demo-guest-flat\.vmdk: sha256 (\w+)\.\.\. backed up \1\.\.\. -> unchanged", out)
    assert "serve exited with 0" in out
    times = out[out.index("step times:"):]
    assert re.search(r"instant boot: session \+ QEMU booting the disk over nfs:// +\d+\.\d s", times)
    assert float(re.search(r"total +(\d+\.\d) s", times).group(1)) < 120  # type: ignore[union-attr]
    assert not list((tmp_path / "demo" / "boot" / "mnt").iterdir())  # FUSE unmounted with serve


def test_demo_data_only_says_why_the_boot_part_is_skipped(tmp_path: Path) -> None:
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), "--data-only", check=True)
    data_part_held(result.stdout)
    assert "\nboot part skipped: --data-only was given\n" in result.stdout
    assert "instant boot" not in result.stdout
