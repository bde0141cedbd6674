"""The overlay's write journal: a stable write made durable by one sequential fdatasync.

Why: a stable write into a fresh overlay block allocates file blocks and a map entry, so
making it durable in place costs an ext4 journal commit for the data file and another
sync for the map (about 0.7 ms here, against 0.2 ms to rewrite an allocated block). A
journal record goes to a file whose blocks were allocated and zeroed when it was
made, so its fdatasync flushes data alone; concurrent stable writes share it (group
commit). The write itself also goes to the data file and the in-memory map as usual,
and a later full flush (COMMIT, close, a truncate, or a full journal) makes those
durable in place and starts the journal anew. A rewrite of a block already durable in
place, which no live record covers, needs no record at all (`overlay.stable`).

On-disk format (``journal`` in the overlay directory, `CAPACITY` bytes)::

    offset 0     JournalHeader: magic (8)  version (u32)  reserved (u32)
                 first ticket (u64)  first offset (u64)  xxh3-64 of the preceding 32 bytes
    from 4096    records, back to back from `first offset`:
                 record magic (8)  ticket (u64)  disk offset (u64)  length (u32)
                 xxh3-64 of those 28 bytes and the data (8)  data (length)

Every record has a ticket, one more than the record before it; tickets only grow,
across restarts too. The header names the first ticket that is not yet durable in
place, and where its record starts. Reading the journal back (`Journal.open`) walks
from there while records are whole: the right magic, the expected ticket, a checksum
that matches. The first record that is not (torn by a crash, or left over from an
earlier pass) ends the walk; no write that was answered can lie past it, since an
answer waits for an fdatasync that covers every record before its own. The records
found are replayed into the overlay in ticket order, which is the order their writes
were applied in, and the overlay is flushed in place before the journal is reset.

The header is far below one sector, so rewriting it in place is atomic.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Iterator

import blake3
import xxhash

from overlay.errors import OverlayClosed, OverlayCorrupt
from overlay.fileio import OsErrors, fsync_dir, pwrite_all

JOURNAL_NAME: Final = "journal"
MAGIC: Final = blake3.blake3(b"instant-recovery-appliance overlay journal v1").digest()[:8]
RECORD_MAGIC: Final = blake3.blake3(b"instant-recovery-appliance overlay journal record v1").digest()[:8]
FORMAT_VERSION: Final = 1
#: Room for 500 64 KiB writes between two flushes in place; made once per session disk.
CAPACITY: Final = 32 << 20
RECORDS_OFFSET: Final = 4096
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, reserved, first ticket, first offset
_RECORD = struct.Struct("<8sQQI")  # magic, ticket, disk offset, length
_CHECKSUM = struct.Struct("<Q")
RECORD_OVERHEAD: Final = _RECORD.size + _CHECKSUM.size
_ZEROS = bytes(1 << 20)


@dataclass(frozen=True, slots=True)
class JournalHeader:
    first_ticket: int
    first_offset: int

    def encode(self) -> bytes:
        fields = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, self.first_ticket, self.first_offset)
        return fields + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(fields))

    @classmethod
    def decode(cls, raw: bytes, where: str) -> JournalHeader:
        size = _HEADER.size + _CHECKSUM.size
        if len(raw) < size:
            raise OverlayCorrupt(f"{where}: journal header is truncated ({len(raw)} bytes)")
        fields = raw[: _HEADER.size]
        magic, version, _, first_ticket, first_offset = _HEADER.unpack(fields)
        if magic != MAGIC:
            raise OverlayCorrupt(f"{where}: journal has a wrong magic number")
        if version != FORMAT_VERSION:
            raise OverlayCorrupt(f"{where}: journal format version {version} is not supported")
        if _CHECKSUM.unpack_from(raw, _HEADER.size)[0] != xxhash.xxh3_64_intdigest(fields):
            raise OverlayCorrupt(f"{where}: journal header checksum mismatch")
        if not RECORDS_OFFSET <= first_offset <= CAPACITY or first_ticket < 1:
            raise OverlayCorrupt(f"{where}: journal header names offset {first_offset}, ticket {first_ticket}")
        return cls(first_ticket, first_offset)


def _record(ticket: int, offset: int, data: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """A record's header and its checksum, to be written before and after nothing: header + checksum + data."""
    fields = _RECORD.pack(RECORD_MAGIC, ticket, offset, len(data))
    digest = xxhash.xxh3_64()
    digest.update(fields)
    digest.update(data)
    return fields, _CHECKSUM.pack(digest.intdigest())


