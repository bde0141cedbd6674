// /folder as ESXi serves it, around vcsim's ServeDatastore (whose file server already
// honours Range): the live disk of a running VM is locked, sessions matter when the
// switch require_cookie says so, and the switches ignore_range, short_body and
// periodic_503 make it fail the ways a backup must survive. Every request is logged
// so tests can check what a client asked for.

package simulator

import (
	"net/http"
	"strconv"
	"sync"
)

// folderRequest is one /folder request as the log keeps it.
type folderRequest struct {
	Method  string   `json:"method"`
	Path    string   `json:"path"`
	Query   string   `json:"query"`
	Range   string   `json:"range"`
	Cookies []string `json:"cookies"`
	Status  int      `json:"status"`
}

type folderLog struct {
	mu       sync.Mutex
	requests []folderRequest
}

func (l *folderLog) add(request folderRequest) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.requests = append(l.requests, request)
	return len(l.requests)
}

func (l *folderLog) list() []folderRequest {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]folderRequest{}, l.requests...)
}

// statusWriter remembers the status answered, for the log.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
	w.ResponseWriter.WriteHeader(status)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// shortWriter sends half the body it announced, then drops the connection.
type shortWriter struct {
	*statusWriter
	left int64
}

func (w *shortWriter) WriteHeader(status int) {
	length, _ := strconv.ParseInt(w.Header().Get("Content-Length"), 10, 64)
	w.left = length / 2
	w.statusWriter.WriteHeader(status)
}

func (w *shortWriter) Write(p []byte) (int, error) {
	if int64(len(p)) < w.left {
		w.left -= int64(len(p))
		return w.statusWriter.Write(p)
	}
	_, _ = w.statusWriter.Write(p[:w.left])
	w.Flush()
	panic(http.ErrAbortHandler) // the server closes the connection without finishing the body
}

func (b *backupServer) serveFolder(w http.ResponseWriter, r *http.Request) {
	var cookies []string
	for _, cookie := range r.Cookies() {
		cookies = append(cookies, cookie.Name)
	}
	request := folderRequest{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery,
		Range: r.Header.Get("Range"), Cookies: cookies}
	sw := &statusWriter{ResponseWriter: w}
	count := 0
	defer func() {
		request.Status = sw.status
		b.folder.mu.Lock()
		b.folder.requests[count-1] = request
		b.folder.mu.Unlock()
	}()
	count = b.folder.add(request)

	// A request to a host names its only datacenter, ha-datacenter: here every host shares the
	// simulator's one datacenter, so the datastore is looked up by its name alone.
	if query := r.URL.Query(); query.Get("dcPath") == "ha-datacenter" {
		query.Del("dcPath")
		r.URL.RawQuery = query.Encode()
	}
	if every := switches.number("periodic_503", 0); every > 0 && int64(count)%every == 0 {
		http.Error(sw, "service unavailable (switch periodic_503)", http.StatusServiceUnavailable)
		return
	}
	if switches.on("require_cookie") && !b.admit(sw, r) {
		http.Error(sw, "not authenticated", http.StatusUnauthorized)
		return
	}
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		file := r.URL.Path[len(folderPrefix):]
		if local, err := localPath("[" + r.URL.Query().Get("dsName") + "] " + file); err == nil && disks.liveFile(local) {
			http.Error(sw, "the file is locked by a running VM", http.StatusInternalServerError)
			return
		}
		if switches.on("ignore_range") {
			r.Header.Del("Range")
		}
		if r.Method == http.MethodGet && switches.take("short_body") {
			b.service.ServeDatastore(&shortWriter{statusWriter: sw}, r)
			return
		}
	}
	b.service.ServeDatastore(sw, r)
}
