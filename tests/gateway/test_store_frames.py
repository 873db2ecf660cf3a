"""Frames in, SenML-JSON out (agent/queue/store.py, agent/queue/resolve.py, agent/queue/history.py).

The ACK path stores packs as the nodes sealed them; these tests follow a pack from the
commit to a sink's batch, the history and the dead letters, and the store's layout check.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.errors import ConfigError
from lantern.agent.queue import resolve as resolved
from lantern.agent.queue.history import (
    JSON_ROW,
    PACK_ROW,
    PACK_Z_ROW,
    History,
    deflate,
    inflate,
    row_records,
)
from lantern.agent.queue.layout import SCHEMA_VERSION
from lantern.agent.queue.store import Accepted, Store, Window

BT = 1764331200
NODE = "SL-0001"


def pack_bytes(seq: int, node: str = NODE, n: int = 3, t: int | float = 0,
               bad: bool = False) -> bytes:
    recs: list[dict[int, Any]] = [{0: f"m{i}", 1: "Cel", 2: 20.5 + i + seq} for i in range(n)]
    recs[0].update({-2: f"urn:dev:lantern:{node}:", -3: BT + seq + t})
    if bad:
        recs[-1][2] = float("nan")  # well-formed CBOR, not a SenML number
    return bytes(cbor2.dumps(recs, canonical=True))


def packed(seq: int, node: str = NODE, **kw: Any) -> Accepted:
    p = pack_bytes(seq, node, **kw)
    return Accepted(node, seq, b"cose:" + p, None, pack=p, n=protocol.pack_size(p))


def raw(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def commit(store: Store, frames: list[Accepted]) -> None:
    ws = {n: Window(w.high, w.bits) for n, w in (await store.windows()).items()}
    for f in frames:
        ws.setdefault(f.node, Window()).mark(f.seq)
    await store.commit(frames, ws)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "queue.sqlite") as s:
        yield s


def expected(seq: int, node: str = NODE, n: int = 3) -> list[dict[str, Any]]:
    out = protocol.resolve_pack(pack_bytes(seq, node, n), node=node)
    for i, r in enumerate(out):
        r["id"] = f"{node}:{seq}:{i}"
    return out


async def test_a_pack_is_stored_as_sealed_and_resolved_on_the_way_out(store: Store) -> None:
    await commit(store, [packed(1), packed(2)])
    rows = raw(store.path, "SELECT node, seq, readings, format, body FROM frames ORDER BY id")
    assert rows == [(NODE, 1, 3, resolved.PACK, pack_bytes(1)),
                    (NODE, 2, 3, resolved.PACK, pack_bytes(2))]
    # nothing resolved, nothing in the history: the commit did only what the ACK needs
    assert raw(store.path, "SELECT count(*) FROM recent") == [(0,)]
    batch = await store.next_batch(100)
    assert batch is not None
    assert batch.records() == expected(1) + expected(2)
    assert batch.rids == [f"{NODE}:{s}:{i}" for s in (1, 2) for i in range(3)]


async def test_a_pack_that_does_not_resolve_becomes_a_counted_dead_letter(store: Store) -> None:
    reported: list[tuple[str, int, str, str]] = []
    store.on_dead_letter = lambda *a: reported.append(a)
    await commit(store, [packed(1), packed(2, bad=True), packed(3)])
    batch = await store.next_batch(100)
    assert batch is not None
    assert batch.rids == [f"{NODE}:{s}:{i}" for s in (1, 3) for i in range(3)]
    assert [(n, s, k) for n, s, k, _ in reported] == [(NODE, 2, "senml")]
    assert "m2" in reported[0][3]  # the detail names the record
    rows = raw(store.path, "SELECT node, seq, reason, kind, body FROM dead_letters")
    assert len(rows) == 1 and rows[0][:2] == (NODE, 2) and rows[0][3:] == ("pack", pack_bytes(
        2, bad=True))
    assert rows[0][2].startswith("senml: ")
    assert raw(store.path, "SELECT seq FROM frames ORDER BY id") == [(1,), (3,)]
    assert (await store.overview())["dead_letters"] == 1
    await store.delivered_to("http", batch, ["http"])
    assert await store.depth() == (0, None)
    assert len(reported) == 1  # once


async def test_the_status_page_sees_frames_no_sink_has_taken(store: Store) -> None:
    """Upstream down: the history and the newest values still follow the nodes."""
    await commit(store, [packed(1), packed(2)])
    ov = await store.overview()
    assert ov["latest"][NODE]["m0"] == {"n": "m0", "u": "Cel", "v": 22.5, "t": BT + 2}
    rows, more, times = await store.recent(NODE, 0, 100)
    assert [(r["n"], r["t"]) for r in rows] == [(f"m{i}", BT + s) for s in (1, 2)
                                                for i in range(3)]
    assert times == [BT + 1, BT + 2] and not more
    assert ov["queue_readings"] == 6
    # the sink later takes the same frames: each is resolved once, and in the history once
    batch = await store.next_batch(100)
    assert batch is not None and batch.records() == expected(1) + expected(2)
    await store.delivered_to("http", batch, ["http"])
    assert raw(store.path, "SELECT count(*) FROM recent") == [(2,)]


async def test_every_frame_is_resolved_once_for_two_sinks_and_the_api(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = resolved.resolve

    def counting(node: str, seq: int, fmt: int, body: bytes) -> list[dict[str, Any]]:
        calls.append(seq)
        return real(node, seq, fmt, body)

    monkeypatch.setattr("lantern.agent.queue.batches.resolve", counting)
    await commit(store, [packed(s) for s in range(1, 6)])
    a = await store.next_batch(6)  # http: frames 1-2
    assert a is not None and len(a.rids) == 6
    await store.overview()  # the page: resolves 3-5
    b = await store.next_batch(100)  # ngsi_ld: 1-5, all from the cache
    assert b is not None and len(b.rids) == 15
    await store.delivered_to("http", a, ["http", "ngsi_ld"])
    await store.delivered_to("ngsi_ld", b, ["http", "ngsi_ld"])
    assert sorted(calls) == [1, 2, 3, 4, 5]
    assert raw(store.path, "SELECT seq FROM frames ORDER BY id") == [(3,), (4,), (5,)]
    assert raw(store.path, "SELECT count(*) FROM recent") == [(5,)]
    assert len(store.cache) == 3  # 1 and 2 left the queue and the cache


async def test_history_lost_in_a_crash_is_rebuilt_from_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    s = Store(path)
    await s.__aenter__()
    await commit(s, [packed(1), packed(2)])
    assert await s.next_batch(100) is not None  # resolved: history rows wait in memory
    s.db.close()  # the process dies before the next write
    s._db = None
    s._pool.shutdown()
    async with Store(path) as again:
        rows, _, _ = await again.recent(NODE, 0, 100)
        assert len(rows) == 6
        assert (await again.overview())["latest"][NODE]["m2"]["v"] == 24.5
    assert raw(path, "SELECT count(*) FROM recent") == [(2,)]  # once each


async def test_newest_values_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    async with Store(path) as s:
        await commit(s, [packed(1, n=4), packed(2, n=2)])  # m2, m3 only in the older frame
        await s.overview()
    async with Store(path) as s:
        latest = (await s.overview())["latest"][NODE]
        assert {k: v["t"] for k, v in latest.items()} == {
            "m0": BT + 2, "m1": BT + 2, "m2": BT + 1, "m3": BT + 1}
        # and a restart after rows written but before the next snapshot: replayed
        await commit(s, [packed(3, n=1)])
        await s.overview()
        s.db.close()
        s._db = None
    async with Store(path) as s:
        latest = (await s.overview())["latest"][NODE]
        assert latest["m0"]["t"] == BT + 3 and latest["m1"]["t"] == BT + 2


async def test_an_older_sample_does_not_replace_a_newer_value(store: Store) -> None:
    await commit(store, [packed(5), packed(2)])  # a backfilled frame arrives after a newer one
    latest = (await store.overview())["latest"][NODE]
    assert latest["m0"]["t"] == BT + 5 and latest["m0"]["v"] == 25.5


def test_a_one_sample_frame_is_kept_as_its_pack_deflated_others_as_compact_json() -> None:
    recs = expected(7)
    h = History()
    h.add(1, NODE, 100.0, recs, pack_bytes(7))
    mixed = [dict(r) for r in recs]
    mixed[-1]["t"] = mixed[-1]["t"] + 1  # two sample times in one frame
    h.add(2, NODE, 100.0, mixed, pack_bytes(7))
    h.add(3, NODE, 100.0, recs, None)  # records the gateway made (no pack)
    short = [{"n": f"m{i}", "u": "Cel", "v": 27.5 + i} for i in range(3)]
    assert [(t, fmt) for _, t, _, fmt, _ in h._pending] == [
        (BT + 7, PACK_Z_ROW), (BT + 7, JSON_ROW), (BT + 8, JSON_ROW), (BT + 7, JSON_ROW)]
    assert inflate(h._pending[0][4]) == pack_bytes(7)  # the pack, deflated with ZDICT
    assert [row_records(NODE, fmt, body) for _, _, _, fmt, body in h._pending] == [
        short, short[:2], short[2:], short]
    assert h.upto == 3


def test_a_pack_row_of_an_earlier_gateway_still_reads_and_a_bad_deflated_row_is_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    short = [{"n": f"m{i}", "u": "Cel", "v": 27.5 + i} for i in range(3)]
    assert row_records(NODE, PACK_ROW, pack_bytes(7)) == short  # (format 0, before issue 22)
    assert row_records(NODE, PACK_Z_ROW, deflate(pack_bytes(7))) == short
    h = History()
    bomb = deflate(bytes(64 << 10))  # inflates past any frame: never allocated whole
    for bad in (b"\x00not deflate", deflate(pack_bytes(7))[:-3], bomb):
        with pytest.raises(ValueError):
            inflate(bad)
        assert h._records(NODE, PACK_Z_ROW, bad) == []  # left out, never a traceback
    assert h._unreadable == 3
    assert caplog.text.count("no longer resolves") == 1  # logged once


async def test_a_name_that_is_only_the_prefix_keeps_its_whole_name(store: Store) -> None:
    """(A node's pack cannot have one, resolve_pack refuses it; records the gateway made can.)"""
    recs = [{"n": f"urn:dev:lantern:{NODE}:", "t": BT, "v": 1.0, "id": f"{NODE}:1:0"},
            {"n": f"urn:dev:lantern:{NODE}:x", "t": BT, "v": 2.0, "id": f"{NODE}:1:1"}]
    await commit(store, [Accepted(NODE, 1, b"", recs)])
    rows, _, _ = await store.recent(NODE, 0, 10)
    assert [r["n"] for r in rows] == [f"urn:dev:lantern:{NODE}:", "x"]


async def test_a_pack_naming_another_node_is_a_dead_letter(store: Store) -> None:
    """The kid the MAC was checked under bounds the names (resolve_pack's node=)."""
    p = pack_bytes(1, node="SL-0002")
    await commit(store, [Accepted(NODE, 1, b"", None, pack=p, n=3)])
    assert await store.next_batch(10) is None
    assert raw(store.path, "SELECT node, seq, kind FROM dead_letters") == [(NODE, 1, "pack")]


# ---------------------------------------------------------------- the layout on disk


async def test_a_new_store_is_marked_with_its_layout(store: Store) -> None:
    assert raw(store.path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def _old_queue(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, rid TEXT NOT NULL UNIQUE,
                               node TEXT NOT NULL, received_at REAL NOT NULL,
                               record TEXT NOT NULL);
        INSERT INTO readings (rid, node, received_at, record)
            VALUES ('SL-0001:1:0', 'SL-0001', 1.0, '{"n":"x","v":1}');
    """)
    db.close()


async def test_a_queue_of_the_earlier_layout_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    _old_queue(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as e:
        async with Store(path):
            pass
    msg = str(e.value)
    assert str(path) in msg and "earlier Lantern" in msg and "move the file away" in msg
    assert path.read_bytes() == before
    assert raw(path, "SELECT rid FROM readings") == [("SL-0001:1:0",)]


def test_the_demo_moves_an_earlier_queue_aside_and_starts_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A deployed gateway refuses it (above); `make demo` after an upgrade must still run."""
    from lantern.tools.street.demo import _fresh_queue_if_old

    state = tmp_path / "gateway-state"
    state.mkdir()
    _old_queue(state / "queue.sqlite")
    before = (state / "queue.sqlite").read_bytes()
    _fresh_queue_if_old(state)
    assert not state.exists()
    [aside] = tmp_path.glob("gateway-state.old-*")
    assert (aside / "queue.sqlite").read_bytes() == before  # kept, untouched
    assert "earlier Lantern" in capsys.readouterr().out
    state.mkdir()
    _fresh_queue_if_old(state)  # an empty state dir, or a queue of this layout: left alone
    assert state.exists() and len(list(tmp_path.glob("gateway-state.old-*"))) == 1


async def test_a_queue_of_a_newer_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ConfigError, match=f"newer Lantern \\(layout {SCHEMA_VERSION + 1}\\)"):
        async with Store(path):
            pass


def test_the_cache_is_bounded_and_forgets_what_every_sink_has() -> None:
    c = resolved.Cache(limit=3)
    for i in range(1, 6):
        c.put(resolved.Resolved(i, NODE, i, 0.0, [f"{NODE}:{i}:0"], "{}"))
    assert len(c) == 3 and c.get(2) is None and c.get(3) is not None  # oldest went first
    c.drop_upto(4)
    assert len(c) == 1 and c.get(5) is not None


LAYOUT_3 = """
CREATE TABLE frames (id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL,
    seq INTEGER NOT NULL, received_at REAL NOT NULL, readings INTEGER NOT NULL,
    format INTEGER NOT NULL, body BLOB NOT NULL, UNIQUE (node, seq));
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, node TEXT NOT NULL, seq INTEGER NOT NULL,
    reason TEXT NOT NULL, received_at REAL NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE sink_cursors (sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
CREATE TABLE nodes (node TEXT PRIMARY KEY, high INTEGER NOT NULL, window INTEGER NOT NULL,
    last_seen REAL NOT NULL, frames INTEGER NOT NULL, key_id BLOB);
INSERT INTO nodes VALUES ('SL-0001', 500, -9223372036854775807, 1764331200.0, 7,
                          x'0102030405060708');
INSERT INTO nodes VALUES ('SL-0002', 12, 5, 1764331200.0, 3, NULL);
INSERT INTO nodes VALUES ('bthome:porch', 40, 1, 1764331200.0, 40, NULL);
INSERT INTO sink_cursors VALUES ('http', 3);
PRAGMA user_version=3;
"""


async def test_a_queue_of_layout_3_keeps_every_window_and_frame_moving_to_layout_4(
        tmp_path: Path) -> None:
    """The replay windows move from nodes (one a node) to windows (one per node and key) in
    place: every one kept bit for bit, under the key it had; frames and cursors untouched."""
    path = tmp_path / "queue.sqlite"
    db = sqlite3.connect(path)
    db.executescript(LAYOUT_3)
    p = pack_bytes(501)
    db.execute("INSERT INTO frames (node, seq, received_at, readings, format, body) VALUES"
               " ('SL-0001', 501, 1.0, 3, 0, ?)", (p,))
    db.commit()
    db.close()
    async with Store(path) as store:
        assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(4,)]
        assert raw(path, "SELECT node, key_id, high, window FROM windows ORDER BY node") == [
            ("SL-0001", bytes.fromhex("0102030405060708"), 500, -9223372036854775807),
            ("SL-0002", b"", 12, 5),  # no key yet: the ingest adopts it (layout 2's way)
            ("bthome:porch", b"", 40, 1)]
        kw = await store.key_windows()
        assert kw[("SL-0001", bytes.fromhex("0102030405060708"))].bits == (1 << 63) + 1
        assert (await store.windows())["bthome:porch"].high == 40  # third-party adverts
        assert raw(path, "SELECT node, seq FROM frames") == [("SL-0001", 501)]
        assert raw(path, "SELECT * FROM sink_cursors") == [("http", 3)]
        assert raw(path, "SELECT node, high, frames FROM nodes ORDER BY node") == [
            ("SL-0001", 500, 7), ("SL-0002", 12, 3), ("bthome:porch", 40, 40)]
    async with Store(path):  # opened again: nothing moves twice
        assert len(raw(path, "SELECT * FROM windows")) == 3


async def test_windows_are_kept_per_key_and_nodes_high_is_the_highest_of_any(
        store: Store) -> None:
    """lantern provision reads nodes.high: the highest sequence the node id used, whichever
    key is in use now (an older key brought back counts below a newer one's numbers)."""
    k_old, k_new = b"\x01" * 8, b"\x02" * 8
    await store.commit([packed(5)], {NODE: Window(5, 1, k_old)})
    await store.commit([packed(9000)], {NODE: Window(9000, 1, k_new)})
    await store.commit([packed(6)], {NODE: Window(6, 3, k_old)})  # the old key is back
    assert raw(store.path, "SELECT key_id, high, window FROM windows ORDER BY high") == [
        (k_old, 6, 3), (k_new, 9000, 1)]
    assert raw(store.path, "SELECT high, window, key_id, frames FROM nodes") == [
        (9000, 1, k_new, 3)]
    # a window never goes back, even if handed an older one
    await store.commit([packed(7)], {NODE: Window(4, 1, k_old)})
    assert raw(store.path, f"SELECT high FROM windows WHERE key_id = x'{k_old.hex()}'") == [
        (6,)]
