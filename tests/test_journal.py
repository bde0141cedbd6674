"""The overlay's stable-write journal: replay after a crash, torn records, starting over, flushes in place.

A crash is an overlay that is never closed, and a second `Overlay.open` of its directory
(what a restarted appliance does); a torn record is bytes of the journal file changed on
disk, as a power cut in the middle of a record write would leave them.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from overlay import Overlay, OverlayClosed, OverlayCorrupt, OverlayError, journal
from tests.test_overlay import BytesBase, SyncLog, make_overlay

BLOCK = 64 << 10


def base_of(blocks: int, seed: int = 1) -> BytesBase:
    return BytesBase(random.Random(seed).randbytes(blocks * BLOCK))


def test_a_durable_write_survives_a_crash_with_nothing_flushed_in_place(tmp_path: Path) -> None:
    base = base_of(16)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(3 * BLOCK + 100, b"stable" * 1000)  # a sub-block write into a fresh block
    overlay.write(5 * BLOCK, b"u" * BLOCK)  # unstable: may be lost
    assert (directory / journal.JOURNAL_NAME).stat().st_size == journal.CAPACITY
    reopened = Overlay.open(directory, base)  # the first was never closed: a crash
    expected = bytearray(base.data[3 * BLOCK : 4 * BLOCK])
    expected[100 : 100 + 6000] = b"stable" * 1000
    assert reopened.read(3 * BLOCK, BLOCK) == bytes(expected)
    assert reopened.changed_ranges() == [(3 * BLOCK, BLOCK)]
    reopened.close()
    again = Overlay.open(directory, base)  # replayed once and flushed: nothing to replay now
    assert again.read(3 * BLOCK, BLOCK) == bytes(expected)
    again.close()


def test_replay_applies_records_in_the_order_they_were_written(tmp_path: Path) -> None:
    rng = random.Random(5)
    base = base_of(32)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    model = bytearray(base.data)
    for _ in range(200):  # overlapping writes: only the order makes the last one win
        offset = rng.randrange(0, len(model) - 3 * BLOCK)
        data = rng.randbytes(rng.choice((512, 4096, 70000)))
        overlay.write_durable(offset, data)
        model[offset : offset + len(data)] = data
    reopened = Overlay.open(directory, base)
    assert reopened.read(0, len(model)) == bytes(model)
    reopened.close()
    overlay.close()


def test_a_torn_record_ends_the_replay_and_the_answered_ones_before_it_stay(tmp_path: Path) -> None:
    base = base_of(8)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(0, b"a" * BLOCK)
    overlay.write_durable(BLOCK, b"b" * BLOCK)
    torn_at = journal.RECORDS_OFFSET + 2 * (journal.RECORD_OVERHEAD + BLOCK)  # the third record
    overlay.write_durable(2 * BLOCK, b"c" * BLOCK)
    overlay.write_durable(3 * BLOCK, b"d" * BLOCK)
    with open(directory / journal.JOURNAL_NAME, "r+b") as file:
        file.seek(torn_at + journal.RECORD_OVERHEAD + 1000)
        file.write(b"\xff" * 10)  # its data half written
    with open(directory / "data", "r+b") as file:  # and, as after a power cut, the data file lost them
        file.truncate(0)
    reopened = Overlay.open(directory, base)
    assert reopened.read(0, 2 * BLOCK) == b"a" * BLOCK + b"b" * BLOCK
    assert reopened.read(2 * BLOCK, 2 * BLOCK) == base.data[2 * BLOCK : 4 * BLOCK]  # the torn one and after
    reopened.close()
    overlay.close()


def test_a_full_journal_is_flushed_in_place_and_started_over(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "CAPACITY", journal.RECORDS_OFFSET + 5 * (journal.RECORD_OVERHEAD + BLOCK))
    base = base_of(16)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    for index in range(12):  # room for five records: it starts over twice
        overlay.write_durable(index * BLOCK, bytes([index + 1]) * BLOCK)
    reopened = Overlay.open(directory, base)
    for index in range(12):
        assert reopened.read(index * BLOCK, BLOCK) == bytes([index + 1]) * BLOCK, index
    reopened.close()
    overlay.close()


def test_a_flush_in_place_lets_go_of_records_so_replay_never_undoes_later_writes(tmp_path: Path) -> None:
    """A stable write, then an unstable one over it made durable by COMMIT: a crash must keep the second."""
    base = base_of(4)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(0, b"old" * 1000)
    overlay.write(0, b"new" * 1000)
    overlay.flush()
    reopened = Overlay.open(directory, base)
    assert reopened.read(0, 3000) == b"new" * 1000
    reopened.close()
    overlay.close()


def test_concurrent_durable_writes_share_journal_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = base_of(64)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(0, b"x")  # makes the journal
    syncs = SyncLog(monkeypatch)  # every fsync and fdatasync: here only the journal's
    start = threading.Barrier(32)

    def write(index: int) -> None:
        start.wait()
        overlay.write_durable(index * BLOCK, bytes([index]) * BLOCK)

    threads = [threading.Thread(target=write, args=(index,)) for index in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= len(syncs.calls) < 32  # each write waited for a sync that covered it, most shared one
    reopened = Overlay.open(directory, base)
    for index in range(1, 32):
        assert reopened.read(index * BLOCK, BLOCK) == bytes([index]) * BLOCK
    reopened.close()
    overlay.close()


def test_a_damaged_journal_header_is_reported_not_ignored(tmp_path: Path) -> None:
    base = base_of(4)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(0, b"kept")
    overlay.close()
    with open(directory / journal.JOURNAL_NAME, "r+b") as file:
        file.write(b"\0" * 8)  # the magic
    with pytest.raises(OverlayCorrupt, match=f"overlay {directory}: journal has a wrong magic number"):
        Overlay.open(directory, base)


def test_discard_removes_the_journal_too(tmp_path: Path) -> None:
    directory, overlay = make_overlay(tmp_path, base_of(4), BLOCK)
    overlay.write_durable(0, b"gone")
    overlay.discard()
    assert list(directory.iterdir()) == []


def test_a_failed_sync_on_the_loop_sends_the_next_stable_writes_the_ordinary_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After EIO from the journal's sync, `write_durable_nowait` declines, so a resent write meets the
    failure in `write_durable` (a worker thread, where the error is answered) instead of looping."""
    base = base_of(4)
    _, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(0, b"first")  # makes the journal
    ticket = overlay.write_durable_nowait(BLOCK, b"x" * BLOCK)
    assert ticket is not None

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal.os, "fdatasync", failing)
    with pytest.raises(OverlayError, match="journal fdatasync failed: Input/output error"):
        overlay.make_durable(ticket)
    assert overlay.write_durable_nowait(BLOCK, b"y" * BLOCK) is None
    with pytest.raises(OverlayError, match="journal fdatasync failed"):
        overlay.write_durable(BLOCK, b"y" * BLOCK)
    monkeypatch.undo()
    overlay.close()


