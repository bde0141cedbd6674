"""A restore point's disk as a read-only, seekable Python file object.

Parsers walk metadata with many small reads at scattered offsets. Each read goes to the
store's read path, whose cache keeps decompressed chunks, so a run of small reads inside
one chunk decompresses it once; the last chunk read is also held here, which spares the
cache lookup and the join for the common case of a parser reading a structure field by
field. The chunks a read touched are counted, so a caller can say how much of the disk a
listing or an extraction needed.
"""

from __future__ import annotations

import io

from appliance.store.reader import DiskReader


class DiskFile(io.RawIOBase):
    """Read-only file over one disk of one restore point."""

    def __init__(self, reader: DiskReader, chunk_size: int) -> None:
        super().__init__()
        self._reader = reader
        self._chunk_size = chunk_size
        self._position = 0
        self._held_index = -1
        self._held = b""
        self.size = reader.size
        self.chunks_read: set[int] = set()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._position + size)
        if self._position >= end:
            return b""
        first, last = self._position // self._chunk_size, (end - 1) // self._chunk_size
        if first == last:
            data = self._chunk(first)[self._position - first * self._chunk_size : end - first * self._chunk_size]
        else:
            self.chunks_read.update(range(first, last + 1))
            data = self._reader.read(self._position, end - self._position)
        self._position = end
        return data

    def _chunk(self, index: int) -> bytes:
        if index != self._held_index:
            self._held = self._reader.read(index * self._chunk_size, self._chunk_size)
            self._held_index = index
            self.chunks_read.add(index)
        return self._held
