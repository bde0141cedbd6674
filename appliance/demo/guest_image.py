"""A small self-booting Linux disk built from Debian packages: the demo's VM and the QEMU tests' guest.

Why this shape: the demo and the tests boot a real guest from a disk that went through a
backup the way a hypervisor boots a VM, from the disk's own bootloader (no -kernel/-initrd:
`appliance instant-boot --qemu` gives QEMU only the disks), on a machine without a kernel
package installed, without loop mounts, and within a couple of minutes.

The disk (`GuestImage.disk`), MBR-partitioned:

    sector 0            syslinux's mbr.bin (boot code) + the partition table (sfdisk)
    partition 1         FAT, active, BOOT_MIB at BOOT_OFFSET: syslinux's ldlinux.sys
                        (`syslinux --install` writes the volume boot record), Debian's
                        kernel, the initramfs and syslinux.cfg
    partition 2         ext4 root at ROOT_OFFSET (`mkfs.ext4 -d`, written in place)

- The kernel is Debian's, taken from the `linux-image-<version>-amd64` package with
  `apt-get download` + `dpkg-deb -x` (nothing is installed). It and the initramfs are
  also kept beside the disk (`kernel`, `initrd`) for a direct -kernel boot.
- The initramfs is busybox-static plus the modules the guest needs (virtio_pci,
  virtio_blk, ext4 for the root, button and evdev for the power button, and what
  `modprobe --show-depends` says they depend on). Its /init
  mounts the `root=` of the kernel command line (syslinux.cfg says /dev/vda2) and
  switches to it; Debian's stock initramfs would double the boot time.
- The root is ext4 without a journal, so that what the guest synced is in place on the
  disk (`guest_file` reads it back with `debugfs` at the partition's offset, which does
  not replay a journal). Its /sbin/init is the guest's program: read every file under
  /payload (if built with one: files a `stage_payload` callable copies in, standing in
  for the binaries and libraries a real OS reads while it boots), print BOOTED_MARKER, write
  /guest/started, append a line to /guest/progress and sync once a second for
  `appliance_guest_seconds=N` seconds (from the kernel command line), write
  /guest/finished, print DONE_MARKER, power off. Like a real OS it shuts down on the
  ACPI power button (busybox acpid: print POWER_BUTTON_MARKER, sync, power off), so
  `QemuGuest.power_off` ends it the polite way.
- How long the guest runs is part of the disk (syslinux.cfg's APPEND line): `copy_disk`
  makes a copy with the seconds a caller wants, rewriting that one file with mtools.

Everything is cached under a directory keyed by the kernel package, the busybox and
syslinux versions, this file's scripts, the layout and the payload size, so only the
first run pays for the build (`apt-get download` of the kernel package: it needs
Debian's package lists, and the tools `GUEST_TOOLS` names).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import GuestImageError

BOOTED_MARKER = "APPLIANCE-GUEST: booted"
DONE_MARKER = "APPLIANCE-GUEST: done"
POWER_BUTTON_MARKER = "APPLIANCE-GUEST: power button"
MIB = 1 << 20
SECTOR = 512
BOOT_OFFSET = MIB  # partition 1 starts at sector 2048, as partitioning tools align it
BOOT_MIB = 32  # kernel (~8 MB) + initramfs (~5 MB) with room for a larger kernel
ROOT_OFFSET = BOOT_OFFSET + BOOT_MIB * MIB
ROOT_MIB = 64
ROOT_DEVICE = "/dev/vda2"
#: The root disk needs the first three; `button` and `evdev` let acpid see the ACPI power button.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "ext4", "button", "evdev")
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
DEFAULT_CACHE = Path(os.environ.get("APPLIANCE_GUEST_CACHE", "/var/tmp/appliance-guest-cache"))
#: What the build runs, with the Debian package that has it (deploy/dev-setup.sh installs them all).
GUEST_TOOLS = {"apt-get": "apt", "dpkg-deb": "dpkg", "depmod": "kmod", "modprobe": "kmod", "cpio": "cpio",
               "sfdisk": "fdisk", "mkfs.fat": "dosfstools", "syslinux": "syslinux", "mcopy": "mtools",
               "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs"}
GUEST_FILES = {Path("/bin/busybox"): "busybox-static", SYSLINUX_MBR: "syslinux-common"}
#: Copies real files (`budget` bytes at most) into a directory: the payload a guest reads while it boots.
StagePayload = Callable[[Path, int], object]
#: mtools refuses images whose FAT geometry it finds odd unless told not to check.
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

INITRAMFS_INIT = """#!/bin/busybox sh
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for module in $(cat /modules.list); do
    insmod "/modules/$module" 2>/dev/null || echo "initramfs: insmod $module failed (not needed on every CPU)"
