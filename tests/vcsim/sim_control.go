// The test-only control endpoint, for what a test needs from the other side of the VM:
// the guest's writes and reads, the switches, the /folder log, and a VM's power state.
// It answers loopback clients only and has no authentication: never expose it.
//
//	POST   /appliance-test/guest-write?vm=NAME&disk=N&offset=O   body: the bytes (Content-Length required)
//	GET    /appliance-test/live-read?vm=NAME&disk=N&offset=O&length=L
//	POST   /appliance-test/switch?name=S[&value=V]                set (expire_sessions acts at once)
//	DELETE /appliance-test/switch?name=S                          clear
//	GET    /appliance-test/switches                               JSON {name: value}
//	GET    /appliance-test/folder-log                             JSON [{method, path, query, range, cookies, status}]
//	POST   /appliance-test/power?vm=NAME&state=poweredOn|poweredOff|suspended
//
// disk=N is the VM's Nth virtual disk (0 first) in device order.

package simulator

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"

	"github.com/vmware/govmomi/vim25/types"
)

const controlPrefix = "/appliance-test/"

// lazyBody starts a 200 answer at the first byte, so an error found before any can still be a 400.
type lazyBody struct {
	w       http.ResponseWriter
	length  int64
	started bool
}

func (l *lazyBody) Write(p []byte) (int, error) {
	if !l.started {
		l.started = true
		l.w.Header().Set("Content-Type", "application/octet-stream")
		l.w.Header().Set("Content-Length", strconv.FormatInt(l.length, 10))
		l.w.WriteHeader(http.StatusOK)
	}
	return l.w.Write(p)
}

func (b *backupServer) control(w http.ResponseWriter, r *http.Request) {
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		http.Error(w, "the test control endpoint answers loopback clients only", http.StatusForbidden)
		return
	}
	query := r.URL.Query()
	numbers := func(names ...string) ([]int64, error) {
		var values []int64
		for _, name := range names {
			n, err := strconv.ParseInt(query.Get(name), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("%s: %v", name, err)
			}
			values = append(values, n)
		}
		return values, nil
	}
	fail := func(err error) { http.Error(w, err.Error(), http.StatusBadRequest) }
	route := r.Method + " " + r.URL.Path[len(controlPrefix):]

	switch route {
	case "POST guest-write", "GET live-read":
		vm, err := findVM(query.Get("vm"))
		if err != nil {
			fail(err)
			return
		}
		if route == "POST guest-write" {
			n, err := numbers("disk", "offset")
			if err == nil && r.ContentLength < 0 {
				err = fmt.Errorf("Content-Length is required")
			}
			if err == nil {
				err = disks.guestWrite(vm, int(n[0]), n[1], r.Body, r.ContentLength)
			}
			if err != nil {
				fail(err)
				return
			}
			w.WriteHeader(http.StatusNoContent)
			return
		}
		n, err := numbers("disk", "offset", "length")
		if err != nil {
			fail(err)
			return
		}
		body := &lazyBody{w: w, length: n[2]}
		if err := disks.liveRead(vm, int(n[0]), n[1], n[2], body); err != nil && !body.started {
			fail(err)
			return
		}
		if !body.started {
			_, _ = body.Write(nil)
		}
	case "POST switch":
		if name := query.Get("name"); name == "expire_sessions" {
			b.expireSessions()
		} else {
			switches.put(name, query.Get("value"))
		}
		w.WriteHeader(http.StatusNoContent)
	case "DELETE switch":
		switches.clear(query.Get("name"))
		w.WriteHeader(http.StatusNoContent)
	case "GET switches":
		writeJSON(w, switches.snapshot())
	case "GET folder-log":
		writeJSON(w, b.folder.list())
	case "POST power":
		vm, err := findVM(query.Get("vm"))
		if err != nil {
			fail(err)
			return
		}
		setPower(vm, types.VirtualMachinePowerState(query.Get("state")))
		w.WriteHeader(http.StatusNoContent)
	default:
		http.Error(w, "no such control: "+route, http.StatusNotFound)
	}
}

func writeJSON(w http.ResponseWriter, value interface{}) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(value)
}

// setPower sets a VM's power state without a task; powering on stuns, as the task does.
func setPower(vm *VirtualMachine, state types.VirtualMachinePowerState) {
	Map.WithLock(vm, func() {
		Map.Update(vm, []types.PropertyChange{
			{Name: "runtime.powerState", Val: state},
			{Name: "summary.runtime.powerState", Val: state},
		})
		if state == types.VirtualMachinePowerStatePoweredOn {
			disks.mu.Lock()
			defer disks.mu.Unlock()
			disks.stun(vm)
			publish(vm, disks.of(vm))
		}
	})
}
