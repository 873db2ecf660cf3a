"""Second review, gateway side (agent/): each test is a finding, and fails against the tree
it was written on for the reason its docstring gives. Each asserts the behaviour the gateway
should have, so it passes once the finding is fixed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.queue.diskcap import disk_bytes
from lantern.agent.queue.store import Accepted, Window

from .gateway_harness import (
    K1,
    K2,
    NODE,
    OTHER,
    ROGUE,
    ROGUE_KEY,
    FakeLink,
    acked,
    frame,
    gateway,
    good_pack,
    until,
)

# ---- two authentic frames out of order in one group commit ----------------------------------


async def test_out_of_order_frames_in_one_commit_do_not_fail_every_nodes_commit(
        tmp_path: Path) -> None:
    """queue/store.py Window.mark: a frame more than WINDOW below one marked earlier in the same
    group commit sets a bit past the 64-bit bitmap, _to_sql cannot store it, and SQLite raises
    OverflowError: the whole group commit fails (logged as a disk problem), so no frame in it —
    any node's — is acknowledged. A node key sending (seq N+64, seq N) in one write does it on
    every commit, for ever: every node on the gateway stops being acknowledged."""
    keys = {NODE: K1, OTHER: K2, ROGUE: ROGUE_KEY}
    link = FakeLink()
    async with gateway(tmp_path / "queue.sqlite", keys) as (ingest, _, tasks):
        ingest.on_data(link, frame(1, key=ROGUE_KEY, node=ROGUE))
        await until(lambda: acked(link, keys).get(ROGUE) == [1], "the rogue's first ACK", *tasks)
        # one read: the rogue's newer frame first, then one 100 older, and an innocent frame
        ingest.on_data(link, frame(200, key=ROGUE_KEY, node=ROGUE)
                       + frame(100, key=ROGUE_KEY, node=ROGUE) + frame(7, key=K2, node=OTHER))
        await asyncio.sleep(1.5)
        assert ingest.metrics.store_errors == 0, "a group commit failed"
        await until(lambda: acked(link, keys).get(OTHER) == [7],
                    "the innocent node's ACK", *tasks, timeout=5.0)
        assert 200 in acked(link, keys)[ROGUE]


# ---- dead letters and the disk cap ---------------------------------------------------------


@pytest.mark.parametrize("policy", ["pause_intake", "evict_oldest"])
async def test_dead_letters_cannot_take_the_queue_cap_from_every_other_node(
        tmp_path: Path, policy: str) -> None:
    """agent/queue/diskcap.py counts the dead_letters table in the live bytes the cap bounds, but
    make_room only ever sheds `recent` and `frames`: dead letters are never trimmed. One node key
    sending packs that are not CBOR (each ACKed and kept, ~1 KB) fills the cap with them;
    under pause_intake (the default) intake then stays paused for ever — nothing in `frames`
    to drain, so DiskCap.update never resumes it, across restarts too — and every other node's
    frames are refused (queue_full) until an operator deletes rows by hand; under evict_oldest
    each other node's frame is ACKed and then evicted before a sink sees it, while the dead
    letters grow the database past max_mb."""
    db = tmp_path / "queue.sqlite"
    cap = 1 << 20
    keys = {NODE: K1, ROGUE: ROGUE_KEY}
    junk = b"\xff" + bytes(range(256)) * 3  # not CBOR: a dead letter on arrival
    link = FakeLink()
    async with gateway(db, keys) as (ingest, sink, tasks):
        await ingest.store.limit(cap, policy)
        for seq in range(1, 2001):
            ingest.on_data(link, frame(seq, junk, key=ROGUE_KEY, node=ROGUE))
            if seq % 100 == 0:
                await until(lambda: not ingest._pending, "the rogue's frames", *tasks)
        await asyncio.sleep(0.5)
        # the rogue stops; an honest node sends one frame, and upstream works
        ingest.on_data(link, frame(1))
        deadline = time.monotonic() + 5.0
        while sink.rids != [f"{NODE}:1:0", f"{NODE}:1:1"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cap_state = ingest.store.cap
        assert sink.rids == [f"{NODE}:1:0", f"{NODE}:1:1"], (
            f"the honest node's frame never went upstream: paused={cap_state.paused}, "
            f"queue_full={ingest.metrics.frames_rejected['queue_full']}, "
            f"evicted readings={cap_state.evicted}, dead letters={ingest.metrics.dead_letters}")
    assert disk_bytes(db) <= cap, f"queue on disk {disk_bytes(db)} bytes, cap {cap}"


# ---- what the ingest remembers of frames refused while the queue is full -------------------


async def test_frames_refused_at_the_cap_are_not_remembered_without_bound(tmp_path: Path
                                                                          ) -> None:
    """agent/ingest.py Ingest._hold: while the queue is at its cap (pause_intake) every refused
    frame's sequence is added to the node's `_held` set, and nothing bounds it: a node key
    (or the node itself, counting on) sending new sequence numbers grows the gateway's memory
    by ~60 bytes a frame for as long as the queue stays full — and the test above shows how
    that key can keep it full. Only the oldest refused sequence is ever needed (min(held))."""
    keys = {NODE: K1}
    link = FakeLink()
    async with gateway(tmp_path / "queue.sqlite", keys) as (ingest, _, tasks):
        ingest.store.cap.paused = True  # the queue at its cap (policy pause_intake)
        tiny = bytes(cbor2.dumps([{0: "t", 2: 1}]))
        for seq in range(1, 20_001):
            ingest.on_data(link, frame(seq, tiny))
        assert ingest.metrics.frames_rejected["queue_full"] == 20_000
        # one entry a node, holding the oldest refused sequence: all the order needs
        oldest, _ = ingest._held[NODE]
        assert isinstance(oldest, int) and oldest == 1, (
            f"remembered {oldest if isinstance(oldest, int) else len(oldest)} "
            f"({type(oldest).__name__})")
        assert list(ingest._held) == [NODE]
        assert not any(t.done() for t in tasks)


# ---- a dead letter whose commit fails is counted once -------------------------------------


async def test_a_dead_letter_is_counted_once_however_often_its_commit_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """agent/ingest.py Ingest._on_frame counted a dead letter (metrics.dead_letters and a
    rejection by its reason) when it arrived, before its commit: while the disk is full the
    node resends it and it was counted again on every attempt, though it is one frame."""
    keys = {NODE: K1}
    link = FakeLink()
    async with gateway(tmp_path / "queue.sqlite", keys) as (ingest, _, tasks):
        real = ingest.store.commit
        failing = 3

        async def commit(frames: list[Accepted], windows: dict[str, Window]) -> None:
            nonlocal failing
            if failing:
                failing -= 1
                raise sqlite3.OperationalError("database or disk is full")
            await real(frames, windows)

        monkeypatch.setattr(ingest.store, "commit", commit)
        junk = frame(5, b"\xff\x00")  # not CBOR: a dead letter once committed
        for attempt in range(4):  # the node resends until it hears an ACK
            ingest.on_data(link, junk)
            await until(lambda: not ingest._pending_ids, f"attempt {attempt}", *tasks)
        await until(lambda: acked(link, keys).get(NODE) == [5], "the ACK", *tasks)
        m = ingest.metrics
        assert m.store_errors == 3
        assert (m.dead_letters, m.frames_rejected["cbor"]) == (1, 1)


# ---- one frame the gateway fails on costs no other frame its ACK --------------------------


async def test_a_commit_failing_on_one_frame_still_commits_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group commit that raises something other than sqlite3.Error (a bug of ours tied to
    one frame, as finding 1's OverflowError was) is not a disk problem: the frames are then
    committed one by one, every other node's frame is acknowledged, and the one that fails
    alone is counted as `internal` and not acknowledged."""
    keys = {NODE: K1, OTHER: K2}
    link = FakeLink()
    async with gateway(tmp_path / "queue.sqlite", keys) as (ingest, _, tasks):
        real = ingest.store._commit

        def commit(frames: list[Accepted], windows: dict[str, Window]) -> None:
            if any(f.node == NODE and f.seq == 13 for f in frames):
                raise OverflowError("Python int too large to convert to SQLite INTEGER")
            real(frames, windows)

        monkeypatch.setattr(ingest.store, "_commit", commit)
        ingest.on_data(link, frame(12) + frame(13) + frame(7, key=K2, node=OTHER) + frame(14))
        await until(lambda: acked(link, keys) == {NODE: [12, 14], OTHER: [7]}, "the ACKs",
                    *tasks)
        await until(lambda: not ingest._pending_ids, "the group", *tasks)
        m = ingest.metrics
        assert (m.store_errors, m.frames_rejected["internal"]) == (0, 1)
        w = ingest.windows[NODE]
        assert (w.seen(12), w.seen(13), w.seen(14)) == (True, False, True)


