"""Replication's decisions without a network: which points go, which vanish, which chunk is whose delta base."""

from __future__ import annotations

import datetime
import time

import pytest

from appliance.api.tls import normal_fingerprint
from appliance.replication.delta import decode_delta, encode_delta
from appliance.replication.remote import TokenBucket
from appliance.errors import IntegrityError
from appliance.replication.run import delta_bases, points_to_send, vanished
from appliance.schedule import parse_window
from appliance.store.catalog import RestorePoint
from appliance.store.formats import ZERO_CHUNK_ID


def point(point_id: str, vm: str, created: float) -> RestorePoint:
    return RestorePoint(point_id, vm, created, None, ())


def ids(*names: bytes) -> bytes:
    return b"".join(name.ljust(32, b".") if name != b"0" else ZERO_CHUNK_ID for name in names)


def test_only_points_newer_than_the_targets_newest_of_each_vm_are_sent() -> None:
    source = [point("a1", "a", 1), point("a2", "a", 2), point("a3", "a", 3), point("b1", "b", 1)]
    target = [point("a2", "a", 2)]  # a1 was pruned there: it must not come back
    assert [p.id for p in points_to_send(source, target)] == ["a3", "b1"]
    assert points_to_send(source, source) == []


def test_vanished_points_are_those_of_vms_the_source_still_has() -> None:
    source = [point("a3", "a", 3)]
    target = [point("a1", "a", 1), point("a3", "a", 3), point("c1", "c", 1)]
    assert vanished(source, target) == ["a1"]  # VM c is not touched: the source has no point of it


def test_a_chunks_delta_base_is_what_the_same_slot_held() -> None:
    new = (ids(b"x", b"b", b"y", b"0"), ids(b"z"))
    old = (ids(b"a", b"b", b"0", b"c"),)
    assert delta_bases(new, old) == {ids(b"x"): ids(b"a")}  # b unchanged, y had no base, disk 1 none


def test_a_delta_restores_its_chunk_and_only_against_its_base() -> None:
    """Against another base it decodes to other bytes (or fails): the receiver's hash check is what refuses them."""
    base = bytes(range(256)) * 1024
    changed = base[:5000] + b"new bytes" + base[5009:]
    delta = encode_delta(base, changed)
    assert len(delta) < 200
    assert decode_delta(base, delta, len(changed), "test") == changed
    try:
        assert decode_delta(bytes(len(base)), delta, len(changed), "test") != changed
    except IntegrityError:
        pass
    with pytest.raises(IntegrityError):
        decode_delta(base, delta[:-3], len(changed), "test")


@pytest.mark.parametrize("given", ["AB:" * 31 + "AB", "ab" * 32, "sha256:" + "ab:" * 31 + "ab"])
def test_fingerprints_are_read_in_every_usual_spelling(given: str) -> None:
    assert normal_fingerprint(given) == "sha256:" + ":".join(["ab"] * 32)


def test_the_token_bucket_paces_to_its_rate() -> None:
    bucket = TokenBucket(1_000_000)
    started = time.monotonic()
    for _ in range(5):
        bucket.take(500_000)  # 2.5 MB at 1 MB/s, the first 1 MB a burst
    assert 1.3 < time.monotonic() - started < 2.5


def test_windows_may_cross_midnight() -> None:
    night = parse_window("22:00-06:00")
    assert night.holds(datetime.time(23, 30)) and night.holds(datetime.time(5, 59))
    assert not night.holds(datetime.time(12, 0))
    with pytest.raises(ValueError):
        parse_window("06:00-06:00")
