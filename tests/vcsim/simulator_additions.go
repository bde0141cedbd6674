// What the appliance's vSphere flows need from govmomi 0.24's simulator and it lacks.
// build.sh compiles this file into the simulator package with `go build -overlay`, so
// it can use the package's internals the way its own methods do.

package simulator

import (
	"fmt"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// RemoveDatastore unmounts a datastore from this host, as ESXi does: refused while a VM
// registered on the host uses it; the datastore object goes away with its last host.
// Unmounting is the undo of every instant boot, so the tests need it to be real.
func (dss *HostDatastoreSystem) RemoveDatastore(ctx *Context, req *types.RemoveDatastore) soap.HasFault {
	body := new(methods.RemoveDatastoreBody)
	ds, ok := Map.Get(req.Datastore).(*Datastore)
	if !ok || FindReference(dss.Datastore, req.Datastore) == nil {
		body.Fault_ = Fault(fmt.Sprintf("%s is not mounted on %s", req.Datastore.Value, dss.Host.Name), &types.NotFound{})
		return body
	}
	for _, ref := range dss.Host.Vm {
		vm := Map.Get(ref).(*VirtualMachine)
		if FindReference(vm.Datastore, ds.Self) != nil {
			body.Fault_ = Fault(fmt.Sprintf("datastore %s is in use by VM %s", ds.Name, vm.Name),
				&types.ResourceInUse{Type: "Datastore", Name: ds.Name})
			return body
		}
	}

	Map.WithLock(dss.Host, func() {
		RemoveReference(&dss.Datastore, ds.Self)
		dss.Host.Datastore = dss.Datastore
	})
	Map.WithLock(ds, func() {
		mounts := ds.Host[:0]
		for _, mount := range ds.Host {
			if mount.Key != dss.Host.Self {
				mounts = append(mounts, mount)
			}
		}
		ds.Host = mounts
	})

	parent := hostParent(dss.Host)
	if !mountedOnAny(parent.Host, ds.Self) {
		Map.RemoveReference(parent, &parent.Datastore, ds.Self)
	}
	if !mountedOnAny(hostReferences(), ds.Self) {
		folder := Map.getEntityFolder(dss.Host, "datastore")
		folderRemoveChild(ctx, folder, ds)
		// CreateNasDatastore on a second host adds the same child again: drop every copy.
		Map.WithLock(folder, func() {
			for FindReference(folder.ChildEntity, ds.Self) != nil {
				RemoveReference(&folder.ChildEntity, ds.Self)
			}
		})
	}

	body.Res = new(types.RemoveDatastoreResponse)
	return body
}

// mountedOnAny tells whether any of the hosts still lists the datastore.
func mountedOnAny(hosts []types.ManagedObjectReference, ds types.ManagedObjectReference) bool {
	for _, ref := range hosts {
		if host, ok := Map.Get(ref).(*HostSystem); ok && FindReference(host.Datastore, ds) != nil {
			return true
		}
	}
	return false
}

func hostReferences() []types.ManagedObjectReference {
	var refs []types.ManagedObjectReference
	for _, entity := range Map.All("HostSystem") {
		refs = append(refs, entity.(mo.Reference).Reference())
	}
	return refs
}

// CreateTask makes a task that runs until SetTaskState ends it, as vCenter's
// TaskManager.CreateTask does for extensions. vcsim finishes its own tasks before
// answering, so this is how the tests get a task that is slow, or that fails.
func (m *TaskManager) CreateTask(ctx *Context, req *types.CreateTask) soap.HasFault {
	// The service calls this with the manager locked, and registering the new task
	// (PutObject, to list it in recentTask) takes that lock again.
	m.Unlock()
	task := CreateTask(req.Obj, req.TaskTypeId, nil)
	m.Lock()
	Map.Update(task, []types.PropertyChange{
		{Name: "info.state", Val: types.TaskInfoStateRunning},
		{Name: "info.cancelable", Val: req.Cancelable},
	})
	return &methods.CreateTaskBody{Res: &types.CreateTaskResponse{Returnval: task.Info}}
}

// SetTaskState ends (or restarts) a task made by CreateTask.
func (t *Task) SetTaskState(ctx *Context, req *types.SetTaskState) soap.HasFault {
	changes := []types.PropertyChange{
		{Name: "info.state", Val: req.State},
		{Name: "info.result", Val: req.Result},
	}
	if req.Fault != nil {
		changes = append(changes, types.PropertyChange{Name: "info.error", Val: *req.Fault})
	}
	Map.Update(t, changes)
	return &methods.SetTaskStateBody{Res: new(types.SetTaskStateResponse)}
}
