// Snapshots, power-on, reconfiguration and consolidation as ESXi does them to disks:
// a snapshot freezes the disks' files and puts a delta on top; removing it merges the
// delta back; each of these stuns the VM, which is when CBT switches on.
//
// vcsim already has these methods (but for ConsolidateVMDisks_Task); the hook types
// below take them over for one call at a time (see sim_sdk.go), run vcsim's own
// method, then do to the disks what vcsim does not.

package simulator

import (
	"reflect"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// backupVM takes over VirtualMachine methods; everything else is the VM's own.
type backupVM struct{ *VirtualMachine }

// Get hands the property collector the VM itself, which it knows how to read.
func (h *backupVM) Get() mo.Reference { return h.VirtualMachine }

type backupSnapshot struct{ *VirtualMachineSnapshot }

func (h *backupSnapshot) Get() mo.Reference { return h.VirtualMachineSnapshot }

type backupFolder struct{ *Folder }

func (h *backupFolder) Get() mo.Reference { return h.Folder }

// original runs the task a vcsim method answered and gives its outcome.
func original(body soap.HasFault) (types.AnyType, types.BaseMethodFault) {
	if fault := body.Fault(); fault != nil {
		return nil, fault.Detail.Fault.(types.BaseMethodFault)
	}
	ref := reflect.ValueOf(body).Elem().FieldByName("Res").Elem().FieldByName("Returnval").Interface()
	task := Map.Get(ref.(types.ManagedObjectReference)).(*Task)
	if task.Info.Error != nil {
		return nil, task.Info.Error.Fault
	}
	return task.Info.Result, nil
}

// systemError reports a failure of the simulator itself (a disk file it could not write).
func systemError(err error) types.BaseMethodFault {
	if err == nil {
		return nil
	}
	return &types.SystemError{Reason: err.Error()}
}

// publish tells property collectors about what refresh rewrote in place.
func publish(vm *VirtualMachine, state *vmDisks) {
	vm.Runtime.ConsolidationNeeded = types.NewBool(state.needsConsolidation())
	Map.Update(vm, []types.PropertyChange{
		{Name: "config.hardware.device", Val: vm.Config.Hardware.Device},
		{Name: "layoutEx", Val: vm.LayoutEx},
		{Name: "runtime", Val: vm.Runtime},
	})
}

func (h *backupVM) CreateSnapshotTask(ctx *Context, req *types.CreateSnapshot_Task) soap.HasFault {
	vm := h.VirtualMachine
	task := CreateTask(vm, "createSnapshot", func(*Task) (types.AnyType, types.BaseMethodFault) {
		if req.Quiesce && switches.on("quiesce_fault") {
			return nil, &types.ApplicationQuiesceFault{}
		}
		disks.mu.Lock()
		defer disks.mu.Unlock()
		disks.stun(vm)
		result, fault := original(vm.CreateSnapshotTask(req))
		if fault != nil {
			return nil, fault
		}
		ref := result.(types.ManagedObjectReference)
		if err := disks.snapshotTaken(vm, Map.Get(ref).(*VirtualMachineSnapshot)); err != nil {
			return nil, systemError(err)
		}
		return ref, nil
	})
	return &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: task.Run()}}
}

// snapshotTaken gives the new snapshot a config of its own (vcsim's shares the VM's
// devices) and moves the VM's disks onto new deltas.
func (s *diskState) snapshotTaken(vm *VirtualMachine, snapshot *VirtualMachineSnapshot) error {
	snapshot.Config = types.VirtualMachineConfigInfo{} // decoding into vcsim's copy would append to its lists
	deepCopy(vm.Config, &snapshot.Config)
	state := s.of(vm)
	frozen := map[int32]*frozenDisk{}
	for key, disk := range state.disks {
		frozen[key] = &frozenDisk{top: disk.top(), changeID: disk.changeID(),
			tracking: disk.tracking, sequence: disk.sequence}
		name, local := nextDeltaName(disk)
		delta := newDiskFile(name, local, false)
		delta.creator = snapshot.Self
		if err := delta.writeDelta(disk.capacity, disk.adapter, disk.top()); err != nil {
			return err
		}
		disk.chain = append(disk.chain, delta)
		if disk.tracking != "" {
			disk.sequence++
		}
	}
	state.snapshots[snapshot.Self] = frozen
	state.refresh(vm)
	publish(vm, state)
	return nil
}

// snapshotsRemoved merges the deltas of removed snapshots, unless the switch
// consolidate_fail leaves them for a consolidation.
func (s *diskState) snapshotsRemoved(vm *VirtualMachine, gone []types.ManagedObjectReference) error {
	state := s.of(vm)
	for _, ref := range gone {
		delete(state.snapshots, ref)
	}
	var err error
	if !switches.on("consolidate_fail") {
		err = state.consolidate()
	}
	s.stun(vm)
	publish(vm, state)
	return err
}

func fileLocked(vm *VirtualMachine) types.BaseMethodFault {
	return &types.FileLocked{FileFault: types.FileFault{File: vm.Config.Files.VmPathName}}
}

func (h *backupSnapshot) RemoveSnapshotTask(ctx *Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	snapshot := h.VirtualMachineSnapshot
	vm := Map.Get(snapshot.Vm).(*VirtualMachine)
	task := CreateTask(vm, "removeSnapshot", func(*Task) (types.AnyType, types.BaseMethodFault) {
		if switches.take("remove_locked") {
			return nil, fileLocked(vm)
		}
		gone := []types.ManagedObjectReference{req.This}
		if tree := findSnapshotInTree(vm.Snapshot.RootSnapshotList, req.This); tree != nil && req.RemoveChildren {
			gone = append(gone, allSnapshotsInTree(tree.ChildSnapshotList)...)
		}
		if _, fault := original(snapshot.RemoveSnapshotTask(ctx, req)); fault != nil {
			return nil, fault
		}
		var err error
		Map.WithLock(vm, func() {
			disks.mu.Lock()
			defer disks.mu.Unlock()
			err = disks.snapshotsRemoved(vm, gone)
		})
		return nil, systemError(err)
	})
	return &methods.RemoveSnapshot_TaskBody{Res: &types.RemoveSnapshot_TaskResponse{Returnval: task.Run()}}
}

