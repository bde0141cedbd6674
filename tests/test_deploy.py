"""deploy/: the systemd unit passes `systemd-analyze verify` and agrees with the example
configuration, install.sh parses and its dry run only prints, and `appliance serve
--config FILE` (the unit's ExecStart) serves on the file's ports and stops cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.config import load_config
from tests.conftest import run_cli
from tests.test_nfs_serve import accepting, free_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "appliance.service"
INSTALLED_APPLIANCE = "/opt/appliance/venv/bin/appliance"
#: Paths install.sh writes; a dry run must leave each as it found it.
INSTALL_TARGETS = ("/opt/appliance", "/etc/appliance", "/etc/systemd/system/appliance.service",
                   "/etc/systemd/system/multi-user.target.wants/appliance.service")


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value assigned in the unit (systemd allows repeats), comments dropped."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is missing: run deploy/dev-setup.sh (Debian package systemd)"
    return found


def verify(unit_dir: Path) -> str:
    result = subprocess.run([systemd_analyze(), "verify", str(unit_dir / "appliance.service")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit as shipped, except ExecStart pointed at this checkout's entry point.

    verify checks that every Exec binary exists; /opt/appliance/venv exists only on an
    installed host, so that one line is replaced and everything else must be silent.
    """
    appliance = Path(sys.executable).parent / "appliance"
    assert os.access(appliance, os.X_OK), appliance
    text = UNIT.read_text()
    assert text.count(INSTALLED_APPLIANCE) == 1
    (tmp_path / "appliance.service").write_text(text.replace(INSTALLED_APPLIANCE, str(appliance)))
    assert verify(tmp_path) == ""


def test_shipped_unit_only_lacks_the_installed_binary() -> None:
    result = subprocess.run([systemd_analyze(), "verify", str(UNIT)], capture_output=True, text=True, timeout=120,
                            check=False)
    complaints = (result.stdout + result.stderr).splitlines()
    if os.access(INSTALLED_APPLIANCE, os.X_OK):
        assert result.returncode == 0 and complaints == [], complaints
    else:
        assert complaints and all(f"Command {INSTALLED_APPLIANCE} is not executable" in line
                                  for line in complaints), complaints


def test_nfs_only_hardening_drop_in_in_the_unit_comment_is_valid(tmp_path: Path) -> None:
    """The drop-in the unit suggests for hosts without FUSE is itself a valid unit fragment."""
    lines = UNIT.read_text().splitlines()
    start = lines.index("#   [Service]")
    drop_in = [line.removeprefix("#   ") for line in lines[start:] if line.startswith("#   ")]
    assert "ProtectSystem=strict" in drop_in and "ReadWritePaths=/srv/appliance/store" in drop_in
    appliance = Path(sys.executable).parent / "appliance"
    (tmp_path / "appliance.service").write_text(UNIT.read_text().replace(INSTALLED_APPLIANCE, str(appliance)))
    (tmp_path / "appliance.service.d").mkdir()
    (tmp_path / "appliance.service.d" / "nfs-only.conf").write_text("\n".join(drop_in) + "\n")
    assert verify(tmp_path) == ""


def test_unit_settings_the_service_relies_on() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["ExecStart"] == [f"{INSTALLED_APPLIANCE} serve --config /etc/appliance/appliance.toml"]
    assert "rpcbind.service" in settings["After"][0].split() and "rpcbind.service" in settings["Wants"][0].split()
    assert "network-online.target" in settings["After"][0].split()
    assert settings["Type"] == ["exec"] and settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["2"]  # ConfigError: a restart cannot fix the file
    assert settings["KillSignal"] == ["SIGTERM"] and settings["LimitNOFILE"] == ["65536"]
    assert settings["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN CAP_NET_BIND_SERVICE"]
    assert settings["NoNewPrivileges"] == ["yes"]
    # Any file system namespace would hide the FUSE mount from the host (MountFlags= in systemd.exec(5)).
    for hides_mounts in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
                         "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ProtectKernelTunables"):
        assert hides_mounts not in settings, hides_mounts


def test_unit_and_example_config_agree() -> None:
    """The stale-mount cleanup unmounts the mount point the example config mounts on."""
    example = load_config(DEPLOY / "appliance.toml")
    pre = unit_settings(UNIT.read_text())["ExecStartPre"]
    assert pre == [f"-/usr/bin/fusermount3 -u -z {example.fuse.mountpoint}"]
    assert str(example.store.path).startswith(unit_settings(UNIT.read_text())["RequiresMountsFor"][0] + "/")


def test_install_script_parses() -> None:
    subprocess.run(["bash", "-n", str(DEPLOY / "install.sh")], check=True, timeout=60)


