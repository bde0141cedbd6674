// What the simulator knows of each VM's disks beyond vcsim's own model: the chain of
// files, changed block tracking as ESXi keeps it, and what every snapshot froze. The
// VM's device list and the snapshots' configs are rebuilt from this state after every
// change, so the two never disagree.

package simulator

import (
	"fmt"
	"os"
	"path"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"
)

// change is one guest write, logged while CBT is active.
type change struct {
	sequence, off, length int64
}

// trackedDisk is one VirtualDisk of a VM.
type trackedDisk struct {
	key      int32
	capacity int64
	adapter  string
	uuid     string      // ddb.uuid of the base
	chain    []*diskFile // base first; the guest writes to the last
	tracking string      // the CBT uuid; empty while CBT is not active for the disk
	sequence int64       // advances at each snapshot
	changes  []change
}

func (d *trackedDisk) top() *diskFile { return d.chain[len(d.chain)-1] }

// changeID is the disk's changeId as ESXi shows it, or "" without CBT.
func (d *trackedDisk) changeID() string {
	if d.tracking == "" {
		return ""
	}
	return fmt.Sprintf("%s/%d", d.tracking, d.sequence)
}

// resetTracking starts CBT over: a new uuid, so no earlier changeId is valid any more.
func (d *trackedDisk) resetTracking(active bool) {
	d.tracking, d.sequence, d.changes = "", 0, nil
	if active {
		d.tracking = vmwareUUID(0x52)
	}
}

// frozenDisk is a disk as a snapshot saw it.
type frozenDisk struct {
	top      *diskFile
	changeID string
	tracking string
	sequence int64
}

// vmDisks is the state of one VM.
type vmDisks struct {
	disks     map[int32]*trackedDisk
	snapshots map[types.ManagedObjectReference]map[int32]*frozenDisk
}

// chainTo is the part of the disk's chain a snapshot sees: base up to its frozen top.
func (d *trackedDisk) chainTo(top *diskFile) []*diskFile {
	for i, f := range d.chain {
		if f == top {
			return d.chain[:i+1]
		}
	}
	return nil
}

// diskState holds every VM's vmDisks. Lock order: a VM's lock, then mu.
type diskState struct {
	mu  sync.Mutex
	vms map[types.ManagedObjectReference]*vmDisks
}

var disks = &diskState{vms: map[types.ManagedObjectReference]*vmDisks{}}

func (s *diskState) of(vm *VirtualMachine) *vmDisks {
	state, ok := s.vms[vm.Self]
	if !ok {
		state = &vmDisks{disks: map[int32]*trackedDisk{},
			snapshots: map[types.ManagedObjectReference]map[int32]*frozenDisk{}}
		s.vms[vm.Self] = state
	}
	return state
}

// localPath is where a "[ds] dir/file" datastore path lives on our filesystem.
func localPath(name string) (string, error) {
	p, fault := parseDatastorePath(name)
	if fault != nil {
		return "", fmt.Errorf("not a datastore path: %q", name)
	}
	for _, entity := range Map.All("Datastore") {
		if ds := entity.(*Datastore); ds.Name == p.Datastore {
			return path.Join(ds.Info.GetDatastoreInfo().Url, p.Path), nil
		}
	}
	return "", fmt.Errorf("no datastore %q", p.Datastore)
}

func vmDiskDevices(vm *VirtualMachine) []*types.VirtualDisk {
	var found []*types.VirtualDisk
	for _, device := range object.VirtualDeviceList(vm.Config.Hardware.Device).SelectByType((*types.VirtualDisk)(nil)) {
		found = append(found, device.(*types.VirtualDisk))
	}
	return found
}

func adapterType(vm *VirtualMachine, disk *types.VirtualDisk) string {
	switch object.VirtualDeviceList(vm.Config.Hardware.Device).FindByKey(disk.ControllerKey).(type) {
	case *types.ParaVirtualSCSIController:
		return "pvscsi"
	case *types.VirtualBusLogicController:
		return "buslogic"
	case *types.VirtualIDEController:
		return "ide"
	default:
		return "lsilogic"
	}
}

