"""The demo's boot part: a VM booting from its backup over NFS, the product's main job.

A small Linux guest disk (`guest_image`) is backed up; `appliance serve` exports the
store over NFSv3 (and FUSE); `instant-boot --qemu` makes a session of the restore
point and QEMU boots the guest from the session's flat extent over nfs://, from the
disk's own bootloader, as ESXi boots a VM from the datastore. The guest writes a file
into its disk (the session's overlay, read back through the FUSE view while it runs),
`migrate --to-path` moves it to local disks while it runs (drive-mirror, the local
Storage vMotion), it keeps writing there, and it is stopped with the ACPI power button.
Last, the restore point is read back through FUSE: its sha256 is the backed-up disk's.

serve and QEMU run in a private network namespace (`appliance.hypervisor.netns`): QEMU's
nfs:// driver always asks the portmapper on port 111, which serve answers itself there,
so another NFS server on the host can neither take the demo's requests nor lose its own.
That needs root; `boot_unavailable` says in one line why the part cannot run on a host.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.api.access import read_runtime
from appliance.demo.clock import StepClock
from appliance.demo.data import run_cli, sha256_file
from appliance.demo.guest_image import BOOTED_MARKER, build_guest, guest_file, missing_guest_tools
from appliance.errors import ApplianceError
from appliance.hypervisor.accel import QEMU
from appliance.hypervisor.netns import private_network
from appliance.hypervisor.qemu import QemuGuest
from appliance.store import open_store

VM = "demo-guest"
SESSION = "demo-boot"
MEMORY_MIB = 256
#: The guest writes a progress line every second until it is stopped (longer than any demo).
GUEST_SECONDS = 3600
BOOT_TIMEOUT_SECONDS = 120
SERVE_START_SECONDS = 30


def boot_unavailable() -> str | None:
    """Why the boot part cannot run on this host, in one line; None when it can."""
    if os.geteuid() != 0:
        return ("it needs root: serve and QEMU run in a private network namespace, where serve answers "
                "QEMU's portmapper requests on port 111")
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian packages qemu-system-x86, qemu-block-extra)"
    missing = missing_guest_tools()
    if missing:
        return f"the guest disk cannot be built: missing {', '.join(missing)}"
    return None


def run_boot_demo(work: Path, clock: StepClock, accel: str) -> bool:
    """Boot a backed-up guest over NFS, migrate it while it runs, stop it; True if every check held."""
    work.mkdir(parents=True, exist_ok=True)
    store, disk = work / "store", work / f"{VM}.img"
    with clock.step("build a bootable guest disk (cached after the first run)"):
        guest_image = build_guest()
        guest_image.copy_disk(disk, GUEST_SECONDS)
        original = sha256_file(disk)
        print(f"{disk}: {disk.stat().st_size >> 20} MiB, MBR + syslinux + Debian's kernel + busybox root, "
              f"sha256 {original[:16]}...")
    with clock.step("back up the guest disk"):
        run_cli("--store", str(store), "init")
        run_cli("--store", str(store), "backup", "--vm", VM, str(disk))
        with open_store(store) as opened, opened.env.begin() as txn:
            point = opened.catalog.vm_points(txn, VM)[-1].id
    with private_network():
        server = _start_serve(store, work / "mnt", work / "serve.log", clock)
        try:
            return _boot_and_migrate(store, work, point, original, accel, clock)
        finally:
            _power_off_leftover(store)
            with clock.step("stop serve"):
                server.send_signal(signal.SIGTERM)
                code = server.wait(timeout=SERVE_START_SECONDS)
                print(f"serve exited with {code}")


def _start_serve(store: Path, mountpoint: Path, log: Path, clock: StepClock) -> subprocess.Popen[bytes]:
    """`appliance serve` (NFS, portmapper, FUSE at `mountpoint`, API) as a child; returns once its API is up."""
    mountpoint.mkdir(exist_ok=True)
    with clock.step("serve the store: NFSv3 + portmapper + FUSE + API"):
        print(f"$ appliance --store {store} serve --mount {mountpoint} &    (log: {log})", flush=True)
        with open(log, "wb") as output:
            server = subprocess.Popen([sys.executable, "-m", "appliance", "--store", str(store), "serve",
                                       "--mount", str(mountpoint)], stdout=subprocess.DEVNULL, stderr=output)
        try:
            deadline = time.monotonic() + SERVE_START_SECONDS
            while (runtime := read_runtime(store)) is None or not runtime.alive():
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                    raise ApplianceError(f"demo: serve did not come up within {SERVE_START_SECONDS} s: {tail}")
                time.sleep(0.05)
        except BaseException:
            server.terminate()
            server.wait(timeout=SERVE_START_SECONDS)
            raise
        print(f"serving: API {runtime.api_url}, NFS exports / on 127.0.0.1:2049, FUSE at {mountpoint}")
    return server


def _boot_and_migrate(store: Path, work: Path, point: str, original: str, accel: str, clock: StepClock) -> bool:
    mountpoint = work / "mnt"
    with clock.step("instant boot: session + QEMU booting the disk over nfs://"):
        run_cli("--store", str(store), "instant-boot", "--vm", VM, "--point", point, "--qemu", "--accel", accel,
                "--session", SESSION, "--memory", str(MEMORY_MIB), "--verify", f"console:{BOOTED_MARKER}",
                "--timeout", str(BOOT_TIMEOUT_SECONDS))
        guest = QemuGuest.load(store / "guests" / SESSION)
        print(f"QEMU pid {guest.record.pid} under {guest.record.accel}, disk {guest.record.disks[0]}")
        console = guest.console_text()
        print("guest console: " + " | ".join(line.strip() for line in console.splitlines()
                                             if "SYSLINUX" in line or BOOTED_MARKER in line))
    with clock.step("read the file the guest wrote, through the FUSE view of its session"):
        session_disk = mountpoint / "sessions" / SESSION / f"{VM}-flat.vmdk"
        started = guest_file(session_disk, "/guest/started")
        print(f"{session_disk.relative_to(mountpoint)}: /guest/started = {started!r}")
        if started is None or not started.startswith("booted "):
            return False
    production = work / "production"
    with clock.step("migrate the running guest to local disks (drive-mirror)"):
        run_cli("--store", str(store), "migrate", SESSION, "--to-path", str(production))
        local = QemuGuest.load(guest.run_dir).record.disks[0]
        print(f"the guest now runs on {local}; the session is gone")
    with clock.step("let it write on the local disk, then stop it (ACPI power button)"):
        lines = guest.console_text().count("APPLIANCE-GUEST: progress")
        guest.wait_for_console(f"APPLIANCE-GUEST: progress {lines + 2}", BOOT_TIMEOUT_SECONDS)
        print(f"power off: {guest.power_off(timeout=30)}")
        progress = guest_file(Path(local), "/guest/progress") or ""
        written = len(progress.split())
        print(f"{local}: /guest/progress has {written} lines ({lines} by the end of the migration)")
        if written < lines + 2:
            return False
    with clock.step("check the restore point is unchanged"):
        served = mountpoint / "restore-points" / VM / point / f"{VM}-flat.vmdk"
        actual = sha256_file(served)
        verdict = "unchanged" if actual == original else "CHANGED"
        print(f"{served.relative_to(mountpoint)}: sha256 {actual[:16]}... backed up {original[:16]}... -> {verdict}")
        return actual == original


def _power_off_leftover(store: Path) -> None:
    """A guest a failed step left running is stopped, so the demo leaves no QEMU behind."""
    run_dir = store / "guests" / SESSION
    if (run_dir / "guest.json").exists():
        guest = QemuGuest.load(run_dir)
        if guest.is_running():
            guest.power_off(timeout=1)