done
root=$(sed -n 's/.*root=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
root=${root:-/dev/vda}
tries=0
while [ ! -b "$root" ] && [ $tries -lt 300 ]; do sleep 0.1; tries=$((tries + 1)); done
mkdir -p /newroot
if ! mount -t ext4 "$root" /newroot; then
    echo "initramfs: cannot mount $root"
    poweroff -f
fi
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
"""

GUEST_INIT = f"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
seconds=$(sed -n 's/.*appliance_guest_seconds=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
acpid -f -l /dev/null -p /dev/null &
if [ -d /payload ]; then
    find /payload -type f -exec cat {{}} + > /dev/null
fi
mkdir -p /guest
echo "booted $(cat /proc/sys/kernel/random/boot_id)" > /guest/started
sync
echo "{BOOTED_MARKER}"
i=0
while [ "$i" -lt "${{seconds:-0}}" ]; do
    i=$((i + 1))
    echo "$i" >> /guest/progress
    sync
    echo "APPLIANCE-GUEST: progress $i"
    sleep 1
done
echo "finished after $i seconds" > /guest/finished
sync
mount -o remount,ro /
echo "{DONE_MARKER}"
poweroff -f
"""

#: acpid runs this on the ACPI power button (QMP system_powerdown), as a real OS shuts down on it.
POWER_BUTTON = f"""#!/bin/busybox sh
export PATH=/bin
echo "{POWER_BUTTON_MARKER}" > /dev/console
sync
mount -o remount,ro /
poweroff -f
"""

#: syslinux's configuration: boot at once (no prompt), output on the serial port too.
SYSLINUX_CFG = """SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
    LINUX /vmlinuz
    INITRD /initrd
    APPEND {append}
"""


def kernel_append(seconds: int = 0, root: str = ROOT_DEVICE) -> str:
    """The kernel command line; `seconds` is how long the guest runs before powering off."""
    return f"console=ttyS0 root={root} panic=-1 loglevel=4 appliance_guest_seconds={seconds}"


@dataclass(frozen=True)
class GuestImage:
    """A built guest: `disk` boots by itself (seconds=0); `kernel`/`initrd` are the same files, for -kernel."""

    kernel: Path
    initrd: Path
    disk: Path

    def copy_disk(self, output: Path, seconds: int = 0) -> Path:
        """A copy of the disk whose guest runs `seconds` seconds before powering off."""
        shutil.copyfile(self.disk, output)
        _write_boot_config(output, kernel_append(seconds))
        return output


def missing_guest_tools() -> list[str]:
    """What this host lacks to build the guest, as "tool (Debian package)"; empty when nothing is missing."""
    missing = [f"{tool} ({package})" for tool, package in GUEST_TOOLS.items() if shutil.which(tool) is None]
    missing += [f"{path} ({package})" for path, package in GUEST_FILES.items() if not path.exists()]
    return missing


def _run(*command: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600, check=False)
    if result.returncode != 0:
        raise GuestImageError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def _write_boot_config(disk: Path, append: str) -> None:
    """Replace syslinux.cfg on the disk's FAT partition in place (mtools: no mount)."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as config:
        config.write(SYSLINUX_CFG.format(append=append))
        config.flush()
        _run("mcopy", "-o", "-i", f"{disk}@@{BOOT_OFFSET}", config.name, "::syslinux.cfg", env=MTOOLS_ENV)


def guest_file(disk: Path, path: str) -> str | None:
    """A file of the guest's ext4 root partition, read without mounting; None if it does not exist."""
    result = subprocess.run(["debugfs", "-R", f"cat {path}", f"{disk}?offset={ROOT_OFFSET}"], capture_output=True,
                            text=True, timeout=60, check=True)
    if "File not found" in result.stderr:
        return None
    if "debugfs" not in result.stderr or "error" in result.stderr.lower():
        raise GuestImageError(f"debugfs could not read {path} from {disk}: {result.stderr.strip()[-500:]}")
    return result.stdout


def kernel_package() -> str:
    """The versioned kernel package Debian's `linux-image-amd64` points at today."""
    for line in _run("apt-cache", "depends", "linux-image-amd64").splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise GuestImageError("apt-cache knows no linux-image-amd64 dependency (run apt-get update)")


def _cache_key(package: str, payload_mib: int) -> str:
    versions = _run("dpkg-query", "-W", "-f=${Version}\n", "busybox-static", "syslinux", "syslinux-common")
    inputs = "\n".join([package, versions, INITRAMFS_INIT, GUEST_INIT, POWER_BUTTON, SYSLINUX_CFG, kernel_append(),
                        str(GUEST_MODULES), str((BOOT_OFFSET, BOOT_MIB, ROOT_MIB)), str(payload_mib)])
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]