def test_install_dry_run_prints_and_changes_nothing() -> None:
    before = {path: os.path.lexists(path) for path in INSTALL_TARGETS}
    result = subprocess.run([str(DEPLOY / "install.sh"), "--dry-run"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert {path: os.path.lexists(path) for path in INSTALL_TARGETS} == before
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    others = [line for line in result.stdout.splitlines() if not line.startswith("+ ")]
    assert all(line.startswith(("keeping ", "appliance.service is running")) for line in others), others
    assert f"/opt/appliance/venv/bin/python -m pip install -q --upgrade {REPO}" in commands
    assert "/opt/appliance/venv/bin/appliance config check /etc/appliance/appliance.toml" in commands
    assert "systemctl enable appliance.service" in commands
    if not before["/etc/appliance"]:
        assert "install -d -m 0750 -o root -g root /etc/appliance" in commands
        assert (f"install -m 0640 -o root -g root {DEPLOY}/appliance.toml /etc/appliance/appliance.toml"
                in commands)
    if not before["/etc/systemd/system/appliance.service"]:
        assert (f"install -m 0644 -o root -g root {UNIT} /etc/systemd/system/appliance.service" in commands)


def test_install_refuses_unknown_arguments() -> None:
    result = subprocess.run([str(DEPLOY / "install.sh"), "--force"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    store = tmp_path / "store"
    run_cli("--store", str(store), "init", check=True)
    yield store


def start_serve(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "appliance", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_until(process: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"serve exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "serve did not become ready"
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


def serve_config(tmp_path: Path, store: Path, extra: str = "") -> tuple[Path, int, int]:
    nfs_port, mount_port = free_port(), free_port()
    path = tmp_path / "appliance.toml"
    path.write_text(f'[store]\npath = "{store}"\n[nfs]\nport = {nfs_port}\nmount_port = {mount_port}\n'
                    f"portmap = false\n[metrics]\nport = {free_port()}\n[api]\nport = {free_port()}\n{extra}")
    return path, nfs_port, mount_port


def test_serve_with_config_listens_on_the_configured_ports(store: Path, tmp_path: Path) -> None:
    path, nfs_port, mount_port = serve_config(tmp_path, store)
    process = start_serve("serve", "--config", str(path))
    try:
        wait_until(process, lambda: accepting(nfs_port) and accepting(mount_port))
    finally:
        code = stop(process)
    assert code == 0, process.stderr.read().decode()  # type: ignore[union-attr]
    assert not accepting(nfs_port) and not accepting(mount_port)


def test_a_flag_overrides_the_configured_port(store: Path, tmp_path: Path) -> None:
    path, nfs_port, mount_port = serve_config(tmp_path, store)
    flagged = free_port()
    process = start_serve("serve", "--config", str(path), "--nfs-port", str(flagged))
    try:
        wait_until(process, lambda: accepting(flagged) and accepting(mount_port))
        assert not accepting(nfs_port)
    finally:
        assert stop(process) == 0


def test_fuse_only_when_nfs_is_off(store: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    path, nfs_port, _ = serve_config(tmp_path, store, f'[fuse]\nmountpoint = "{mountpoint}"\n')
    path.write_text(path.read_text().replace("[nfs]\n", "[nfs]\nenabled = false\n"))
    process = start_serve("serve", "--config", str(path))
    try:
        wait_until(process, lambda: os.path.ismount(mountpoint))
        assert sorted(os.listdir(mountpoint)) == ["files", "restore-points", "sessions"]
        assert not accepting(nfs_port)
    finally:
        assert stop(process) == 0
    assert not os.path.ismount(mountpoint)


def test_serve_refuses_a_bad_config_with_one_line(store: Path, tmp_path: Path) -> None:
    path, _, _ = serve_config(tmp_path, store, "[limits]\nmax_sessions = -1\n")
    result = run_cli("serve", "--config", str(path), timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f'appliance: error: {path}: key "limits.max_sessions": '
                                          "-1 is out of range 1..100000"]


def test_serve_refuses_a_missing_password_variable_at_start(store: Path, tmp_path: Path) -> None:
    path, _, _ = serve_config(tmp_path, store, '[[vsphere.connections]]\nname = "vc1"\n'
                              'url = "https://vc1.example.com/sdk"\nuser = "backup"\n'
                              'password_env = "APPLIANCE_TEST_UNSET_PASSWORD"\n')
    assert run_cli("config", "check", str(path)).returncode == 0
    result = run_cli("serve", "--config", str(path), timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f'appliance: error: {path}: key "vsphere.connections[0].password_env": '
                                          "environment variable APPLIANCE_TEST_UNSET_PASSWORD is not set or empty"]
