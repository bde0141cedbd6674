"""The appliance in vSphere (pyvmomi): its NFS datastore on ESXi hosts and the VMs booted from it.

Plain synchronous functions, one step each, every one with an explicit timeout and a
documented undo, raising only `appliance.errors` classes; the instant-boot
orchestration composes them in a worker thread. Modules: `settings` (a configured
connection plus where ESXi mounts the export), `client` (session, lookups, tasks), `datastores` (mount/unmount), `machines`
(register, identity, NICs, power, Storage vMotion), `verify` (tools/ip/script) and
`inventory` (discovery).
"""

from appliance.vsphere.client import Connection as Connection
from appliance.vsphere.client import connect as connect
from appliance.vsphere.client import disconnect as disconnect
from appliance.vsphere.client import find_datastore as find_datastore
from appliance.vsphere.client import find_host as find_host
from appliance.vsphere.client import find_network as find_network
from appliance.vsphere.client import find_vm as find_vm
from appliance.vsphere.client import open_connection as open_connection
from appliance.vsphere.client import vm_with_uuid as vm_with_uuid
from appliance.vsphere.datastores import datastore_users as datastore_users
from appliance.vsphere.datastores import mount_datastore as mount_datastore
from appliance.vsphere.datastores import unmount_datastore as unmount_datastore
from appliance.vsphere.inventory import VmInfo as VmInfo
from appliance.vsphere.inventory import inventory as inventory
from appliance.vsphere.machines import give_fresh_identity as give_fresh_identity
from appliance.vsphere.machines import move_nics as move_nics
from appliance.vsphere.machines import nic_networks as nic_networks
from appliance.vsphere.machines import power_off as power_off
from appliance.vsphere.machines import power_on as power_on
from appliance.vsphere.machines import register_vm as register_vm
from appliance.vsphere.machines import relocate_vm as relocate_vm
from appliance.vsphere.machines import set_nic_networks as set_nic_networks
from appliance.vsphere.machines import unregister_vm as unregister_vm
from appliance.vsphere.machines import vmx_path as vmx_path
from appliance.vsphere.settings import VsphereSettings as VsphereSettings
from appliance.vsphere.settings import from_mapping as from_mapping
from appliance.vsphere.verify import verify_vm as verify_vm
