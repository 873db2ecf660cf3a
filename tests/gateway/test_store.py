"""The durable queue (agent/queue/store.py): order, delivery, durability, replay windows."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lantern.agent.queue.store import WINDOW, Accepted, Store, Window


def frame(node: str, seq: int, n: int = 1) -> Accepted:
    records = [{"id": f"{node}:{seq}:{i}", "n": f"urn:dev:lantern:{node}:t{i}", "t": 1.7e9 + seq,
                "u": "Cel", "v": 20.0 + i} for i in range(n)]
    return Accepted(node, seq, b"cose-" + str(seq).encode(), records)


def windows_for(*frames: Accepted) -> dict[str, Window]:
    ws: dict[str, Window] = {}
    for f in frames:
        ws.setdefault(f.node, Window()).mark(f.seq)
    return ws


def raw(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the database through a connection of our own: what is really on disk."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with Store(db_path) as s:
        yield s


# ---------------------------------------------------------------- queue


async def test_commit_then_next_batch_in_order_with_ids(store: Store) -> None:
    frames = [frame("SL-0001", 1, 2), frame("SL-0002", 7, 1), frame("SL-0001", 2, 2)]
    await store.commit(frames, windows_for(*frames))
    batch = await store.next_batch(100)
    assert batch is not None
    expected = [r for f in frames for r in (f.records or [])]
    assert batch.rids == [r["id"] for r in expected]
    assert batch.records() == expected
    assert json.loads(batch.body()) == expected
    assert batch.last_id - batch.first_id == len(frames) - 1  # a row per frame
    ids = [row[0] for row in raw(store.path, "SELECT id FROM frames ORDER BY id")]
    assert (batch.first_id, batch.last_id) == (ids[0], ids[-1])
    assert not batch.full  # everything there is, and room for more

    first3 = await store.next_batch(3)  # whole frames: 2 + 1 readings, the next would not fit
    assert first3 is not None and first3.full
    assert first3.rids == batch.rids[:3]
    assert first3.first_id == batch.first_id
    two = await store.next_batch(2)
    assert two is not None and two.full and two.rids == batch.rids[:2]


async def test_a_frame_is_never_split_and_a_big_one_goes_alone(store: Store) -> None:
    frames = [frame("SL-0001", 1, 5), frame("SL-0001", 2, 1)]
    await store.commit(frames, windows_for(*frames))
    batch = await store.next_batch(3)
    assert batch is not None and batch.full and len(batch.rids) == 5
    assert batch.first_id == batch.last_id


async def test_empty_queue_has_no_batch(store: Store) -> None:
    assert await store.next_batch(10) is None
    assert await store.depth() == (0, None)


async def test_delivered_removes_exactly_that_batch(store: Store) -> None:
    frames = [frame("SL-0001", s, 2) for s in range(1, 4)]  # 6 readings
    await store.commit(frames, windows_for(*frames))
    batch = await store.next_batch(4)
    assert batch is not None and len(batch.rids) == 4
    # readings that arrive while the batch is in flight must survive its deletion
    late = frame("SL-0001", 4, 1)
    await store.commit([late], windows_for(*frames, late))
    await store.delivered(batch)
    rest = await store.next_batch(100)
    assert rest is not None
    assert rest.rids == ["SL-0001:3:0", "SL-0001:3:1", "SL-0001:4:0"]
    assert rest.first_id > batch.last_id
    assert (await store.depth())[0] == 3
    await store.delivered(rest)
    assert await store.next_batch(100) is None


async def test_same_reading_id_is_queued_once(store: Store) -> None:
    f = frame("SL-0001", 5, 2)
    await store.commit([f], windows_for(f))
    await store.commit([f], windows_for(f))
    batch = await store.next_batch(100)
    assert batch is not None and batch.rids == ["SL-0001:5:0", "SL-0001:5:1"]


async def test_dead_letter_is_kept_apart_from_readings(store: Store) -> None:
    dead = Accepted("SL-0001", 9, b"\xd1\x84authentic", None, "senml: v is not a finite number")
    await store.commit([dead], windows_for(dead))
    assert await store.next_batch(10) is None
    rows = raw(store.path, "SELECT node, seq, reason, kind, body FROM dead_letters")
    assert rows == [("SL-0001", 9, "senml: v is not a finite number", "cose",
                     b"\xd1\x84authentic")]
    assert (await store.windows())["SL-0001"].seen(9) is True


# ---------------------------------------------------------------- durability


async def test_rows_survive_close_and_reopen(db_path: Path) -> None:
    frames = [frame("SL-0001", s, 3) for s in range(10)]
    async with Store(db_path) as s:
        await s.commit(frames, windows_for(*frames))
        before = await s.next_batch(1000)
    assert before is not None
    async with Store(db_path) as s:
        after = await s.next_batch(1000)
        assert after == before
        assert (await s.depth())[0] == 30
    # and they are in the file itself, read through an unrelated connection
    assert raw(db_path, "SELECT count(*), sum(readings) FROM frames") == [(10, 30)]
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_delivered_rows_stay_deleted_after_reopen(db_path: Path) -> None:
    frames = [frame("SL-0001", s) for s in range(4)]
    async with Store(db_path) as s:
        await s.commit(frames, windows_for(*frames))
        batch = await s.next_batch(2)
        assert batch is not None
        await s.delivered(batch)
    async with Store(db_path) as s:
        rest = await s.next_batch(100)
        assert rest is not None and rest.rids == ["SL-0001:2:0", "SL-0001:3:0"]


async def test_windows_persist_across_reopen(db_path: Path) -> None:
    frames = [frame("SL-0001", s) for s in (3, 5, 6, 9)] + [frame("SL-0002", 1000)]
    ws = windows_for(*frames)
    async with Store(db_path) as s:
        await s.commit(frames, ws)
    async with Store(db_path) as s:
        got = await s.windows()
    assert got == ws
    w = got["SL-0001"]
    assert [w.seen(q) for q in range(3, 11)] == [True, False, True, True, False, False, True,
                                                 False]
    assert raw(db_path, "SELECT node, frames FROM nodes ORDER BY node") == [
        ("SL-0001", 4), ("SL-0002", 1)]


async def test_full_window_persists(db_path: Path) -> None:
    """64 consecutive frames set every bit of the window, bit 63 included."""
    frames = [frame("SL-0001", s) for s in range(WINDOW)]
    ws = windows_for(*frames)
    assert ws["SL-0001"].bits == (1 << WINDOW) - 1
    async with Store(db_path) as s:
        await s.commit(frames, ws)
    async with Store(db_path) as s:
        got = await s.windows()
        assert (await s.depth())[0] == WINDOW
    assert got == ws


async def test_window_of_a_long_running_node_persists(db_path: Path) -> None:
    """Frame after frame, as a node in the field sends them: each commit carries the window."""
    async with Store(db_path) as s:
        ws: dict[str, Window] = {}
        for seq in range(100):
            f = frame("SL-0001", seq)
            ws.setdefault("SL-0001", Window()).mark(seq)
            await s.commit([f], ws)
    async with Store(db_path) as s:
        assert (await s.windows())["SL-0001"] == ws["SL-0001"]
        assert (await s.depth())[0] == 100


# ---------------------------------------------------------------- rollback


async def test_failed_commit_rolls_back_completely(store: Store) -> None:
    good = frame("SL-0001", 1, 2)
    await store.commit([good], windows_for(good))
    before_windows = await store.windows()
    before_nodes = raw(store.path, "SELECT * FROM nodes")

    dead = Accepted("SL-0001", 3, b"x", None, "senml: bad")
    orphan = frame("SL-0009", 1)  # no window for SL-0009 in the dict: the commit fails late
    ws = windows_for(good, frame("SL-0001", 2), dead)
    with pytest.raises(KeyError):
        await store.commit([frame("SL-0001", 2, 2), dead, orphan], ws)

    batch = await store.next_batch(100)
    assert batch is not None and batch.rids == ["SL-0001:1:0", "SL-0001:1:1"]
    assert raw(store.path, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert raw(store.path, "SELECT * FROM nodes") == before_nodes
    assert await store.windows() == before_windows

    # the store is still usable after the failure
    nxt = frame("SL-0001", 2)
    await store.commit([nxt], windows_for(good, nxt))
    assert (await store.depth())[0] == 3


async def test_commit_of_unserialisable_record_rolls_back(store: Store) -> None:
    bad = Accepted("SL-0001", 1, b"x", [{"id": "SL-0001:1:0", "vs": object()}])
    ok = frame("SL-0001", 2)
    with pytest.raises(TypeError):
        await store.commit([ok, bad], windows_for(ok, bad))
    assert await store.next_batch(10) is None
    assert await store.windows() == {}


# ---------------------------------------------------------------- depth


async def test_depth_counts_and_ages(store: Store) -> None:
    assert await store.depth() == (0, None)
    old = [frame("SL-0001", 1, 2)]
    await store.commit(old, windows_for(*old))
    await asyncio.sleep(0.3)
    new = [frame("SL-0001", 2, 3)]
    await store.commit(new, windows_for(*old, *new))
    n, age = await store.depth()
    assert n == 5
    assert age is not None and 0.3 <= age < 5.0
    batch = await store.next_batch(2)
    assert batch is not None
    await store.delivered(batch)
    n, age = await store.depth()
    assert n == 3
    assert age is not None and 0.0 <= age < 0.3


# ---------------------------------------------------------------- Window


def test_window_new_seen_and_marked() -> None:
    w = Window()
    assert w.seen(0) is False
    w.mark(0)
    assert w.seen(0) is True
    assert w.seen(1) is False


def test_window_reordering_inside_the_window() -> None:
    w = Window()
    w.mark(10)
    assert w.seen(8) is False and w.seen(9) is False
    w.mark(8)
    assert (w.seen(8), w.seen(9), w.seen(10)) == (True, False, True)
    w.mark(9)
    assert w.high == 10
    assert [w.seen(s) for s in (7, 8, 9, 10, 11)] == [False, True, True, True, False]


def test_window_edges() -> None:
    w = Window()
    w.mark(100)
    assert w.seen(100 - (WINDOW - 1)) is False  # oldest slot still in the window
    assert w.seen(100 - WINDOW) is None  # just outside: too old to tell
    assert w.seen(0) is None
    w.mark(100 - (WINDOW - 1))
    assert w.seen(100 - (WINDOW - 1)) is True
    assert w.bits < 1 << WINDOW


@pytest.mark.parametrize("jump", [WINDOW - 1, WINDOW, WINDOW + 1, 1000, 2**40])
def test_window_jumps(jump: int) -> None:
    w = Window()
    w.mark(5)
    w.mark(5 + jump)
    assert w.high == 5 + jump
    assert w.seen(5 + jump) is True
    assert w.seen(5) is (True if jump < WINDOW else None)
    # nothing in between was accepted
    for s in range(max(6, 5 + jump - WINDOW + 1), 5 + jump):
        assert w.seen(s) is False
    assert 0 < w.bits < 1 << WINDOW


@settings(max_examples=200, deadline=None)
@given(perm=st.permutations(range(WINDOW)), base=st.integers(0, 2**48))
def test_window_permutation_is_accepted_once_each(perm: list[int], base: int) -> None:
    w = Window()
    for off in perm:
        assert w.seen(base + off) is False
        w.mark(base + off)
        assert w.seen(base + off) is True
    for off in perm:  # everything again: all duplicates, none too old
        assert w.seen(base + off) is True
    assert w.high == base + WINDOW - 1
    assert w.bits == (1 << WINDOW) - 1


@settings(max_examples=300, deadline=None)
@given(seqs=st.lists(st.integers(0, 400), max_size=200))
def test_window_matches_a_reference_model(seqs: list[int]) -> None:
    """Any stream: accepted exactly once, duplicates recognised, too-old ones reported as None."""
    w, accepted, high = Window(), set[int](), -1
    for s in seqs:
        if s <= high - WINDOW:
            expected: bool | None = None
        else:
            expected = s in accepted
        assert w.seen(s) is expected
        if expected is False:
            w.mark(s)
            accepted.add(s)
            high = max(high, s)
        assert w.high == high
        assert 0 <= w.bits < 1 << WINDOW