func (h *backupVM) RemoveAllSnapshotsTask(ctx *Context, req *types.RemoveAllSnapshots_Task) soap.HasFault {
	vm := h.VirtualMachine
	task := CreateTask(vm, "removeAllSnapshots", func(*Task) (types.AnyType, types.BaseMethodFault) {
		if switches.take("remove_locked") {
			return nil, fileLocked(vm)
		}
		if _, fault := original(vm.RemoveAllSnapshotsTask(ctx, req)); fault != nil {
			return nil, fault
		}
		disks.mu.Lock()
		defer disks.mu.Unlock()
		var gone []types.ManagedObjectReference
		for ref := range disks.of(vm).snapshots {
			gone = append(gone, ref)
		}
		return nil, systemError(disks.snapshotsRemoved(vm, gone))
	})
	return &methods.RemoveAllSnapshots_TaskBody{Res: &types.RemoveAllSnapshots_TaskResponse{Returnval: task.Run()}}
}

// ConsolidateVMDisksTask merges the deltas no snapshot needs any more, as after a
// removal whose merge failed; it fails while the switch consolidate_fail is set.
func (vm *VirtualMachine) ConsolidateVMDisksTask(ctx *Context, req *types.ConsolidateVMDisks_Task) soap.HasFault {
	task := CreateTask(vm, "consolidateDisks", func(*Task) (types.AnyType, types.BaseMethodFault) {
		if switches.on("consolidate_fail") {
			return nil, fileLocked(vm)
		}
		disks.mu.Lock()
		defer disks.mu.Unlock()
		state := disks.of(vm)
		err := state.consolidate()
		state.refresh(vm)
		publish(vm, state)
		return nil, systemError(err)
	})
	return &methods.ConsolidateVMDisks_TaskBody{Res: &types.ConsolidateVMDisks_TaskResponse{Returnval: task.Run()}}
}

func (h *backupVM) PowerOnVMTask(ctx *Context, req *types.PowerOnVM_Task) soap.HasFault {
	vm := h.VirtualMachine
	task := CreateTask(vm, "powerOn", func(*Task) (types.AnyType, types.BaseMethodFault) {
		if _, fault := original(vm.PowerOnVMTask(ctx, req)); fault != nil {
			return nil, fault
		}
		disks.mu.Lock()
		defer disks.mu.Unlock()
		disks.stun(vm)
		publish(vm, disks.of(vm))
		return nil, nil
	})
	return &methods.PowerOnVM_TaskBody{Res: &types.PowerOnVM_TaskResponse{Returnval: task.Run()}}
}

func (h *backupVM) ReconfigVMTask(ctx *Context, req *types.ReconfigVM_Task) soap.HasFault {
	vm := h.VirtualMachine
	task := CreateTask(vm, "reconfigVm", func(*Task) (types.AnyType, types.BaseMethodFault) {
		disks.mu.Lock()
		defer disks.mu.Unlock()
		if fault := disks.refuseResize(vm, &req.Spec); fault != nil {
			return nil, fault
		}
		if _, fault := original(vm.ReconfigVMTask(ctx, req)); fault != nil {
			return nil, fault
		}
		disks.trackingChanged(vm, &req.Spec)
		err := disks.reconcile(vm)
		publish(vm, disks.of(vm))
		return nil, systemError(err)
	})
	return &methods.ReconfigVM_TaskBody{Res: &types.ReconfigVM_TaskResponse{Returnval: task.Run()}}
}

// refuseResize refuses to grow a disk that has snapshots, as ESXi does.
func (s *diskState) refuseResize(vm *VirtualMachine, spec *types.VirtualMachineConfigSpec) types.BaseMethodFault {
	for i, change := range spec.DeviceChange {
		edit := change.GetVirtualDeviceConfigSpec()
		disk, ok := edit.Device.(*types.VirtualDisk)
		if !ok || edit.Operation != types.VirtualDeviceConfigSpecOperationEdit {
			continue
		}
		tracked, known := s.of(vm).disks[disk.Key]
		if known && len(tracked.chain) > 1 && diskCapacity(disk) != tracked.capacity {
			return &types.InvalidDeviceOperation{InvalidDeviceSpec: types.InvalidDeviceSpec{DeviceIndex: int32(i)},
				BadOp: edit.Operation}
		}
	}
	return nil
}

func (h *backupFolder) CreateVMTask(ctx *Context, req *types.CreateVM_Task) soap.HasFault {
	folder := h.Folder
	task := CreateTask(folder, "createVm", func(*Task) (types.AnyType, types.BaseMethodFault) {
		result, fault := original(folder.CreateVMTask(ctx, req))
		if fault != nil {
			return nil, fault
		}
		vm := Map.Get(result.(types.ManagedObjectReference)).(*VirtualMachine)
		var err error
		Map.WithLock(vm, func() {
			disks.mu.Lock()
			defer disks.mu.Unlock()
			err = disks.reconcile(vm)
			publish(vm, disks.of(vm))
		})
		return result, systemError(err)
	})
	return &methods.CreateVM_TaskBody{Res: &types.CreateVM_TaskResponse{Returnval: task.Run()}}
}