# ---- what the ingest remembers of the sources it logged ------------------------------------


async def test_rejections_from_ever_new_sources_are_not_remembered_without_bound(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """agent/ingest.py Ingest._logged kept every (source, kind) it logged, for ever: a BLE
    session's name holds the peer's address, so a stranger claiming a node from ever new
    addresses grew it (and the log) by one entry and one line per address."""
    keys = {NODE: K1}
    async with gateway(tmp_path / "queue.sqlite", keys) as (ingest, _, tasks):
        forged = protocol.create_mac0(ROGUE_KEY, NODE.encode(), 1, good_pack(1))
        for i in range(5000):
            link = FakeLink()
            link.name = f"ble:hci0 02:00:00:{i >> 16 & 255:02X}:{i >> 8 & 255:02X}:" \
                        f"{i & 255:02X} {NODE}"
            ingest.on_frame(link, protocol.DATA, forged)
        assert ingest.metrics.frames_rejected["mac"] == 5000
        logged = ingest._logged
        remembered = (sum(len(v) for v in logged.values()) if isinstance(logged, dict)
                      else len(logged))
        assert remembered <= 64, f"{remembered} sources remembered"
        lines = [r for r in caplog.records if "rejected frame (mac)" in r.getMessage()]
        assert 1 <= len(lines) <= 64, f"{len(lines)} log lines"
        assert "from any source" in lines[-1].getMessage()
        assert not any(t.done() for t in tasks)