class Journal:
    """One overlay's journal file; the overlay serialises `append` with its writes (its lock),
    and its stable writes share `sync` calls (`overlay.stable`)."""

    def __init__(self, fd: int, where: str, header: JournalHeader, head: int, next_ticket: int) -> None:
        self._fd = fd
        self._closed = False
        self._where = where
        self.first_ticket = header.first_ticket
        self.head = head  # where the next record goes
        self.next_ticket = next_ticket

    @classmethod
    def create(cls, directory: Path, where: str, first_ticket: int = 1) -> Journal:
        """A new journal, every byte written (zeros) and durable, so record syncs flush data alone."""
        temporary = directory / f"{JOURNAL_NAME}.tmp"
        with OsErrors(where, "journal create"):
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                for offset in range(0, CAPACITY, len(_ZEROS)):
                    pwrite_all(fd, _ZEROS[: CAPACITY - offset], offset)
                header = JournalHeader(first_ticket, RECORDS_OFFSET)
                pwrite_all(fd, header.encode(), 0)
                os.fsync(fd)
                os.rename(temporary, directory / JOURNAL_NAME)
                fsync_dir(directory)
            except BaseException:
                os.close(fd)
                temporary.unlink(missing_ok=True)
                raise
        return cls(fd, where, header, RECORDS_OFFSET, first_ticket)

    @classmethod
    def open(cls, directory: Path, where: str) -> tuple[Journal, list[tuple[int, bytes]]] | None:
        """The journal and the writes (disk offset, bytes) to replay, in order; None if there is none."""
        with OsErrors(where, "journal open"):
            try:
                fd = os.open(directory / JOURNAL_NAME, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
        try:
            with OsErrors(where, "journal read"):
                header = JournalHeader.decode(os.pread(fd, RECORDS_OFFSET, 0), where)
                if os.fstat(fd).st_size != CAPACITY:
                    raise OverlayCorrupt(f"{where}: journal is {os.fstat(fd).st_size} bytes, not {CAPACITY}")
                writes = list(_records(fd, header))
        except BaseException:
            os.close(fd)
            raise
        head = header.first_offset + sum(RECORD_OVERHEAD + len(data) for _, data in writes)
        return cls(fd, where, header, head, header.first_ticket + len(writes)), writes

    def fits(self, length: int) -> bool:
        return self.head + RECORD_OVERHEAD + length <= CAPACITY

    @staticmethod
    def can_hold(length: int) -> bool:
        """Whether a write of `length` bytes fits an empty journal at all."""
        return RECORDS_OFFSET + RECORD_OVERHEAD + length <= CAPACITY

    def append(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write one record at the head (into the page cache); its ticket. The caller checked `fits`."""
        ticket = self.next_ticket
        fields, checksum = _record(ticket, offset, data)
        with OsErrors(self._where, "journal write", self.head):
            written = os.pwritev(self._fd, [fields, checksum, data], self.head)
            if written != RECORD_OVERHEAD + len(data):  # a short write: finish it the slow way
                pwrite_all(self._fd, (fields + checksum + bytes(data))[written:], self.head + written)
        self.head += RECORD_OVERHEAD + len(data)
        self.next_ticket = ticket + 1
        return ticket

    def sync(self) -> None:
        """Make every record written so far durable."""
        if self._closed:  # its descriptor's number may name another file by now
            raise OverlayClosed(f"{self._where}: journal is closed")
        with OsErrors(self._where, "journal fdatasync"):
            os.fdatasync(self._fd)

    def mark_durable(self, first_ticket: int, first_offset: int) -> None:
        """Records before `first_ticket` are durable in place; the live ones start at `first_offset`.

        The header goes to the page cache only: the caller holds the overlay's lock, so the
        header is written before any record that follows it, and the next `sync` makes both
        durable. Starting over at the front is only for a journal with no live record.
        """
        with OsErrors(self._where, "journal header write"):
            pwrite_all(self._fd, JournalHeader(first_ticket, first_offset).encode(), 0)
        self.first_ticket = first_ticket
        if first_offset == RECORDS_OFFSET:
            self.head = RECORDS_OFFSET

    def allocated_bytes(self) -> int:
        with OsErrors(self._where, "journal stat"):
            return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        """Close the file; the overlay first waits for a stable-write sync that is running (`overlay.stable`)."""
        self._closed = True
        os.close(self._fd)


def _records(fd: int, header: JournalHeader) -> Iterator[tuple[int, bytes]]:
    """The whole records from the header's first one on, in ticket order (see the module doc)."""
    at, ticket = header.first_offset, header.first_ticket
    while at + RECORD_OVERHEAD <= CAPACITY:
        raw = os.pread(fd, RECORD_OVERHEAD, at)
        magic, found, offset, length = _RECORD.unpack_from(raw)
        if magic != RECORD_MAGIC or found != ticket or at + RECORD_OVERHEAD + length > CAPACITY:
            return
        data = os.pread(fd, length, at + RECORD_OVERHEAD)
        fields, checksum = _record(found, offset, data)
        if len(data) != length or checksum != raw[_RECORD.size :]:
            return
        yield offset, data
        at += RECORD_OVERHEAD + length
        ticket += 1
