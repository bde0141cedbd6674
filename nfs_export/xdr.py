"""XDR (RFC 4506): the byte encoding of every ONC RPC message and NFS structure.

Everything is big-endian and padded to 4-byte units. The decoder reads a memoryview at
an offset, so a 1 MiB WRITE payload is sliced, not copied, until the VFS needs bytes.
Any malformed input raises `XdrError`, which the RPC layer answers with GARBAGE_ARGS:
one exception type means no handler has to think about truncated or hostile input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
U32_MAX = (1 << 32) - 1


class XdrError(ValueError):
    """Input that is not a valid XDR encoding of the expected type."""


def padding(length: int) -> int:
    """Bytes of zero fill after `length` bytes of opaque data."""
    return -length & 3


class Decoder:
    """Reads XDR items in order from a buffer; every read checks the bounds first."""

    __slots__ = ("_view", "offset")

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        self._view = memoryview(data).cast("B")
        self.offset = offset

    def remaining(self) -> int:
        return len(self._view) - self.offset

    def _take(self, size: int) -> int:
        start = self.offset
        if size < 0 or start + size > len(self._view):
            raise XdrError(f"truncated: {size} bytes wanted at offset {start}, {len(self._view) - start} left")
        self.offset = start + size
        return start

    def uint32(self) -> int:
        return int(_U32.unpack_from(self._view, self._take(4))[0])

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        """Several fixed-size items in one step (a call header: one struct, not six reads).

        The bounds check is written out here rather than calling `_take`: this runs
        several times in every call.
        """
        start = self.offset
        end = start + layout.size
        if end > len(self._view):
            raise XdrError(f"truncated: {layout.size} bytes wanted at offset {start}, {len(self._view) - start} left")
        self.offset = end
        return layout.unpack_from(self._view, start)

    def int32(self) -> int:
        return int(_I32.unpack_from(self._view, self._take(4))[0])

    def uint64(self) -> int:
        return int(_U64.unpack_from(self._view, self._take(8))[0])

    def hyper(self) -> int:
        return int(_I64.unpack_from(self._view, self._take(8))[0])

    def bool(self) -> bool:
        value = self.uint32()
        if value > 1:
            raise XdrError(f"boolean with value {value}")
        return value == 1

    def enum(self, allowed: frozenset[int] | range) -> int:
        value = self.uint32()
        if value not in allowed:
            raise XdrError(f"enum value {value} is not defined")
        return value

    def fixed_view(self, size: int) -> memoryview:
        """Fixed-length opaque data, without copying (bounds checked here, as in `unpack`)."""
        start = self.offset
        padded = start + size + (-size & 3)
        if size < 0 or padded > len(self._view):
            raise XdrError(f"truncated: {size} bytes wanted at offset {start}, {len(self._view) - start} left")
        self.offset = padded
        return self._view[start : start + size]

    def fixed(self, size: int) -> bytes:
        return bytes(self.fixed_view(size))

    def opaque_view(self, max_length: int = U32_MAX) -> memoryview:
        """Variable-length opaque data of at most `max_length` bytes, without copying."""
        (length,) = self.unpack(_U32)
        if length > max_length:
            raise XdrError(f"opaque of {length} bytes exceeds the limit of {max_length}")
        return self.fixed_view(length)

    def opaque(self, max_length: int = U32_MAX) -> bytes:
        return bytes(self.opaque_view(max_length))

    def string(self, max_length: int = U32_MAX) -> str:
        """An XDR string; bytes that are not UTF-8 survive as surrogate escapes (like os.fsdecode)."""
        return self.opaque_view(max_length).tobytes().decode("utf-8", "surrogateescape")

    def optional(self, item: Callable[[Decoder], T]) -> T | None:
        return item(self) if self.bool() else None

    def array(self, item: Callable[[Decoder], T], max_length: int = U32_MAX) -> list[T]:
        count = self.uint32()
        if count > max_length:
            raise XdrError(f"array of {count} items exceeds the limit of {max_length}")
        if count * 4 > self.remaining():  # every item takes at least 4 bytes
            raise XdrError(f"array of {count} items cannot fit in {self.remaining()} bytes")
        return [item(self) for _ in range(count)]


#: Opaque data at least this large is sent by reference (`Encoder.tail`), not copied.
TAIL_MIN = 16 << 10


class Encoder:
    """Appends XDR items to one growing buffer (`data`), and optionally one last item by reference.

    READ replies end with up to 1 MiB of file data that is already in memory (a cached
    chunk); copying it into `data` cost more than the rest of the reply. `tail` holds
    it instead, and `buffers()` is what goes on the wire, with a vectored write.
    """

    __slots__ = ("data", "tail")

    def __init__(self) -> None:
        self.data = bytearray()
        self.tail: tuple[bytes | bytearray | memoryview, ...] = ()

    def __len__(self) -> int:
        if not self.tail:
            return len(self.data)
        return len(self.data) + sum(len(piece) for piece in self.tail)

    def buffers(self) -> list[bytes | bytearray | memoryview]:
        """Everything encoded, in wire order."""
        return [self.data, *self.tail] if self.tail else [self.data]

    def discard_from(self, length: int) -> None:
        """Drop what was encoded after the first `length` bytes (a reply that failed half way)."""
        del self.data[length:]
        self.tail = ()

    def opaque_last(self, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        """`opaque` of the pieces joined, as the last item of the message: large data is
        kept by reference, piece by piece, never joined. Nothing may be encoded after it.
        """
        length = sum(map(len, pieces))
        self.data += _U32.pack(length)
        padding = _PAD[length & 3]
        if length < TAIL_MIN:
            for piece in pieces:
                self.data += piece
            self.data += padding
        else:
            self.tail = (*pieces, padding) if padding else tuple(pieces)

    def uint32(self, value: int) -> None:
        self.data += _U32.pack(value)

    def int32(self, value: int) -> None:
        self.data += _I32.pack(value)

    def uint64(self, value: int) -> None:
        self.data += _U64.pack(value)

    def hyper(self, value: int) -> None:
        self.data += _I64.pack(value)

    def bool(self, value: bool) -> None:
        self.data += _U32.pack(1 if value else 0)

    def fixed(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data
        self.data += _PAD[len(data) & 3]

    def opaque(self, data: bytes | bytearray | memoryview) -> None:
        self.data += _U32.pack(len(data))
        self.fixed(data)

    def string(self, text: str) -> None:
        self.opaque(text.encode("utf-8", "surrogateescape"))

    def optional(self, value: T | None, item: Callable[[Encoder, T], None]) -> None:
        if value is None:
            self.bool(False)
        else:
            self.bool(True)
            item(self, value)

    def array(self, values: list[T] | tuple[T, ...], item: Callable[[Encoder, T], None]) -> None:
        self.uint32(len(values))
        for value in values:
            item(self, value)
