"""The CLI exactly as operators call it: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli, sha256_of, write_image


@pytest.fixture
def cli_store(tmp_path: Path) -> str:
    path = str(tmp_path / "store")
    run_cli("--store", path, "init", "--chunk-size", str(256 << 10), check=True)
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("appliance: error:"), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_backup_points_restore_verify_stats(cli_store: str, tmp_path: Path) -> None:
    disk0 = write_image(tmp_path / "d0.img", 2 << 20, seed=1)
    with open(disk0, "r+b") as handle:
        handle.truncate(3 << 20)  # a zero tail: whole zero chunks
    disk1 = write_image(tmp_path / "d1.img", 1 << 20, seed=2)
    vmx = tmp_path / "app.vmx"
    vmx.write_text("memsize = 512\n")
    backed = run_cli("--store", cli_store, "backup", "--vm", "app", "--vmx", str(vmx), str(disk0), str(disk1), check=True)
    point_id = backed.stdout.strip().splitlines()[-1]
    listed = json.loads(run_cli("--store", cli_store, "points", "--vm", "app", "--json", check=True).stdout)
    assert [p["id"] for p in listed] == [point_id]
    assert listed[0]["files"] == ["app.vmx"] and len(listed[0]["disks"]) == 2
    table = run_cli("--store", cli_store, "points", check=True).stdout
    assert point_id in table and "app" in table
    for disk, source in ((0, disk0), (1, disk1)):
        out = tmp_path / f"out{disk}.img"
        run_cli("--store", cli_store, "restore", "--vm", "app", "--point", "latest", "--disk", str(disk),
                "--output", str(out), check=True)
        assert sha256_of(out) == sha256_of(source)
    assert (tmp_path / "out0.img").stat().st_blocks * 512 <= 2 << 20  # zero chunks became holes
    assert "is sound" in run_cli("--store", cli_store, "verify", check=True).stdout
    stats = json.loads(run_cli("--store", cli_store, "stats", "--json", check=True).stdout)
    assert stats["points"] == 1 and stats["logical_bytes"] == 4 << 20 and stats["stored_bytes"] > 0
    assert stats["total_ratio"] > 1


def test_incremental_and_prune(cli_store: str, tmp_path: Path) -> None:
    image = write_image(tmp_path / "d.img", 2 << 20, seed=3)
    first = run_cli("--store", cli_store, "backup", "--vm", "vm", str(image), check=True).stdout.split()[-1]
    with open(image, "r+b") as handle:
        handle.seek(300_000)
        handle.write(b"\xff" * 5000)
    areas = tmp_path / "areas.json"
    areas.write_text(json.dumps({"changedArea": [{"start": 300_000, "length": 5000}]}))
    second = run_cli("--store", cli_store, "backup", "--vm", "vm", "--parent", first[:12],
                     "--changed-areas", str(areas), str(image), check=True).stdout.split()[-1]
    pruned = run_cli("--store", cli_store, "prune", "--vm", "vm", "--keep-last", "1", check=True).stdout
    assert f"removed vm {first}" in pruned
    out = tmp_path / "out.img"
    run_cli("--store", cli_store, "restore", "--vm", "vm", "--point", second, "--output", str(out), check=True)
    assert sha256_of(out) == sha256_of(image)


def sparse_vmdk_with_bad_grain_table(tmp_path: Path) -> Path:
    raw = write_image(tmp_path / "src.img", 2 << 20, seed=4)
    vmdk = tmp_path / "bad.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicSparse", str(raw), str(vmdk)],
                   check=True)
    data = bytearray(vmdk.read_bytes())
    gd_offset = struct.unpack_from("<Q", data, 56)[0] * 512
    gt_offset = struct.unpack_from("<I", data, gd_offset)[0] * 512
    struct.pack_into("<I", data, gt_offset + 4, 0x7FFFFFF0)  # second grain far past the end
    vmdk.write_bytes(bytes(data))
    return vmdk


@pytest.mark.parametrize(
    "case, code, fragment",
    [
        ("not-initialised", 1, "not an initialised store"),
        ("no-store-directory", 1, "does not exist"),
        ("unknown-vm", 1, "unknown VM 'ghost'"),
        ("unknown-point", 1, "no restore point 'nope'"),
        ("missing-image", 1, "missing.img"),
        ("truncated-flat", 1, "truncated"),
        ("grain-table-past-end", 1, "past end of file"),
        ("areas-outside-disk", 1, "past the end of the disk"),
        ("bad-vm-name", 2, "may not contain '/'"),
        ("restore-existing-output", 2, "already exists"),
        ("double-init", 1, "already holds a store"),
    ],
)
def test_errors_are_one_line(cli_store: str, tmp_path: Path, case: str, code: int, fragment: str) -> None:
    image = write_image(tmp_path / "d.img", 1 << 20, seed=5)
    run_cli("--store", cli_store, "backup", "--vm", "vm", str(image), check=True)
    areas = tmp_path / "areas.json"
    areas.write_text(json.dumps({"changedArea": [{"start": 1 << 20, "length": 1}]}))
    flat_descriptor = tmp_path / "trunc.vmdk"
    if case == "truncated-flat":
        subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(image),
                        str(flat_descriptor)], check=True)
        with open(tmp_path / "trunc-flat.vmdk", "r+b") as handle:
            handle.truncate(500_000)
    commands = {
        "not-initialised": ["--store", str(tmp_path), "points"],
        "no-store-directory": ["--store", str(tmp_path / "nowhere"), "points"],
        "unknown-vm": ["--store", cli_store, "restore", "--vm", "ghost", "--point", "latest",
                       "--output", str(tmp_path / "o")],
        "unknown-point": ["--store", cli_store, "restore", "--vm", "vm", "--point", "nope",
                          "--output", str(tmp_path / "o")],
        "missing-image": ["--store", cli_store, "backup", "--vm", "vm", str(tmp_path / "missing.img")],
        "truncated-flat": ["--store", cli_store, "backup", "--vm", "vm", str(flat_descriptor)],
        "grain-table-past-end": ["--store", cli_store, "backup", "--vm", "vm",
                                 str(sparse_vmdk_with_bad_grain_table(tmp_path))],
        "areas-outside-disk": ["--store", cli_store, "backup", "--vm", "vm", "--parent", "latest",
                               "--changed-areas", str(areas), str(image)],
        "bad-vm-name": ["--store", cli_store, "backup", "--vm", "web/01", str(image)],
        "restore-existing-output": ["--store", cli_store, "restore", "--vm", "vm", "--point", "latest",
                                    "--output", str(image)],
        "double-init": ["--store", cli_store, "init"],
    }
    assert_one_line_error(run_cli(*commands[case]), code, fragment)
    listed = json.loads(run_cli("--store", cli_store, "points", "--json", check=True).stdout)
    assert len(listed) == 1  # nothing stored was lost or added
    assert run_cli("--store", cli_store, "verify").returncode == 0


def test_verify_exits_1_on_damage(cli_store: str, tmp_path: Path) -> None:
    run_cli("--store", cli_store, "backup", "--vm", "vm", str(write_image(tmp_path / "d.img", 1 << 20)), check=True)
    pack = next(Path(cli_store, "packs").glob("*/*.pack"))
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 1
    pack.write_bytes(bytes(data))
    result = run_cli("--store", cli_store, "verify")
    assert result.returncode == 1
    assert "damage:" in result.stderr and "is damaged" in result.stderr


def test_progress_is_quiet_when_not_a_terminal(cli_store: str, tmp_path: Path) -> None:
    result = run_cli("--store", cli_store, "backup", "--vm", "vm", str(write_image(tmp_path / "d.img", 1 << 20)))
    assert "\r" not in result.stderr and "ETA" not in result.stderr


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A bug (not an ApplianceError) is named in one line, exit 1; --debug adds the traceback."""
    from appliance import cli

    def broken(args: object) -> int:
        raise RuntimeError("a bug in a command")

    monkeypatch.setattr(cli, "cmd_gc", broken)
    assert cli.main(["--store", "/nonexistent", "gc"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["appliance: internal error: RuntimeError: a bug in a command (--debug shows the traceback)"]
    assert cli.main(["--store", "/nonexistent", "--debug", "gc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("appliance: internal error: RuntimeError: a bug in a command\n")
    assert "Traceback (most recent call last)" in err and "in broken" in err
