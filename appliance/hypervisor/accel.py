"""Which accelerator QEMU should use: KVM when it really runs a guest, else TCG.

An openable /dev/kvm is not enough. On nested or restricted hosts KVM can accept a VM
and then hang it, or crawl (on this project's build machines SeaBIOS alone takes ~7 s
under KVM and a Linux kernel never gets past its real-mode setup, while software
emulation boots the same guest in ~4 s). So the probe runs a real guest: the
machine's firmware boots a 512-byte boot sector that enters 64-bit long mode
(protected mode, PAE paging, the EFER MSR: what every 64-bit kernel does first) and
reports through QEMU's isa-debug-exit device. KVM is chosen only if that finishes,
correctly, within PROBE_SECONDS; software emulation finishes it in well under a second.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path

QEMU = "qemu-system-x86_64"
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


def boot_sector() -> bytes:
    """PROBE_CODE padded to a 512-byte sector with the 0x55AA boot signature."""
    return PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa"


def probe_accelerator(accel: str) -> bool:
    """True if QEMU with `accel` runs the probe guest to its end within PROBE_SECONDS."""
    with tempfile.TemporaryDirectory(prefix="appliance-accel-") as work:
        sector = Path(work) / "probe.img"
        sector.write_bytes(boot_sector())
        command = [QEMU, "-accel", accel, "-machine", "pc", "-nodefaults", "-no-user-config", "-display", "none",
                   "-drive", f"file={sector},format=raw,if=ide", "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
        try:
            result = subprocess.run(command, capture_output=True, timeout=PROBE_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == PROBE_STATUS


@functools.cache
def best_accelerator() -> str:
    """"kvm" if /dev/kvm is usable and passes the probe, else "tcg"; probed once per process."""
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and probe_accelerator("kvm"):
        return "kvm"
    return "tcg"
