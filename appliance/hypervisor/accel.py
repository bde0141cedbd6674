"""Which accelerator QEMU uses: KVM when it really runs guests here, else TCG.

An openable /dev/kvm is not enough. On nested or restricted hosts KVM can accept a VM
and then hang it or crawl (SeaBIOS alone taking ~7 s, a Linux kernel never leaving its
real-mode setup), or refuse the CPU model a real boot asks for: some hosts run a guest
with QEMU's default CPU under KVM but abort one started with `-cpu host`
("failed to set MSR 0x10a"). So the probe boots a real guest with the very machine and
CPU options every boot uses (`machine_options`): the firmware loads a 512-byte boot
sector that enters 64-bit long mode (protected mode, PAE paging, the EFER MSR: what
every 64-bit kernel does first) and reports through QEMU's isa-debug-exit device. KVM
is chosen only if that finishes, correctly, within PROBE_SECONDS; software emulation
finishes it in well under a second.

A guest can still fail to start under KVM after the probe passed (a host whose KVM
breaks under more memory or more vCPUs): `boot_guest` then starts it again under TCG
and calls `remember_fallback`, so the rest of the process does not try KVM again.
The choice is kept per QEMU binary for the life of the process.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from pathlib import Path

QEMU = "qemu-system-x86_64"
#: What an operator may ask for: "auto" probes (and falls back); the others are taken as given.
ACCELERATORS = ("auto", "kvm", "tcg")
PROBE_SECONDS = 3.0
PROBE_EXIT = 0x2A
#: QEMU's exit status when the guest writes PROBE_EXIT to isa-debug-exit: (value << 1) | 1.
PROBE_STATUS = (PROBE_EXIT << 1) | 1

# The boot sector's code, loaded at 0x7c00 by the firmware (GNU as, linked -Ttext=0x7c00):
#   .code16: cli; ds = 0; lgdtl gdtr; cr0.PE = 1; ljmpl $0x08, $pm
#   .code32 pm: ds = es = ss = 0x10; zero 16 KiB at 0x1000; PML4[0] at 0x1000 -> PDPT at
#       0x2000 -> PD at 0x3000, whose entry 0 maps the first 2 MiB (0x83: present, rw, large);
#       cr4.PAE = 1; cr3 = 0x1000; EFER (MSR 0xC0000080).LME = 1; cr0.PG = 1; ljmpl $0x18, $lm
#   .code64 lm: movb $0x2a, %al; outb %al, $0xf4; hlt
#   gdt: null, 32-bit code 0x00cf9a000000ffff, data 0x00cf92000000ffff, 64-bit code 0x00af9a000000ffff
PROBE_CODE = bytes.fromhex(
    "fa31c08ed8660f0116a87c0f20c00c010f22c066ea1b7c0000080066b810008ed88ec08ed0bf0010000031c0b9"
    "00100000f3abc7050010000003200000c7050020000003300000c70500300000830000000f20e083c8200f22e0"
    "b8001000000f22d8b9800000c00f320d000100000f300f20c00d000000800f22c0ea827c00001800b02ae6f4f4"
    "900000000000000000ffff0000009acf00ffff00000092cf00ffff0000009aaf001f00887c0000"
)

_lock = threading.Lock()
_chosen: dict[str, str] = {}  # QEMU binary -> "kvm" | "tcg", once probed or fallen back


def machine_options(accel: str, cpus: int = 1) -> list[str]:
    """The options that decide whether `accel` can run a guest: shared by the probe and every boot.

    KVM passes the host's CPU through (a guest sees what it runs on, as under ESXi);
    TCG emulates every feature it can ("max").
    """
    return ["-accel", accel, "-cpu", "host" if accel == "kvm" else "max", "-machine", "pc", "-smp", str(cpus)]


def boot_sector() -> bytes:
    """PROBE_CODE padded to a 512-byte sector with the 0x55AA boot signature."""
    return PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa"


def probe_accelerator(accel: str, qemu: str = QEMU) -> bool:
    """True if `qemu` with `accel` and the boot's machine options runs the probe guest within PROBE_SECONDS."""
    with tempfile.TemporaryDirectory(prefix="appliance-accel-") as work:
        sector = Path(work) / "probe.img"
        sector.write_bytes(boot_sector())
        command = [qemu, *machine_options(accel), "-nodefaults", "-no-user-config", "-display", "none",
                   "-drive", f"file={sector},format=raw,if=ide", "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
        try:
            result = subprocess.run(command, capture_output=True, timeout=PROBE_SECONDS, check=False)
        except (subprocess.TimeoutExpired, FileNotFoundError):
            return False
    return result.returncode == PROBE_STATUS


def choose_accelerator(requested: str = "auto", qemu: str = QEMU) -> str:
    """The accelerator a boot uses: `requested` itself, or for "auto" the probed (or fallen-back) one.

    "auto" probes once per binary and process: "kvm" if /dev/kvm is usable and runs the
    probe guest, else "tcg".
    """
    if requested not in ACCELERATORS:
        raise ValueError(f"accelerator {requested!r} is not one of {', '.join(ACCELERATORS)}")
    if requested != "auto":
        return requested
    with _lock:
        if qemu not in _chosen:
            usable = os.access("/dev/kvm", os.R_OK | os.W_OK) and probe_accelerator("kvm", qemu)
            _chosen[qemu] = "kvm" if usable else "tcg"
        return _chosen[qemu]


def remember_fallback(qemu: str = QEMU) -> None:
    """A guest failed to start under KVM and started under TCG: "auto" means TCG from now on."""
    with _lock:
        _chosen[qemu] = "tcg"


def forget_choice(qemu: str = QEMU) -> None:
    """Probe again at the next "auto" boot (after the host's KVM was fixed, or in tests)."""
    with _lock:
        _chosen.pop(qemu, None)