def test_a_sync_after_close_is_refused_not_run_on_a_reused_descriptor(tmp_path: Path) -> None:
    """Had a close's flush failed, a late sync must not fdatasync whatever file took the descriptor's number."""
    directory, overlay = make_overlay(tmp_path, base_of(4), BLOCK)
    overlay.write_durable(0, b"made")
    found = journal.Journal.open(directory, f"overlay {directory}")
    assert found is not None
    opened, _ = found
    opened.close()
    with pytest.raises(OverlayClosed, match="journal is closed"):
        opened.sync()
    overlay.close()


def read_after_crash(directory: Path, base: BytesBase, offset: int, length: int) -> bytes:
    """What a restarted appliance reads: the overlay opened again (replaying its journal), never closed before."""
    reopened = Overlay.open(directory, base)
    try:
        return reopened.read(offset, length)
    finally:
        reopened.close()


def lose_page_cache_of_data(directory: Path) -> None:
    """What a power cut does to data-file bytes that no sync made durable: here, all of them are lost."""
    with open(directory / "data", "r+b") as file:
        file.truncate(0)


def test_a_rewrite_of_a_settled_block_goes_in_place_alone_and_survives_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a flush made a block durable in place, a stable rewrite of it writes no record:
    one fdatasync of the data file makes it durable, and reopening reads it back."""
    base = base_of(8)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(2 * BLOCK, b"a" * BLOCK)  # a fresh block: journaled
    overlay.flush()  # settles it
    head = overlay._journal_of().head
    syncs = SyncLog(monkeypatch)
    overlay.write_durable(2 * BLOCK + 4096, b"b" * 4096)
    assert overlay._journal_of().head == head  # no record
    assert syncs.of(overlay._data_fd) == ["fdatasync"] and len(syncs.calls) == 1
    assert read_after_crash(directory, base, 2 * BLOCK, BLOCK) == b"a" * 4096 + b"b" * 4096 + b"a" * (BLOCK - 8192)
    overlay.close()


def test_a_rewrite_of_a_block_a_live_record_covers_is_journaled_so_replay_keeps_the_order(
        tmp_path: Path) -> None:
    """Had the second write gone in place alone, replaying the first one's record after a
    crash would write the old bytes over it."""
    base = base_of(8)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(BLOCK, b"1" * BLOCK)
    overlay.write_durable(BLOCK, b"2" * BLOCK)  # same block, no flush in between
    lose_page_cache_of_data(directory)
    assert read_after_crash(directory, base, BLOCK, BLOCK) == b"2" * BLOCK
    overlay.close()


def test_a_stable_write_to_a_block_only_an_unstable_write_allocated_is_journaled(tmp_path: Path) -> None:
    """The block's map entry is only in memory: in place alone, a crash would lose the block."""
    base = base_of(8)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(0, b"x")  # makes the journal
    overlay.write(3 * BLOCK, b"u" * BLOCK)  # unstable: allocates block 3 in memory only
    overlay.write_durable(3 * BLOCK, b"s" * 4096)
    lose_page_cache_of_data(directory)
    assert read_after_crash(directory, base, 3 * BLOCK, 4096) == b"s" * 4096
    overlay.close()