// diskCapacity reads a disk's size from whichever of the two fields a client changed
// (clients set one or both) and makes the two agree.
func diskCapacity(disk *types.VirtualDisk) int64 {
	capacity := disk.CapacityInKB * 1024
	if disk.CapacityInBytes > capacity {
		capacity = disk.CapacityInBytes
	}
	disk.CapacityInBytes, disk.CapacityInKB = capacity, capacity/1024
	return capacity
}

// reconcile brings the state in line with the VM's device list after vcsim changed it:
// new disks get real files, grown disks grow (and restart CBT), removed disks are forgotten.
func (s *diskState) reconcile(vm *VirtualMachine) error {
	state := s.of(vm)
	present := map[int32]bool{}
	for _, disk := range vmDiskDevices(vm) {
		present[disk.Key] = true
		backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		capacity := diskCapacity(disk)
		tracked, known := state.disks[disk.Key]
		if !known {
			local, err := localPath(backing.FileName)
			if err != nil {
				return err
			}
			tracked = &trackedDisk{key: disk.Key, adapter: adapterType(vm, disk), uuid: vmwareUUID(0x60, 0x00, 0xc2),
				chain: []*diskFile{newDiskFile(backing.FileName, local, true)}}
			state.disks[disk.Key] = tracked
		}
		if !known || capacity > tracked.capacity {
			if known && tracked.tracking != "" {
				tracked.resetTracking(true)
			}
			tracked.capacity = capacity
			if err := tracked.chain[0].writeBase(capacity, tracked.adapter, tracked.uuid); err != nil {
				return err
			}
		}
	}
	for key := range state.disks {
		if !present[key] {
			delete(state.disks, key)
		}
	}
	state.refresh(vm)
	return nil
}

// stun is what a VM's stun does to CBT on ESXi: a change of changeTrackingEnabled made
// since the last stun takes effect now.
func (s *diskState) stun(vm *VirtualMachine) {
	enabled := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	for _, disk := range s.of(vm).disks {
		if enabled && disk.tracking == "" {
			disk.resetTracking(true)
		}
	}
	s.of(vm).refresh(vm)
}

// trackingChanged applies a reconfiguration of changeTrackingEnabled: disabling clears
// the tracking at once, enabling waits for the next stun.
func (s *diskState) trackingChanged(vm *VirtualMachine, spec *types.VirtualMachineConfigSpec) {
	if spec.ChangeTrackingEnabled != nil && !*spec.ChangeTrackingEnabled {
		for _, disk := range s.of(vm).disks {
			disk.resetTracking(false)
		}
	}
}

// backingFor builds the backing of `chain`'s top with its parents, after the VM's own.
func backingFor(template *types.VirtualDiskFlatVer2BackingInfo, chain []*diskFile,
	changeID string) *types.VirtualDiskFlatVer2BackingInfo {
	var backing *types.VirtualDiskFlatVer2BackingInfo
	for _, file := range chain {
		link := *template
		link.FileName, link.Parent, link.ChangeId = file.name, backing, ""
		backing = &link
	}
	backing.ChangeId = changeID
	return backing
}

// refresh rewrites the VM's disk backings and the snapshots' from the state, and the layout.
func (state *vmDisks) refresh(vm *VirtualMachine) {
	for _, device := range vmDiskDevices(vm) {
		disk, ok := state.disks[device.Key]
		template, flat := device.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || !flat {
			continue
		}
		device.Backing = backingFor(template, disk.chain, disk.changeID())
	}
	for ref, frozen := range state.snapshots {
		snapshot, ok := Map.Get(ref).(*VirtualMachineSnapshot)
		if !ok {
			continue
		}
		devices := object.VirtualDeviceList(snapshot.Config.Hardware.Device)
		for _, device := range devices.SelectByType((*types.VirtualDisk)(nil)) {
			device := device.(*types.VirtualDisk)
			saw, ok := frozen[device.Key]
			template, flat := device.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok || !flat || state.disks[device.Key] == nil {
				continue // a disk removed from the VM since: its files went with it
			}
			device.Backing = backingFor(template, state.disks[device.Key].chainTo(saw.top), saw.changeID)
		}
	}
	state.layout(vm)
}

