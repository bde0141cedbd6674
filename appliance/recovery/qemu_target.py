"""Running a session's VM on this machine's QEMU: the data path of instant boot, provable here.

QEMU reads and writes the session's flat extents over nfs:// from the appliance's own
NFS server (found through the portmapper on port 111), exactly the path ESXi takes; its
serial console is logged in ``STORE/guests/<session>/console.log``. Migration mirrors
the running guest's disks to local files (QMP drive-mirror, then block-job-complete):
the same shape as Storage vMotion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.control import Control
from appliance.datastore.sessions import SessionInfo
from appliance.errors import UsageError
from appliance.hypervisor.accel import QEMU
from appliance.hypervisor.disk_urls import session_disk_url
from appliance.hypervisor.qemu import QemuGuest, boot_guest
from appliance.jobs import Job
from appliance.recovery.orchestrator import BootRequest, UndoStack
from appliance.recovery.records import BootRecord
from appliance.verification import Verification, check_offered, run_until_success

#: Seconds a guest gets to shut down on the ACPI power button before QEMU is told to quit.
POWER_OFF_SECONDS = 30.0


@dataclass(frozen=True)
class QemuSettings:
    nfs_host: str  # where QEMU reaches the NFS server (a loopback address when it listens on all)
    export_path: str
    guests: Path  # run directories, one per session
    accel: str = "auto"  # what a boot that names no accelerator uses (qemu.accel)
    binary: str = QEMU


class QemuTarget:
    kind = "qemu"

    def __init__(self, control: Control, settings: QemuSettings) -> None:
        self.control = control
        self.settings = settings

    def _guest(self, record: BootRecord) -> QemuGuest:
        return QemuGuest.load(Path(record.details["run_dir"]))

    def boot(self, job: Job, session: SessionInfo, request: BootRequest, undo: UndoStack) -> dict[str, Any]:
        point = self.control.resolve(session.vm, session.point)
        disks = [session_disk_url(self.settings.nfs_host, session.name, disk.name, self.settings.export_path)
                 for disk in point.disks]
        run_dir = self.settings.guests / session.name
        if not request.power_on:
            return {"run_dir": str(run_dir), "disks": disks}
        with job.step("power on", target="qemu", disks=len(disks)) as step:
            guest = boot_guest(run_dir, disks, memory_mib=request.memory_mib,
                               accel=request.accel or self.settings.accel, qemu=self.settings.binary)
            step.detail = f"pid {guest.record.pid}, {guest.record.accel}, console {guest.console_log}"
        job.note("vm.powered_on", session=session.name, vm=session.vm, target="qemu", pid=guest.record.pid)
        undo.push(f"power off QEMU guest of {session.name}", lambda: self._power_off(guest))
        return {"run_dir": str(run_dir), "disks": disks, "pid": guest.record.pid,
                "console_log": str(guest.console_log)}

    def verify(self, job: Job, record: BootRecord, check: Verification, timeout: float) -> dict[str, Any]:
        check_offered(self.kind, check)
        if check.kind == "console":
            self._guest(record).wait_for_console(check.argument, timeout)
            return {"console": check.argument}
        output = run_until_success(check.argument, {"APPLIANCE_VM": record.vm, "APPLIANCE_VM_IP": "",
                                                    "APPLIANCE_SESSION": record.session}, timeout, job.sleep)
        return {"script": output}

    def migrate(self, job: Job, record: BootRecord, destination: str) -> dict[str, Any]:
        target = Path(destination)
        if not target.is_absolute():
            raise UsageError(f"--to-path must be an absolute directory on the appliance host, not {destination}")
        copies = self._guest(record).mirror_disks(target / record.session)
        job.note("vm.migrated", session=record.session, vm=record.vm, target="qemu", to=str(target))
        return {"disks": [str(path) for path in copies]}

    def stop(self, job: Job, record: BootRecord) -> None:
        """Power the guest off; a boot with --no-power-on started none (its details hold no pid)."""
        with job.step("power off", target="qemu") as step:
            step.detail = self._power_off(self._guest(record)) if "pid" in record.details else "never powered on"
        job.note("vm.powered_off", session=record.session, vm=record.vm, target="qemu")

    @staticmethod
    def _power_off(guest: QemuGuest) -> str:
        return guest.power_off(POWER_OFF_SECONDS)

    def release(self, job: Job, record: BootRecord) -> None:
        """Nothing is shared between QEMU guests; the run directory stays for its console log."""