def test_a_stable_write_that_grows_the_disk_is_journaled(tmp_path: Path) -> None:
    """A settled block that straddles the end: a write past the end needs a new size, which only a record keeps."""
    base = base_of(4)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.truncate(3 * BLOCK + 100)
    overlay.write_durable(3 * BLOCK, b"t" * 100)
    overlay.flush()  # block 3 settled, the durable size ends inside it
    overlay.write_durable(3 * BLOCK + 50, b"g" * 1000)
    assert read_after_crash(directory, base, 3 * BLOCK, 2000) == b"t" * 50 + b"g" * 1000  # short at the new end
    overlay.close()


def test_a_block_journaled_after_a_flush_began_stays_unsettled(tmp_path: Path) -> None:
    """A flush settles only the blocks it saw; one a record covered after its snapshot keeps its record live."""
    base = base_of(8)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(0, b"a" * BLOCK)
    with overlay._lock:
        snapshot = overlay._snapshot()
    overlay.write_durable(BLOCK, b"b" * BLOCK)  # journaled while the flush is under way
    overlay._write_out(snapshot, True)
    overlay._let_go_of_records(snapshot)
    with overlay._lock:
        overlay._settled(snapshot)
    assert overlay._stable.settled(0, 0) and not overlay._stable.settled(1, 1)
    overlay.write_durable(BLOCK, b"c" * BLOCK)
    lose_page_cache_of_data(directory)  # both records of block 1 replay, in order
    assert read_after_crash(directory, base, BLOCK, BLOCK) == b"c" * BLOCK
    overlay.close()


def test_a_settled_rewrite_joins_the_journal_while_a_journaled_write_awaits_its_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """So the one sync that covers both is the journal's alone, not the journal's and the data file's."""
    base = base_of(8)
    directory, overlay = make_overlay(tmp_path, base, BLOCK)
    overlay.write_durable(0, b"a" * BLOCK)
    overlay.flush()  # block 0 settled
    journaled = overlay.write_durable_nowait(BLOCK, b"b" * BLOCK)  # a fresh block: journaled, not yet synced
    head = overlay._journal_of().head
    rewrite = overlay.write_durable_nowait(0, b"c" * 4096)
    assert journaled is not None and rewrite is not None
    assert overlay._journal_of().head > head  # recorded too
    syncs = SyncLog(monkeypatch)
    overlay.make_durable(rewrite)
    assert syncs.of(overlay._data_fd) == [] and len(syncs.calls) == 1
    lose_page_cache_of_data(directory)
    assert read_after_crash(directory, base, 0, 2 * BLOCK)[:4096] == b"c" * 4096
    overlay.close()
