"""File handles: small, sealed, stable for one secret, refused for any other."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfs_export.handles import HANDLE_SIZE, BadHandle, FileHandle, HandleCodec

SECRET = bytes(range(32))


@given(st.integers(0, 2**32 - 1), st.integers(1, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_handles_round_trip_and_fit_esxi(export_id: int, fileid: int, generation: int) -> None:
    handle = FileHandle(export_id, fileid, generation)
    raw = HandleCodec(SECRET).encode(handle)
    assert len(raw) == HANDLE_SIZE <= 56
    assert HandleCodec(SECRET).decode(raw) == handle  # a new codec: as after a restart


def test_every_changed_byte_is_detected() -> None:
    raw = HandleCodec(SECRET).encode(FileHandle(1, 12345, 99))
    for index in range(len(raw)):
        forged = bytearray(raw)
        forged[index] ^= 0x40
        with pytest.raises(BadHandle):
            HandleCodec(SECRET).decode(bytes(forged))


@pytest.mark.parametrize("raw", [b"", b"\x01" * (HANDLE_SIZE - 1), b"\x01" * (HANDLE_SIZE + 1), b"\x00" * 64],
                         ids=["empty", "short", "long", "zeros"])
def test_malformed_handles_are_bad(raw: bytes) -> None:
    with pytest.raises(BadHandle):
        HandleCodec(SECRET).decode(raw)


def test_another_secret_refuses_our_handles() -> None:
    raw = HandleCodec(SECRET).encode(FileHandle(1, 2, 3))
    with pytest.raises(BadHandle):
        HandleCodec(b"another secret of 32 bytes......").decode(raw)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        HandleCodec(b"short")


def test_derived_identities_are_stable_per_secret() -> None:
    assert HandleCodec(SECRET).derived(b"fsid", 8) == HandleCodec(SECRET).derived(b"fsid", 8)
    assert HandleCodec(SECRET).derived(b"fsid", 8) != HandleCodec(SECRET[::-1]).derived(b"fsid", 8)
    assert HandleCodec(SECRET).derived(b"fsid", 8) != HandleCodec(SECRET).derived(b"cookieverf", 8)
