// The files behind a virtual disk, as ESXi lays them out on VMFS: a text descriptor
// (`<name>.vmdk`) naming one extent, which is either the flat file of a base disk
// (`<name>-flat.vmdk`, exactly the capacity, sparse on our filesystem) or the data of a
// snapshot delta (`<name>-00000N-delta.vmdk`). vcsim 0.24 only creates two empty files,
// and a backup reads these files over /folder, so they have to be real.
//
// A delta keeps only what the guest wrote after its snapshot (appended to the extent,
// with a map of disk ranges to file offsets) so that reading it over /folder never
// returns a whole disk, as a vmfsSparse delta on ESXi does not either.

package simulator

import (
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

const sectorSize = 512

// segment maps disk bytes [off, off+length) to extent bytes [at, at+length).
type segment struct {
	off, length, at int64
}

// diskFile is one link of a disk's chain: the base disk or a snapshot delta.
type diskFile struct {
	name       string // datastore path of the descriptor: "[ds] dir/x.vmdk"
	descriptor string // local path of the descriptor
	extent     string // local path of the extent
	flat       bool   // the base disk: extent offsets are disk offsets
	cid        uint32
	segments   []segment // what was written into this file, sorted, not overlapping
	end        int64     // a delta's extent length: where the next write is appended
	// creator is the snapshot whose creation started this delta: once it is gone, the
	// delta is merged into its parent (or, if that fails, waits for a consolidation).
	creator types.ManagedObjectReference
}

// extentName is the extent file of a descriptor, named as ESXi names it.
func extentName(descriptor string, flat bool) string {
	base := strings.TrimSuffix(descriptor, ".vmdk")
	if flat {
		return base + "-flat.vmdk"
	}
	return base + "-delta.vmdk"
}

// newDiskFile names the files of a descriptor at datastore path `name` under the datastore's directory.
func newDiskFile(name string, local string, flat bool) *diskFile {
	return &diskFile{name: name, descriptor: local, extent: extentName(local, flat), flat: flat, cid: randomCID()}
}

func randomCID() uint32 {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) & 0x7ffffffe
}

// vmwareUUID formats 16 random bytes after `prefix` as VMware writes ddb.uuid and
// changeId uuids: "52 1f ... 9a-0b ... 7d".
func vmwareUUID(prefix ...byte) string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	copy(b, prefix)
	var s strings.Builder
	for i, x := range b {
		switch {
		case i == 8:
			s.WriteByte('-')
		case i > 0:
			s.WriteByte(' ')
		}
		fmt.Fprintf(&s, "%02x", x)
	}
	return s.String()
}

// writeBase makes the descriptor and the flat extent of a base disk of `capacity` bytes,
// keeping the flat file's data when it grows.
func (f *diskFile) writeBase(capacity int64, adapter string, uuid string) error {
	sectors := capacity / sectorSize
	cylinders := sectors / (255 * 63)
	if cylinders < 1 {
		cylinders = 1
	}
	text := fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%08x
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s"

# The Disk Data Base
#DDB

ddb.adapterType = "%s"
ddb.geometry.cylinders = "%d"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "%032x"
ddb.thinProvisioned = "1"
ddb.uuid = "%s"
ddb.virtualHWVersion = "19"
`, f.cid, sectors, path.Base(f.extent), adapter, cylinders, f.cid, uuid)
	if err := os.WriteFile(f.descriptor, []byte(text), 0o600); err != nil {
		return err
	}
	extent, err := os.OpenFile(f.extent, os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer extent.Close()
	return extent.Truncate(capacity)
}

// writeDelta makes the descriptor and the empty extent of a snapshot delta on top of `parent`.
func (f *diskFile) writeDelta(capacity int64, adapter string, parent *diskFile) error {
	text := fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%08x
parentCID=%08x
createType="vmfsSparse"
parentFileNameHint="%s"

# Extent description
RW %d VMFSSPARSE "%s"

# The Disk Data Base
#DDB

ddb.adapterType = "%s"
ddb.longContentID = "%032x"
ddb.virtualHWVersion = "19"
`, f.cid, parent.cid, path.Base(parent.descriptor), capacity/sectorSize, path.Base(f.extent), adapter, f.cid)
	if err := os.WriteFile(f.descriptor, []byte(text), 0o600); err != nil {
		return err
	}
	return os.WriteFile(f.extent, nil, 0o600)
}

