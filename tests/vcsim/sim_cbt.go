// Changed block tracking as ESXi answers it: QueryChangedDiskAreas on a snapshot, and
// the guest writes it is computed from (which the tests make through the control endpoint).

package simulator

import (
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// defaultQueryPage is how much disk one QueryChangedDiskAreas answer covers unless the
// switch qcda_page says otherwise; callers page with startOffset, as with ESXi.
const defaultQueryPage = 64 << 20

func (vm *VirtualMachine) QueryChangedDiskAreas(ctx *Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := new(methods.QueryChangedDiskAreasBody)
	info, message, fault := disks.changedAreas(vm, req)
	if fault != nil {
		body.Fault_ = Fault(message, fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

func (s *diskState) changedAreas(vm *VirtualMachine, req *types.QueryChangedDiskAreas) (
	*types.DiskChangeInfo, string, types.BaseMethodFault) {
	if switches.take("qcda_fault") {
		return nil, "simulated failure (switch qcda_fault)", &types.FileFault{File: vm.Config.Files.VmPathName}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	state := s.of(vm)
	if req.Snapshot == nil || state.snapshots[*req.Snapshot] == nil {
		return nil, "the snapshot is not one of this VM's", &types.InvalidArgument{InvalidProperty: "snapshot"}
	}
	saw, ok := state.snapshots[*req.Snapshot][req.DeviceKey]
	disk := state.disks[req.DeviceKey]
	if !ok || disk == nil {
		return nil, fmt.Sprintf("device %d is not a disk of the snapshot", req.DeviceKey),
			&types.InvalidArgument{InvalidProperty: "deviceKey"}
	}
	file := &types.FileFault{File: saw.top.name}
	if saw.tracking == "" {
		return nil, "change tracking is not active for the disk", file
	}
	if req.StartOffset < 0 || req.StartOffset >= disk.capacity {
		return nil, "startOffset is beyond the disk", &types.InvalidArgument{InvalidProperty: "startOffset"}
	}
	var areas []segment
	if req.ChangeId == "*" {
		for _, f := range disk.chainTo(saw.top) {
			areas = append(areas, f.segments...)
		}
	} else {
		slash := strings.LastIndex(req.ChangeId, "/")
		since, err := strconv.ParseInt(req.ChangeId[slash+1:], 10, 64)
		valid := slash >= 0 && err == nil && since <= saw.sequence
		if !valid || req.ChangeId[:slash] != saw.tracking || saw.tracking != disk.tracking {
			return nil, "changeId is not valid", file
		}
		for _, c := range disk.changes {
			if c.sequence > since && c.sequence <= saw.sequence {
				areas = append(areas, segment{off: c.off, length: c.length})
			}
		}
	}
	length := min64(switches.number("qcda_page", defaultQueryPage), disk.capacity-req.StartOffset)
	return &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: length,
		ChangedArea: union(areas, req.StartOffset, req.StartOffset+length)}, "", nil
}

// union merges areas into sorted, disjoint extents clipped to [from, to).
func union(areas []segment, from, to int64) []types.DiskChangeExtent {
	sort.Slice(areas, func(i, j int) bool { return areas[i].off < areas[j].off })
	var merged []types.DiskChangeExtent
	for _, a := range areas {
		start, end := a.off, a.off+a.length
		if start < from {
			start = from
		}
		if end > to {
			end = to
		}
		if start >= end {
			continue
		}
		if n := len(merged); n > 0 && start <= merged[n-1].Start+merged[n-1].Length {
			if end > merged[n-1].Start+merged[n-1].Length {
				merged[n-1].Length = end - merged[n-1].Start
			}
			continue
		}
		merged = append(merged, types.DiskChangeExtent{Start: start, Length: end - start})
	}
	return merged
}

// findVM is a VM by name.
func findVM(name string) (*VirtualMachine, error) {
	for _, entity := range Map.All("VirtualMachine") {
		if vm := entity.(*VirtualMachine); vm.Name == name {
			return vm, nil
		}
	}
	return nil, fmt.Errorf("no VM %q", name)
}

// liveDisk is the VM's disk number `index` (in device order).
func (s *diskState) liveDisk(vm *VirtualMachine, index int) (*trackedDisk, error) {
	devices := vmDiskDevices(vm)
	if index < 0 || index >= len(devices) {
		return nil, fmt.Errorf("VM %s has no disk %d", vm.Name, index)
	}
	disk, ok := s.of(vm).disks[devices[index].Key]
	if !ok {
		return nil, fmt.Errorf("disk %d of VM %s has no backing file", index, vm.Name)
	}
	return disk, nil
}

// onDisk runs `f` on the VM's disk number `index`, locked, once [off, off+length) is known to be on it.
func (s *diskState) onDisk(vm *VirtualMachine, index int, off, length int64, f func(*trackedDisk) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	disk, err := s.liveDisk(vm, index)
	if err != nil {
		return err
	}
	if off < 0 || length < 0 || off+length > disk.capacity {
		return fmt.Errorf("%d bytes at %d are beyond the disk's %d bytes", length, off, disk.capacity)
	}
	return f(disk)
}

// guestWrite is a write by the guest: it lands on the top of the chain, and CBT logs it.
func (s *diskState) guestWrite(vm *VirtualMachine, index int, off int64, data io.Reader, length int64) error {
	return s.onDisk(vm, index, off, length, func(disk *trackedDisk) error {
		if err := disk.top().write(off, data, length); err != nil {
			return err
		}
		if disk.tracking != "" {
			disk.changes = append(disk.changes, change{sequence: disk.sequence, off: off, length: length})
		}
		return nil
	})
}

// liveRead streams what the guest would read.
func (s *diskState) liveRead(vm *VirtualMachine, index int, off, length int64, out io.Writer) error {
	return s.onDisk(vm, index, off, length, func(disk *trackedDisk) error {
		return readChain(disk.chain, off, length, out)
	})
}

// liveFile tells whether a local path is the descriptor or extent of the top of a
// powered-on VM's disk: ESXi holds a lock on those.
func (s *diskState) liveFile(local string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ref, state := range s.vms {
		vm, ok := Map.Get(ref).(*VirtualMachine)
		if !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
			continue
		}
		for _, disk := range state.disks {
			if top := disk.top(); top.descriptor == local || top.extent == local {
				return true
			}
		}
	}
	return false
}
