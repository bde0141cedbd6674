// Switches make the simulator misbehave the ways real vSphere does now and then, so
// the tests can check that the appliance copes. They are set through the test-only
// control endpoint (sim_control.go).

package simulator

import (
	"strconv"
	"sync"
)

// switchBoard holds the switches that are set, each with its value ("" when it has none).
type switchBoard struct {
	mu  sync.Mutex
	set map[string]string
}

var switches = &switchBoard{set: map[string]string{}}

func (b *switchBoard) put(name, value string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.set[name] = value
}

func (b *switchBoard) clear(name string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.set, name)
}

func (b *switchBoard) snapshot() map[string]string {
	b.mu.Lock()
	defer b.mu.Unlock()
	copied := map[string]string{}
	for name, value := range b.set {
		copied[name] = value
	}
	return copied
}

// on tells whether a switch is set.
func (b *switchBoard) on(name string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	_, ok := b.set[name]
	return ok
}

// take fires a switch once: set without a value it fires every time; with a count N it
// fires N times, then clears itself.
func (b *switchBoard) take(name string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	value, ok := b.set[name]
	if !ok {
		return false
	}
	if value == "" {
		return true
	}
	n, err := strconv.Atoi(value)
	if err != nil || n <= 1 {
		delete(b.set, name)
		return err == nil && n == 1
	}
	b.set[name] = strconv.Itoa(n - 1)
	return true
}

// number is a switch's value as a number, or `otherwise` when it is not set.
func (b *switchBoard) number(name string, otherwise int64) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	n, err := strconv.ParseInt(b.set[name], 10, 64)
	if err != nil || n <= 0 {
		return otherwise
	}
	return n
}