func (f *diskFile) remove() {
	_ = os.Remove(f.descriptor)
	_ = os.Remove(f.extent)
}

// write copies `length` bytes of `data` to disk offset `off`: in place in a flat file,
// appended to a delta's extent. It streams, so a guest may write a whole large disk.
func (f *diskFile) write(off int64, data io.Reader, length int64) error {
	extent, err := os.OpenFile(f.extent, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer extent.Close()
	at := off
	if !f.flat {
		at = f.end
	}
	if _, err := extent.Seek(at, io.SeekStart); err != nil {
		return err
	}
	n, err := io.CopyN(extent, data, length)
	if n > 0 {
		f.record(segment{off: off, length: n, at: at})
		if !f.flat {
			f.end = at + n
		}
	}
	return err
}

// record notes a write, dropping what it overwrites of earlier ones.
func (f *diskFile) record(s segment) {
	end := s.off + s.length
	kept := make([]segment, 0, len(f.segments)+2)
	for _, old := range f.segments {
		oldEnd := old.off + old.length
		if oldEnd <= s.off || old.off >= end {
			kept = append(kept, old)
			continue
		}
		if old.off < s.off {
			kept = append(kept, segment{off: old.off, length: s.off - old.off, at: old.at})
		}
		if oldEnd > end {
			kept = append(kept, segment{off: end, length: oldEnd - end, at: old.at + end - old.off})
		}
	}
	kept = append(kept, s)
	sort.Slice(kept, func(i, j int) bool { return kept[i].off < kept[j].off })
	f.segments = kept
}

// mergeInto copies everything written to f into `parent`, as consolidating a delta does.
func (f *diskFile) mergeInto(parent *diskFile) error {
	source, err := os.Open(f.extent)
	if err != nil {
		return err
	}
	defer source.Close()
	for _, s := range f.segments {
		if err := parent.write(s.off, io.NewSectionReader(source, s.at, s.length), s.length); err != nil {
			return err
		}
	}
	return nil
}

// readChain streams disk bytes [off, off+length) as the guest sees them through `chain`
// (base first): the newest file that wrote a byte has it, unwritten bytes are zero.
func readChain(chain []*diskFile, off, length int64, out io.Writer) error {
	if length <= 0 {
		return nil
	}
	top := chain[len(chain)-1]
	if top.flat {
		extent, err := os.Open(top.extent)
		if err != nil {
			return err
		}
		defer extent.Close()
		_, err = io.Copy(out, io.NewSectionReader(extent, off, length))
		return err
	}
	end := off + length
	pos := off
	for _, s := range top.segments {
		sEnd := s.off + s.length
		if sEnd <= pos || s.off >= end {
			continue
		}
		if s.off > pos {
			if err := readChain(chain[:len(chain)-1], pos, s.off-pos, out); err != nil {
				return err
			}
			pos = s.off
		}
		stop := min64(sEnd, end)
		if err := copyExtent(top.extent, s.at+pos-s.off, stop-pos, out); err != nil {
			return err
		}
		pos = stop
	}
	return readChain(chain[:len(chain)-1], pos, end-pos, out)
}

func copyExtent(name string, at, length int64, out io.Writer) error {
	extent, err := os.Open(name)
	if err != nil {
		return err
	}
	defer extent.Close()
	_, err = io.Copy(out, io.NewSectionReader(extent, at, length))
	return err
}

func min64(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}
