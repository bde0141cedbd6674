"""Choosing QEMU's accelerator on hosts whose KVM works, half-works or is missing.

The host's own KVM is whatever it is, so the fallback is tested with a QEMU whose KVM
is broken for real: `broken_kvm_qemu` writes a wrapper that runs the real
qemu-system-x86_64 in a private mount namespace where /dev/kvm is /dev/null, so QEMU
itself fails to initialise KVM and says so, as on a host without it. In "half" mode
the probe (which does not daemonize) is run under TCG instead, standing in for a host
whose KVM runs the probe and then fails a real guest: the case a probe cannot see.
Every run is logged by the wrapper, so the tests see which accelerator each start asked for.
"""

from __future__ import annotations

import logging
import shutil
import textwrap
from pathlib import Path

import pytest

from appliance.demo.guest_image import BOOTED_MARKER, GuestImage, build_guest
from appliance.errors import HypervisorError
from appliance.hypervisor import QemuGuest, boot_guest
from appliance.hypervisor.accel import (
    QEMU,
    choose_accelerator,
    forget_choice,
    machine_options,
    probe_accelerator,
)

MEMORY_MIB = 256
BOOT_TIMEOUT = 180.0


def broken_kvm_qemu(directory: Path, mode: str) -> Path:
    """A QEMU whose KVM fails at start ("missing"), or passes the probe and then fails ("half")."""
    real = shutil.which(QEMU)
    assert real is not None, f"{QEMU} is not installed"
    wrapper = directory / f"qemu-{mode}-kvm"
    probe_under_tcg = 'set -- $(echo "$*" | sed "s/-accel kvm -cpu host/-accel tcg -cpu max/")' if mode == "half" else ":"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> "{directory}/runs.log"
        case " $* " in
        *" -accel kvm "*)
            case " $* " in
            *" -daemonize "*) ;;
            *) {probe_under_tcg} ;;
            esac
            exec unshare --mount --propagation private sh -c \\
                '[ ! -e /dev/kvm ] || mount --bind /dev/null /dev/kvm; exec "$0" "$@"' {real} "$@" ;;
        esac
        exec {real} "$@"
        """))
    wrapper.chmod(0o755)
    return wrapper


def runs(directory: Path) -> list[str]:
    """The accelerator each QEMU run asked for, in order, with "+daemonize" for guest starts."""
    found = []
    for line in (directory / "runs.log").read_text().splitlines():
        words = line.split()
        accel = words[words.index("-accel") + 1]
        found.append(accel + ("+daemonize" if "-daemonize" in words else ""))
    return found


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return build_guest()


def test_the_probe_runs_under_emulation() -> None:
    """The probe's boot sector really reaches long mode and reports: else KVM is never chosen."""
    assert probe_accelerator("tcg")


def test_the_probe_and_a_boot_use_the_same_machine_and_cpu(tmp_path: Path) -> None:
    """A host can run QEMU's default CPU under KVM and abort `-cpu host`: the probe must ask for what boots ask for."""
    qemu = broken_kvm_qemu(tmp_path, "missing")
    probe_accelerator("kvm", str(qemu))
    with pytest.raises(HypervisorError):
        boot_guest(tmp_path / "run", [tmp_path / "none.img"], accel="kvm", qemu=str(qemu))
    probe, boot = (tmp_path / "runs.log").read_text().splitlines()
    assert " ".join(machine_options("kvm")) in probe
    assert " ".join(machine_options("kvm")) in boot


@pytest.mark.parametrize("requested", ["kvm", "tcg"])
def test_an_accelerator_asked_for_is_used_without_a_probe(tmp_path: Path, requested: str) -> None:
    qemu = broken_kvm_qemu(tmp_path, "missing")
    assert choose_accelerator(requested, str(qemu)) == requested
    assert not (tmp_path / "runs.log").exists()


def test_an_unknown_accelerator_is_refused() -> None:
    with pytest.raises(ValueError, match="'hvf' is not one of auto, kvm, tcg"):
        choose_accelerator("hvf")


def test_auto_chooses_tcg_where_kvm_cannot_start_a_guest(tmp_path: Path) -> None:
    qemu = str(broken_kvm_qemu(tmp_path, "missing"))
    try:
        assert choose_accelerator("auto", qemu) == "tcg"
        assert choose_accelerator("auto", qemu) == "tcg"
    finally:
        forget_choice(qemu)
    assert runs(tmp_path) in ([], ["kvm"])  # probed at most once (not at all where /dev/kvm is missing)


def test_kvm_asked_for_fails_with_qemus_own_message(tmp_path: Path, guest_image: GuestImage) -> None:
    """No fallback when the operator chose KVM: the boot fails and says why."""
    qemu = broken_kvm_qemu(tmp_path, "missing")
    disk = guest_image.copy_disk(tmp_path / "guest.img")
    with pytest.raises(HypervisorError, match=r"QEMU \(kvm\) could not start the guest.*failed to initialize kvm"):
        boot_guest(tmp_path / "run", [disk], MEMORY_MIB, accel="kvm", qemu=str(qemu))
    assert runs(tmp_path) == ["kvm+daemonize"]


@pytest.mark.slow
def test_a_guest_kvm_cannot_start_boots_under_tcg_and_auto_remembers_it(
        tmp_path: Path, guest_image: GuestImage, guests: list[QemuGuest], caplog: pytest.LogCaptureFixture) -> None:
    qemu = str(broken_kvm_qemu(tmp_path, "half"))
    disk = guest_image.copy_disk(tmp_path / "guest.img", 600)
    try:
        assert choose_accelerator("auto", qemu) == "kvm"  # KVM runs the probe on this "host"
        with caplog.at_level(logging.WARNING, logger="appliance.events"):
            guest = boot_guest(tmp_path / "run1", [disk], MEMORY_MIB, qemu=qemu)
        guests.append(guest)
        assert guest.record.accel == "tcg" and "-accel tcg" in " ".join(guest.record.command)
        guest.wait_for_console(BOOTED_MARKER, BOOT_TIMEOUT)
        [line] = [r.getMessage() for r in caplog.records if "hypervisor.accel_fallback" in r.getMessage()]
        assert "used=tcg" in line and "kvm_error=" in line and str(tmp_path / "run1") in line
        assert choose_accelerator("auto", qemu) == "tcg"  # remembered for the process
        guest.power_off(timeout=30)

        second = boot_guest(tmp_path / "run2", [disk], MEMORY_MIB, qemu=qemu)
        guests.append(second)
        assert second.record.accel == "tcg"
    finally:
        forget_choice(qemu)
    assert runs(tmp_path) == ["kvm", "kvm+daemonize", "tcg+daemonize", "tcg+daemonize"]


def test_a_disk_no_accelerator_can_open_fails_with_the_kvm_error_and_changes_no_choice(
        tmp_path: Path) -> None:
    """Both starts fail: the guest's fault, not KVM's; "auto" still means what the probe said."""
    qemu = str(broken_kvm_qemu(tmp_path, "half"))
    try:
        assert choose_accelerator("auto", qemu) == "kvm"
        with pytest.raises(HypervisorError, match=r"QEMU \(kvm\) could not start.*no-such-disk.img"):
            boot_guest(tmp_path / "run", [tmp_path / "no-such-disk.img"], qemu=qemu)
        assert choose_accelerator("auto", qemu) == "kvm"
    finally:
        forget_choice(qemu)
    assert runs(tmp_path) == ["kvm", "kvm+daemonize", "tcg+daemonize"]
