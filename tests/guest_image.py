"""A small bootable Linux guest built from Debian packages, for the QEMU boot tests.

Why this shape: the tests must boot a real guest from a disk that went through a backup,
on a machine without a kernel package installed and within a test's time budget.

- The kernel is Debian's, taken from the `linux-image-<version>-amd64` package with
  `apt-get download` + `dpkg-deb -x` (nothing is installed). QEMU loads it with
  `-kernel`/`-initrd`: the *disk* is what comes from the backup, and booting through a
  bootloader would only add seconds that measure nothing of ours.
- The initramfs is busybox-static plus the modules the root needs (virtio_pci,
  virtio_blk, ext4 and what `modprobe --show-depends` says they depend on). Its /init
  mounts /dev/vda and switches to it; Debian's stock initramfs would double the boot time.
- The root disk is an ext4 image made by `mkfs.ext4 -d` from a busybox tree, without a
  journal so that what the guest synced is in place on the disk (the tests read it
  back with `debugfs`, which does not replay a journal). Its /sbin/init is the guest's
  program: read every file under /payload (if built with one: real files of this
  machine, standing in for the binaries and libraries a real OS reads while it boots),
  print BOOTED_MARKER, write /guest/started, append a line to /guest/progress
  and sync once a second for `appliance_guest_seconds=N` seconds (from the kernel
  command line), write /guest/finished, print DONE_MARKER, power off.

Everything is cached under a directory keyed by the kernel package, the busybox version,
this file's scripts and the payload size, so only the first run pays for the build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.bench.ingest import stage_files

BOOTED_MARKER = "APPLIANCE-GUEST: booted"
DONE_MARKER = "APPLIANCE-GUEST: done"
ROOT_MIB = 64
ROOT_MODULES = ("virtio_pci", "virtio_blk", "ext4")
DEFAULT_CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE", "/var/tmp/appliance-test-cache"))

INITRAMFS_INIT = """#!/bin/busybox sh
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for module in $(cat /modules.list); do
    insmod "/modules/$module" 2>/dev/null || echo "initramfs: insmod $module failed (not needed on every CPU)"
done
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 300 ]; do sleep 0.1; tries=$((tries + 1)); done
mkdir -p /newroot
if ! mount -t ext4 /dev/vda /newroot; then
    echo "initramfs: cannot mount /dev/vda"
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


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot `kernel` + `initrd` with `append`, root disk a copy of `disk`."""

    kernel: Path
    initrd: Path
    disk: Path

    def append(self, seconds: int = 0) -> str:
        """The kernel command line; `seconds` is how long the guest runs before powering off."""
        return f"console=ttyS0 panic=-1 loglevel=4 appliance_guest_seconds={seconds}"


def _run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def kernel_package() -> str:
    """The versioned kernel package Debian's `linux-image-amd64` points at today."""
    for line in _run("apt-cache", "depends", "linux-image-amd64").splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise RuntimeError("apt-cache knows no linux-image-amd64 dependency (run apt-get update)")


def _cache_key(package: str, payload_mib: int) -> str:
    busybox = _run("dpkg-query", "-W", "-f=${Version}", "busybox-static")
    inputs = "\n".join([package, busybox, INITRAMFS_INIT, GUEST_INIT, str(ROOT_MODULES), str(ROOT_MIB),
                        str(payload_mib)])
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]


def build_guest(cache: Path = DEFAULT_CACHE, payload_mib: int = 0) -> GuestImage:
    """The cached guest for today's kernel package, built first if missing.

    `payload_mib` MiB of real files are read by the guest before its boot marker. A
    lock serializes concurrent test processes; the build happens in a temporary
    directory renamed into place, so an interrupted build never looks complete.
    """
    package = kernel_package()
    target = cache / f"guest-{_cache_key(package, payload_mib)}"
    image = GuestImage(target / "vmlinuz", target / "initrd.cpio", target / "root.img")
    if target.is_dir():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "guest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            with tempfile.TemporaryDirectory(dir=cache, prefix="building-") as work:
                _build(package, payload_mib, Path(work))
                os.rename(Path(work) / "out", target)
    return image


def _build(package: str, payload_mib: int, work: Path) -> None:
    _run("apt-get", "download", package, cwd=work)
    (deb,) = work.glob(f"{package}_*.deb")
    tree = work / "kernel"
    _run("dpkg-deb", "-x", str(deb), str(tree))
    (version,) = [p.name for p in (tree / "lib" / "modules").iterdir()]
    _run("depmod", "-b", str(tree), version)
    out = work / "out"
    out.mkdir()
    shutil.copyfile(tree / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
    _write_initramfs(work / "initramfs", _module_files(tree, version), out / "initrd.cpio")
    _write_root(work / "root", payload_mib, out / "root.img")


def _module_files(tree: Path, version: str) -> list[Path]:
    """The .ko files to insmod, dependencies first, each once."""
    ordered: list[Path] = []
    for module in ROOT_MODULES:
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


def _write_root(root: Path, payload_mib: int, output: Path) -> None:
    _busybox_tree(root)
    (root / "sbin" / "init").write_text(GUEST_INIT)
    (root / "sbin" / "init").chmod(0o755)
    if payload_mib:
        stage_files(root / "payload", payload_mib << 20)
    _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "guest-root", "-E", "root_owner=0:0",
         "-d", str(root), str(output), f"{ROOT_MIB + payload_mib * 5 // 4}M")
