"""XDR encoding (RFC 4506): round trips, exact bytes, and malformed input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfs_export.xdr import Decoder, Encoder, XdrError

ROUND_TRIPS: list[tuple[str, Any, Callable[[Encoder, Any], None], Callable[[Decoder], Any], bytes]] = [
    ("uint32", 0xDEADBEEF, Encoder.uint32, Decoder.uint32, bytes.fromhex("deadbeef")),
    ("int32", -2, Encoder.int32, Decoder.int32, bytes.fromhex("fffffffe")),
    ("uint64", 1 << 40, Encoder.uint64, Decoder.uint64, bytes.fromhex("0000010000000000")),
    ("hyper", -1, Encoder.hyper, Decoder.hyper, b"\xff" * 8),
    ("bool", True, Encoder.bool, Decoder.bool, bytes.fromhex("00000001")),
    ("opaque", b"abcde", Encoder.opaque, Decoder.opaque, b"\0\0\0\x05abcde\0\0\0"),
    ("fixed", b"ab", Encoder.fixed, lambda d: d.fixed(2), b"ab\0\0"),
    ("string", "nfs", Encoder.string, Decoder.string, b"\0\0\0\x03nfs\0"),
    ("empty string", "", Encoder.string, Decoder.string, b"\0\0\0\0"),
    ("optional", 7, lambda e, v: e.optional(v, Encoder.uint32), lambda d: d.optional(Decoder.uint32),
     bytes.fromhex("0000000100000007")),
    ("absent", None, lambda e, v: e.optional(v, Encoder.uint32), lambda d: d.optional(Decoder.uint32),
     bytes.fromhex("00000000")),
    ("array", [1, 2], lambda e, v: e.array(v, Encoder.uint32), lambda d: d.array(Decoder.uint32),
     bytes.fromhex("000000020000000100000002")),
]


@pytest.mark.parametrize(("value", "encode", "decode", "wire"), [r[1:] for r in ROUND_TRIPS],
                         ids=[r[0] for r in ROUND_TRIPS])
def test_round_trip_and_exact_bytes(value: Any, encode: Callable[[Encoder, Any], None],
                                    decode: Callable[[Decoder], Any], wire: bytes) -> None:
    encoder = Encoder()
    encode(encoder, value)
    assert bytes(encoder.data) == wire
    decoder = Decoder(wire)
    assert decode(decoder) == value
    assert decoder.remaining() == 0


MALFORMED: list[tuple[str, bytes, Callable[[Decoder], Any]]] = [
    ("short uint32", b"\0\0\0", Decoder.uint32),
    ("short uint64", b"\0" * 7, Decoder.uint64),
    ("bool of 2", b"\0\0\0\x02", Decoder.bool),
    ("opaque past the end", b"\0\0\0\x08abcd", Decoder.opaque),
    ("opaque missing padding", b"\0\0\0\x03abc", Decoder.opaque),
    ("opaque over its limit", b"\0\0\0\x05abcde\0\0\0", lambda d: d.opaque(4)),
    ("string over its limit", b"\0\0\0\x05abcde\0\0\0", lambda d: d.string(4)),
    ("huge array count", b"\xff\xff\xff\xff", lambda d: d.array(Decoder.uint32)),
    ("array over its limit", bytes.fromhex("00000002" + "00" * 8), lambda d: d.array(Decoder.uint32, 1)),
    ("undefined enum", b"\0\0\0\x09", lambda d: d.enum(range(3))),
    ("optional flag of 3", b"\0\0\0\x03", lambda d: d.optional(Decoder.uint32)),
]


@pytest.mark.parametrize(("data", "decode"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_input_raises_xdr_error(data: bytes, decode: Callable[[Decoder], Any]) -> None:
    with pytest.raises(XdrError):
        decode(Decoder(data))


def test_decoding_starts_at_an_offset_and_slices_without_copying() -> None:
    buffer = bytearray(b"skip" + b"\0\0\0\x04data")
    decoder = Decoder(buffer, offset=4)
    view = decoder.opaque_view()
    buffer[8] = ord("D")
    assert bytes(view) == b"Data"


@given(st.lists(st.one_of(st.integers(0, 2**32 - 1).map(lambda v: ("u32", v)),
                          st.integers(0, 2**64 - 1).map(lambda v: ("u64", v)),
                          st.binary(max_size=40).map(lambda v: ("opaque", v)),
                          st.text(max_size=20).map(lambda v: ("string", v)))))
def test_any_sequence_round_trips(items: list[tuple[str, Any]]) -> None:
    encoders: dict[str, Callable[[Encoder, Any], None]] = {
        "u32": Encoder.uint32, "u64": Encoder.uint64, "opaque": Encoder.opaque, "string": Encoder.string}
    decoders: dict[str, Callable[[Decoder], Any]] = {
        "u32": Decoder.uint32, "u64": Decoder.uint64, "opaque": Decoder.opaque, "string": Decoder.string}
    encoder = Encoder()
    for kind, value in items:
        encoders[kind](encoder, value)
    assert len(encoder) % 4 == 0
    decoder = Decoder(encoder.data)
    assert [(kind, decoders[kind](decoder)) for kind, _ in items] == items


@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_xdr_error(data: bytes) -> None:
    decoder = Decoder(data)
    try:
        while True:
            decoder.string(32)
            decoder.optional(Decoder.uint64)
            decoder.array(Decoder.uint32, 4)
    except XdrError:
        pass
