"""Running guests from the appliance's datastore with a real hypervisor (QEMU).

The local stand-in for what vSphere does with an instant boot: a guest whose disks
are a session's flat extents read over the appliance's own NFS export, driven over
QMP, moved to local disks while it runs (drive-mirror, the analogue of Storage
vMotion), and found again by later commands through its run directory.

- `qmp`: the QMP protocol client.
- `accel`: KVM when it really runs guests, else software emulation.
- `disk_urls`: the nfs:// URL of a session's disk.
- `qemu`: booting, console, mirroring and stopping a guest; its boot record.
"""

from appliance.hypervisor.disk_urls import session_disk_url as session_disk_url
from appliance.hypervisor.qemu import BootRecord as BootRecord
from appliance.hypervisor.qemu import QemuGuest as QemuGuest
from appliance.hypervisor.qemu import boot_guest as boot_guest
from appliance.hypervisor.qmp import QmpClient as QmpClient
from appliance.hypervisor.qmp import connect_qmp as connect_qmp

__all__ = ["BootRecord", "QemuGuest", "QmpClient", "boot_guest", "connect_qmp", "session_disk_url"]