// layout lists the disk files in layoutEx (chains base first, per disk and per snapshot).
func (state *vmDisks) layout(vm *VirtualMachine) {
	files := vm.LayoutEx.File[:0]
	for _, file := range vm.LayoutEx.File {
		if file.Type != string(types.VirtualMachineFileLayoutExFileTypeDiskDescriptor) &&
			file.Type != string(types.VirtualMachineFileLayoutExFileTypeDiskExtent) {
			files = append(files, file)
		}
	}
	vm.LayoutEx.File = files
	units := map[*diskFile]types.VirtualMachineFileLayoutExDiskUnit{}
	chainLayout := func(disk *trackedDisk, chain []*diskFile) types.VirtualMachineFileLayoutExDiskLayout {
		layout := types.VirtualMachineFileLayoutExDiskLayout{Key: disk.key}
		for _, file := range chain {
			unit, ok := units[file]
			if !ok {
				for _, local := range []string{file.descriptor, file.extent} {
					var size int64
					if info, err := os.Stat(local); err == nil {
						size = info.Size()
					}
					p, _ := parseDatastorePath(file.name)
					p.Path = path.Join(path.Dir(p.Path), path.Base(local))
					unit.FileKey = append(unit.FileKey, vm.addFileLayoutEx(*p, size))
				}
				units[file] = unit
			}
			layout.Chain = append(layout.Chain, unit)
		}
		return layout
	}
	var live []types.VirtualMachineFileLayoutExDiskLayout
	var old []types.VirtualMachineFileLayoutDiskLayout
	for _, device := range vmDiskDevices(vm) {
		if disk, ok := state.disks[device.Key]; ok {
			live = append(live, chainLayout(disk, disk.chain))
			names := []string{}
			for _, file := range disk.chain {
				names = append(names, file.name)
			}
			old = append(old, types.VirtualMachineFileLayoutDiskLayout{Key: disk.key, DiskFile: names})
		}
	}
	vm.LayoutEx.Disk, vm.Layout.Disk = live, old
	for i := range vm.LayoutEx.Snapshot {
		snapshot := &vm.LayoutEx.Snapshot[i]
		snapshot.Disk = nil
		for key, saw := range state.snapshots[snapshot.Key] {
			if disk, ok := state.disks[key]; ok {
				snapshot.Disk = append(snapshot.Disk, chainLayout(disk, disk.chainTo(saw.top)))
			}
		}
	}
	vm.updateStorage()
}

// nextDeltaName is the first free "<base>-00000N.vmdk" next to the disk's base descriptor.
func nextDeltaName(disk *trackedDisk) (string, string) {
	base := disk.chain[0]
	for n := 1; ; n++ {
		suffix := fmt.Sprintf("-%06d.vmdk", n)
		local := strings.TrimSuffix(base.descriptor, ".vmdk") + suffix
		if _, err := os.Stat(local); os.IsNotExist(err) {
			return strings.TrimSuffix(base.name, ".vmdk") + suffix, local
		}
	}
}

// consolidate merges every delta whose snapshot is gone into its parent, oldest first.
func (state *vmDisks) consolidate() error {
	for _, disk := range state.disks {
		for i := 1; i < len(disk.chain); {
			file := disk.chain[i]
			if _, kept := state.snapshots[file.creator]; kept {
				i++
				continue
			}
			parent := disk.chain[i-1]
			if err := file.mergeInto(parent); err != nil {
				return err
			}
			for _, frozen := range state.snapshots {
				if saw, ok := frozen[disk.key]; ok && saw.top == file {
					saw.top = parent
				}
			}
			disk.chain = append(disk.chain[:i:i], disk.chain[i+1:]...)
			file.remove()
		}
	}
	return nil
}

// needsConsolidation tells whether a delta outlived its snapshot.
func (state *vmDisks) needsConsolidation() bool {
	for _, disk := range state.disks {
		for _, file := range disk.chain[1:] {
			if _, kept := state.snapshots[file.creator]; !kept {
				return true
			}
		}
	}
	return false
}
