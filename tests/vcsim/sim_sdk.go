// The HTTP front of the backup additions: it sits before vcsim's own handlers (see
// ServeBackup) and takes over the SOAP methods vcsim gets wrong for backups, /folder
// as ESXi serves it, and the test-only control endpoint.
//
// Go cannot override vcsim's methods, but vcsim's dispatcher looks a call's object up
// in the caller's session registry before the global one. So for the few methods we
// take over, a hook object that embeds the real one (and so answers every other
// method the same) is put in the session's registry for the length of that one call.

package simulator

import (
	"bytes"
	"io"
	"log"
	"net/http"
	"strings"
	"sync"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator/internal"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// backupServer is the handler in front of vcsim's.
type backupServer struct {
	service *Service
	next    http.Handler
	folder  folderLog
	auth    folderAuth
}

// ServeBackup puts the backup additions in front of the server's handlers and gives the
// disks of the VMs that exist already (the default inventory's) their files.
func ServeBackup(service *Service, server *Server) error {
	for _, entity := range Map.All("VirtualMachine") {
		vm := entity.(*VirtualMachine)
		var err error
		Map.WithLock(vm, func() {
			disks.mu.Lock()
			defer disks.mu.Unlock()
			err = disks.reconcile(vm)
		})
		if err != nil {
			return err
		}
	}
	server.Config.Handler = &backupServer{service: service, next: server.Config.Handler,
		auth: folderAuth{tickets: map[string]bool{}, sessions: map[string]bool{}}}
	return nil
}

func (b *backupServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case strings.HasPrefix(r.URL.Path, controlPrefix):
		b.control(w, r)
	case strings.HasPrefix(r.URL.Path, folderPrefix):
		b.serveFolder(w, r)
	case r.URL.Path == Map.Path || r.URL.Path == Map.Path+"/vimService":
		b.serveSDK(w, r)
	default:
		b.next.ServeHTTP(w, r)
	}
}

func (b *backupServer) serveSDK(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	if method, err := UnmarshalBody(Map.typeFunc, body); err == nil {
		if cookie, err := r.Cookie(soap.SessionCookieName); err == nil {
			if session, ok := b.service.sm.getSession(cookie.Value); ok {
				if at, hook := b.hookFor(&session, method); hook != nil {
					defer install(session.Registry, at, hook)()
				}
			}
		}
	}
	b.next.ServeHTTP(w, r)
}

// install puts a hook in a session's registry, and gives back what puts back what was there.
func install(registry *Registry, at types.ManagedObjectReference, hook mo.Reference) func() {
	registry.m.Lock()
	defer registry.m.Unlock()
	previous, had := registry.objects[at]
	registry.objects[at] = hook
	return func() {
		registry.m.Lock()
		defer registry.m.Unlock()
		if had {
			registry.objects[at] = previous
		} else {
			delete(registry.objects, at)
		}
	}
}

// hookFor is the object that takes over a method, and where, or nil for vcsim's own.
func (b *backupServer) hookFor(session *Session, method *Method) (types.ManagedObjectReference, mo.Reference) {
	this, name := method.This, method.Name
	if name == "Fetch" { // vcsim sends every Fetch to the session's property collector
		this = Map.content().PropertyCollector
		return this, &backupCollector{session.Get(this).(*PropertyCollector)}
	}
	switch obj := Map.Get(this).(type) {
	case *VirtualMachine:
		switch name {
		case "CreateSnapshot_Task", "RemoveAllSnapshots_Task", "ReconfigVM_Task", "PowerOnVM_Task":
			return this, &backupVM{obj}
		}
	case *VirtualMachineSnapshot:
		if name == "RemoveSnapshot_Task" {
			return this, &backupSnapshot{obj}
		}
	case *Folder:
		if name == "CreateVM_Task" {
			return this, &backupFolder{obj}
		}
	case *SessionManager:
		if name == "AcquireGenericServiceTicket" {
			return this, &backupSessionManager{obj, &b.auth}
		}
	}
	return this, nil
}

// backupCollector answers a Fetch of an unset property (vm.snapshot without snapshots)
// with nothing, as vSphere does; vcsim's Fetch indexes an empty list then.
type backupCollector struct{ *PropertyCollector }

func (h *backupCollector) Get() mo.Reference { return h.PropertyCollector }

func (h *backupCollector) Fetch(ctx *Context, req *internal.Fetch) (body soap.HasFault) {
	defer func() {
		if recover() != nil {
			body = &internal.FetchBody{Res: &internal.FetchResponse{}}
		}
	}()
	return h.PropertyCollector.Fetch(ctx, req)
}

// folderAuth is who may use /folder while the switch require_cookie is set: a SOAP
// session's cookie, or a service ticket (used once, it gives a cookie of its own).
type folderAuth struct {
	mu       sync.Mutex
	tickets  map[string]bool
	sessions map[string]bool
}

type backupSessionManager struct {
	*SessionManager
	auth *folderAuth
}

func (h *backupSessionManager) Get() mo.Reference { return h.SessionManager }

// AcquireGenericServiceTicket hands out a ticket that /folder accepts once, as ESXi does.
func (h *backupSessionManager) AcquireGenericServiceTicket(ctx *Context,
	req *types.AcquireGenericServiceTicket) soap.HasFault {
	body := h.SessionManager.AcquireGenericServiceTicket(req).(*methods.AcquireGenericServiceTicketBody)
	h.auth.mu.Lock()
	defer h.auth.mu.Unlock()
	h.auth.tickets[body.Res.Returnval.Id] = true
	return body
}

// admit tells whether a /folder request is authenticated, and answers a ticket with a cookie.
func (b *backupServer) admit(w http.ResponseWriter, r *http.Request) bool {
	if cookie, err := r.Cookie(soap.SessionCookieName); err == nil {
		if _, ok := b.service.sm.getSession(cookie.Value); ok {
			return true
		}
		b.auth.mu.Lock()
		ok := b.auth.sessions[cookie.Value]
		b.auth.mu.Unlock()
		if ok {
			return true
		}
	}
	cookie, err := r.Cookie("vmware_cgi_ticket")
	if err != nil {
		return false
	}
	b.auth.mu.Lock()
	defer b.auth.mu.Unlock()
	if !b.auth.tickets[cookie.Value] {
		return false
	}
	delete(b.auth.tickets, cookie.Value)
	key := uuid.New().String()
	b.auth.sessions[key] = true
	http.SetCookie(w, &http.Cookie{Name: soap.SessionCookieName, Value: key, Path: "/", HttpOnly: true, Secure: true})
	return true
}

// expireSessions ends every session now, as ESXi's idle timeout does.
func (b *backupServer) expireSessions() {
	sessionMutex.Lock()
	for key := range b.service.sm.sessions {
		delete(b.service.sm.sessions, key)
	}
	sessionMutex.Unlock()
	b.auth.mu.Lock()
	b.auth.tickets, b.auth.sessions = map[string]bool{}, map[string]bool{}
	b.auth.mu.Unlock()
	log.Print("expire_sessions: every session ended")
}