def build_guest(cache: Path = DEFAULT_CACHE, payload_mib: int = 0,
                stage_payload: StagePayload | None = None) -> GuestImage:
    """The cached guest for today's kernel package, built first if missing.

    `payload_mib` MiB of files, copied in by `stage_payload`, are read by the guest
    before its boot marker. A lock serializes concurrent builds; the build happens in a
    temporary directory renamed into place, so an interrupted build never looks complete.
    """
    if payload_mib and stage_payload is None:
        raise ValueError("a payload needs stage_payload to copy its files")
    missing = missing_guest_tools()
    if missing:
        raise GuestImageError(f"cannot build the guest disk: missing {', '.join(missing)}")
    package = kernel_package()
    target = cache / f"guest-{_cache_key(package, payload_mib)}"
    image = GuestImage(target / "vmlinuz", target / "initrd", target / "disk.img")
    if target.is_dir():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "guest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            with tempfile.TemporaryDirectory(dir=cache, prefix="building-") as work:
                _build(package, payload_mib, stage_payload, Path(work))
                os.rename(Path(work) / "out", target)
    return image


def _build(package: str, payload_mib: int, stage_payload: StagePayload | None, work: Path) -> None:
    _run("apt-get", "download", package, cwd=work)
    (deb,) = work.glob(f"{package}_*.deb")
    tree = work / "kernel"
    _run("dpkg-deb", "-x", str(deb), str(tree))
    (version,) = [p.name for p in (tree / "lib" / "modules").iterdir()]
    _run("depmod", "-b", str(tree), version)
    out = work / "out"
    out.mkdir()
    shutil.copyfile(tree / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
    _write_initramfs(work / "initramfs", _module_files(tree, version), out / "initrd")
    root_mib = ROOT_MIB + payload_mib * 5 // 4
    _partition(out / "disk.img", root_mib)
    _write_boot_partition(out / "disk.img", out / "vmlinuz", out / "initrd")
    _write_root(work / "root", payload_mib, stage_payload, out / "disk.img", root_mib)


def _partition(disk: Path, root_mib: int) -> None:
    """An empty disk with the partition table and syslinux's MBR boot code (it boots the active partition)."""
    with open(disk, "wb") as image:
        image.truncate(ROOT_OFFSET + root_mib * MIB)
    table = (f"label: dos\n"
             f"start={BOOT_OFFSET // SECTOR}, size={BOOT_MIB * MIB // SECTOR}, type=6, bootable\n"
             f"start={ROOT_OFFSET // SECTOR}, size={root_mib * MIB // SECTOR}, type=83\n")
    subprocess.run(["sfdisk", "--quiet", str(disk)], input=table, capture_output=True, text=True, timeout=60,
                   check=True)
    boot_code = SYSLINUX_MBR.read_bytes()
    assert len(boot_code) <= 440, f"{SYSLINUX_MBR} is larger than the MBR's boot code area"
    with open(disk, "r+b") as image:
        image.write(boot_code)  # bytes 440.. (disk signature, partition table) stay sfdisk's


def _write_boot_partition(disk: Path, kernel: Path, initrd: Path) -> None:
    """FAT at BOOT_OFFSET with ldlinux.sys, the kernel, the initramfs and syslinux.cfg.

    `-h` records the partition's start (hidden sectors) in the FAT boot sector, where
    syslinux's volume boot record looks for it to find ldlinux.sys on the disk.
    """
    _run("mkfs.fat", "--offset", str(BOOT_OFFSET // SECTOR), "-h", str(BOOT_OFFSET // SECTOR), "-n", "GUESTBOOT",
         str(disk), str(BOOT_MIB * 1024))
    _run("syslinux", "--install", "--offset", str(BOOT_OFFSET), str(disk))
    target = f"{disk}@@{BOOT_OFFSET}"
    _run("mcopy", "-i", target, str(kernel), "::vmlinuz", env=MTOOLS_ENV)
    _run("mcopy", "-i", target, str(initrd), "::initrd", env=MTOOLS_ENV)
    _write_boot_config(disk, kernel_append())


def _module_files(tree: Path, version: str) -> list[Path]:
    """The .ko files to insmod, dependencies first, each once."""
    ordered: list[Path] = []
    for module in GUEST_MODULES:
        listing = _run("modprobe", "-d", str(tree), "-S", version, "--show-depends", module)
        for line in listing.splitlines():
            fields = line.split()
            if fields[:1] == ["insmod"] and Path(fields[1]) not in ordered:
                ordered.append(Path(fields[1]))
    return ordered


def _busybox_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copyfile("/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in set(_run("/bin/busybox", "--list").split()) - {"busybox"}:
        (root / "bin" / applet).symlink_to("busybox")
    for name in ("dev", "proc", "sys", "sbin"):
        (root / name).mkdir()


def _write_initramfs(root: Path, modules: list[Path], output: Path) -> None:
    _busybox_tree(root)
    (root / "modules").mkdir()
    for module in modules:
        shutil.copyfile(module, root / "modules" / module.name)
    (root / "modules.list").write_text("".join(f"{module.name}\n" for module in modules))
    (root / "init").write_text(INITRAMFS_INIT)
    (root / "init").chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with open(output, "wb") as archive:
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], input="\n".join(names).encode(),
                       stdout=archive, cwd=root, timeout=120, check=True)


def _write_root(root: Path, payload_mib: int, stage_payload: StagePayload | None, disk: Path,
                root_mib: int) -> None:
    """The ext4 root made in place at ROOT_OFFSET (mke2fs's `offset`), the rest of the disk untouched."""
    _busybox_tree(root)
    (root / "sbin" / "init").write_text(GUEST_INIT)
    (root / "sbin" / "init").chmod(0o755)
    action = root / "etc" / "acpi" / "PWRF" / "00000080"  # busybox acpid's default action for PWRF
    action.parent.mkdir(parents=True)
    action.write_text(POWER_BUTTON)
    action.chmod(0o755)
    if payload_mib and stage_payload is not None:
        stage_payload(root / "payload", payload_mib << 20)
    _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "guest-root", "-E",
         f"root_owner=0:0,offset={ROOT_OFFSET}", "-d", str(root), str(disk), f"{root_mib}M")
