"""The queue's disk cap (agent/queue/diskcap.py, through the store and ingest)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.ingest import Ingest
from lantern.agent.metrics import Metrics
from lantern.agent.queue.diskcap import disk_bytes
from lantern.agent.queue.store import Accepted, Store, Window

CAP = 1 << 20
KEY = bytes(range(32))
NODE = "SL-0001"


def frame(seq: int, n: int = 7) -> Accepted:
    recs = [{"id": f"{NODE}:{seq}:{i}", "n": f"urn:dev:lantern:{NODE}:m{i}", "t": 1.7e9 + seq,
             "u": "Cel", "v": 20.125 + i} for i in range(n)]
    return Accepted(NODE, seq, b"cose", recs)


def queued(path: Path) -> list[str]:
    """The reading ids of the queued frames."""
    db = sqlite3.connect(path)
    try:
        return [f"{node}:{seq}:{i}" for node, seq, n in
                db.execute("SELECT node, seq, readings FROM frames ORDER BY id")
                for i in range(n)]
    finally:
        db.close()


@contextlib.asynccontextmanager
async def capped(tmp_path: Path, policy: str) -> AsyncIterator[Store]:
    async with Store(tmp_path / "queue.sqlite") as s:
        await s.limit(CAP, policy)
        yield s


async def fill(store: Store, seqs: range, stop_when_paused: bool = False,
               page: bool = True) -> int:
    """Commit frames one by one, with a status page looking every 20 frames (so the history
    fills: it is written when frames are resolved); the largest size on disk."""
    w = {NODE: Window()}
    most = 0
    for seq in seqs:
        w[NODE].mark(seq)
        await store.commit([frame(seq)], {NODE: Window(w[NODE].high, w[NODE].bits)})
        if page and seq % 20 == 19:
            await store.overview()
        most = max(most, disk_bytes(store.path))
        if stop_when_paused and store.cap.paused:
            break
    return most


async def test_evict_oldest_holds_the_cap_and_counts_every_reading(tmp_path: Path) -> None:
    async with capped(tmp_path, "evict_oldest") as store:
        most = await fill(store, range(1500))
        assert most <= CAP
        assert store.cap.evicted > 0 and store.cap.history_trimmed > 0
        left = queued(store.path)
        total = 1500 * 7
        assert len(left) + store.cap.evicted == total  # every reading kept or counted
        everything = [f"{NODE}:{s}:{i}" for s in range(1500) for i in range(7)]
        assert left == everything[-len(left):]  # the oldest went first, the newest stayed
        assert not store.cap.paused


async def test_history_gives_way_before_any_reading(tmp_path: Path) -> None:
    async with capped(tmp_path, "evict_oldest") as store:
        seq = 0
        while not store.cap.history_trimmed:
            await fill(store, range(seq, seq + 1))
            seq += 1
        assert store.cap.evicted == 0
        assert len(queued(store.path)) == seq * 7


async def test_eviction_spares_a_batch_a_sink_is_sending(tmp_path: Path) -> None:
    async with capped(tmp_path, "evict_oldest") as store:
        await fill(store, range(100))
        batch = await store.next_batch(70)  # out at the sink, upstream not answering yet
        assert batch is not None and batch.rids[0] == f"{NODE}:0:0"
        await fill(store, range(100, 1500))
        left = queued(store.path)
        assert left[:70] == batch.rids  # still there, so what the sink confirms is not lost
        assert f"{NODE}:10:0" not in left  # the rows right after the batch were evicted
        await store.delivered_to("http", batch, ["http"])
        assert store.cap.leases == {}
        assert len(queued(store.path)) + 70 + store.cap.evicted == 1500 * 7


async def test_eviction_spares_a_batch_while_any_sink_still_sends_it(tmp_path: Path) -> None:
    """Two sinks out with the same frames: one done must not lift the other's lease."""
    async with capped(tmp_path, "evict_oldest") as store:
        await fill(store, range(100))
        mqtt = await store.next_batch(70)
        http = await store.next_batch(70)
        assert mqtt is not None and http is not None and mqtt.rids == http.rids
        await store.delivered_to("mqtt", mqtt, ["mqtt", "http"])  # http still sending
        await fill(store, range(100, 1500))
        assert queued(store.path)[:70] == http.rids  # spared for the sink still sending
        assert store.cap.evicted > 0
        await store.delivered_to("http", http, ["mqtt", "http"])
        assert store.cap.leases == {}


async def test_pause_intake_then_resume_as_upstream_drains(tmp_path: Path) -> None:
    async with capped(tmp_path, "pause_intake") as store:
        most = await fill(store, range(5000), stop_when_paused=True)
        assert store.cap.paused and store.cap.evicted == 0
        assert most <= CAP
        before = queued(store.path)
        assert before[0] == f"{NODE}:0:0"  # nothing of the queue was given up
        cursor = 0
        while store.cap.paused:
            batch = await store.next_batch(100, cursor)
            assert batch is not None
            await store.delivered_to("http", batch, ["http"])
            cursor = batch.last_id
        assert store.cap.live_bytes <= store.cap.low
        assert len(queued(store.path)) < len(before)


async def test_intake_resumes_while_the_history_fills_from_the_drain(tmp_path: Path) -> None:
    """Nobody looked during the outage: the history is written as the queue drains, into
    the room the delivered frames leave; it gives way, and intake resumes before the queue
    is empty."""
    async with capped(tmp_path, "pause_intake") as store:
        await fill(store, range(20000), stop_when_paused=True, page=False)
        assert store.cap.paused and store.cap.history_trimmed == 0
        cursor = 0
        while store.cap.paused:
            batch = await store.next_batch(70, cursor)
            assert batch is not None, "queue drained, intake still paused"
            await store.delivered_to("http", batch, ["http"])
            cursor = batch.last_id
        assert store.cap.history_trimmed > 0 and queued(store.path)


async def test_no_cap_changes_nothing(tmp_path: Path) -> None:
    async with Store(tmp_path / "q.sqlite") as store:
        await store.limit(0, "pause_intake")
        await fill(store, range(50))
        assert not store.cap.paused and store.cap.evicted == 0
        assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000


async def test_too_small_a_cap_is_refused(tmp_path: Path) -> None:
    async with Store(tmp_path / "q.sqlite") as store:
        with pytest.raises(ValueError, match="too small"):
            await store.limit(100_000, "pause_intake")
        with pytest.raises(ValueError, match="policy"):
            await store.limit(CAP, "drop_newest")


# ---------------------------------------------------------------- ingest while paused


class Link:
    name = "ttyTEST"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def wire(seq: int) -> bytes:
    pack = cbor2.dumps([{-2: f"urn:dev:lantern:{NODE}:", -3: 1700000000, 0: "t", 2: 1.5}])
    return protocol.encode_frame(protocol.DATA, protocol.create_mac0(KEY, NODE.encode(), seq,
                                                                     pack))


def acked(link: Link) -> list[int]:
    out = []
    for data in link.sent:
        chunk = protocol.Deframer().feed(data)[0]
        assert chunk is not None
        m = protocol.parse_mac0(protocol.decode_frame(chunk)[1])
        out += cbor2.loads(m.payload)[1]
    return out


async def test_paused_ingest_refuses_new_frames_but_reacks_old_ones(tmp_path: Path) -> None:
    async with Store(tmp_path / "q.sqlite") as store:
        ing = Ingest(store, {NODE.encode(): KEY}, Metrics())
        await ing.start()
        task = asyncio.create_task(ing.run())
        try:
            link = Link()
            ing.on_data(link, wire(1))
            for _ in range(200):
                if acked(link):
                    break
                await asyncio.sleep(0.01)
            assert acked(link) == [1]
            store.cap.paused = True  # as make_room sets it at the cap
            ing.on_data(link, wire(2) + wire(1) + wire(3))
            await asyncio.sleep(0.1)
            assert acked(link) == [1, 1]  # seq 1 again (already safe), 2 and 3 not: node keeps them
            assert ing.metrics.frames_rejected["queue_full"] == 2
            store.cap.paused = False
            ing.on_data(link, wire(3))  # the newer one first: it waits for seq 2 (order)
            await asyncio.sleep(0.1)
            assert acked(link) == [1, 1] and ing.metrics.frames_rejected["queue_full"] == 3
            for s in (2, 3):
                ing.on_data(link, wire(s))
                for _ in range(200):
                    if acked(link)[-1] == s:
                        break
                    await asyncio.sleep(0.01)
            assert acked(link) == [1, 1, 2, 3]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---------------------------------------------------------------- config

BASE = """\
[gateway]
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB0"

[sinks.http]
url = "http://127.0.0.1:8080/senml"
"""


def test_queue_config_defaults_and_values(tmp_path: Path) -> None:
    p = tmp_path / "g.toml"
    p.write_text(BASE)
    q = load_config(p).queue
    assert (q.max_mb, q.policy, q.max_bytes) == (1024.0, "pause_intake", 1 << 30)
    p.write_text(BASE + '\n[queue]\nmax_mb = 2.5\npolicy = "evict_oldest"\n')
    q = load_config(p).queue
    assert (q.max_bytes, q.policy) == (int(2.5 * (1 << 20)), "evict_oldest")


@pytest.mark.parametrize(("extra", "message"), [
    ("max_mb = 0.5", r"line 11: queue.max_mb: must be 1..1048576"),
    ('policy = "drop"', r"line 11: queue.policy: expected \"pause_intake\" or \"evict_oldest\""),
    ("max_bytes = 5", r"line 11: queue.max_bytes: unknown key"),
    ('max_mb = "big"', r"line 11: queue.max_mb: expected int or float"),
])
def test_queue_config_errors_name_line_and_key(tmp_path: Path, extra: str, message: str) -> None:
    p = tmp_path / "g.toml"
    p.write_text(BASE + "\n[queue]\n" + extra + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(p)


async def test_a_refused_frame_that_never_returns_stops_holding_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node may have given the old frame up (its outbox was full): do not wait forever."""
    monkeypatch.setattr("lantern.agent.ingest.HOLD_MAX_S", 0.2)
    async with Store(tmp_path / "q.sqlite") as store:
        ing = Ingest(store, {NODE.encode(): KEY}, Metrics())
        await ing.start()
        task = asyncio.create_task(ing.run())
        try:
            link = Link()
            store.cap.paused = True
            ing.on_data(link, wire(5))  # refused, then never seen again
            store.cap.paused = False
            ing.on_data(link, wire(6))
            assert ing.metrics.frames_rejected["queue_full"] == 2  # 6 waits for 5
            await asyncio.sleep(0.1)
            ing.on_data(link, wire(6))  # still waiting: resends do not extend the wait...
            assert ing.metrics.frames_rejected["queue_full"] == 3
            await asyncio.sleep(0.15)
            ing.on_data(link, wire(6))  # ...which ends HOLD_MAX_S after the last progress
            for _ in range(200):
                if acked(link):
                    break
                await asyncio.sleep(0.01)
            assert acked(link) == [6]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def dead(seq: int, size: int = 700) -> Accepted:
    return Accepted(NODE, seq, bytes(size), None, "cbor: not CBOR")


def dead_rows(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [s for (s,) in db.execute("SELECT seq FROM dead_letters ORDER BY id")]
    finally:
        db.close()


async def test_dead_letters_are_bounded_without_a_cap_too(tmp_path: Path) -> None:
    """At most DEAD_LETTER_ROWS, the oldest dropped and counted; the newest kept."""
    async with Store(tmp_path / "queue.sqlite") as store:
        w = Window()
        for first in range(0, 1100, 50):
            group = [dead(s, 40) for s in range(first, first + 50)]
            for f in group:
                w.mark(f.seq)
            await store.commit(group, {NODE: Window(w.high, w.bits)})
        assert dead_rows(store.path) == list(range(100, 1100))
        assert store.cap.dead_dropped == 100


async def test_dead_letters_give_way_before_frames_and_never_pause_intake(
        tmp_path: Path) -> None:
    """Under a cap: dead letters keep to a twentieth of it; at the high mark they go before
    any undelivered frame; a queue with nothing to deliver never pauses intake."""
    async with capped(tmp_path, "pause_intake") as store:
        w = Window()
        for seq in range(400):
            w.mark(seq)
            await store.commit([dead(seq)], {NODE: Window(w.high, w.bits)})
        kept = dead_rows(store.path)
        assert kept == list(range(400 - len(kept), 400))
        assert len(kept) * 700 <= CAP // 20 and store.cap.dead_dropped == 400 - len(kept)
        assert not store.cap.paused
        # frames up to the cap: the dead letters go first, then intake pauses
        await fill(store, range(1000, 3000), stop_when_paused=True, page=False)
        assert store.cap.paused and dead_rows(store.path) == []
        assert store.cap.evicted == 0


async def test_batches_put_back_unsent_leave_no_lease(tmp_path: Path) -> None:
    """Frames arriving one by one, each younger than the batch age when the forwarder looks:
    it reads a batch and puts it back unsent, over and over. Each of those reads once left a
    lease behind (37 of 40 here): leases grew without bound, each one a term of the eviction
    query, which SQLite refuses past about 1,000 terms, so a capped gateway's commits would
    fail within the hour. The lease of a batch put back is given back."""
    from lantern.agent.queue.forward import Forwarder

    got = asyncio.Event()

    class Sink:
        name = "s"
        sent = 0

        async def send(self, batch: Any) -> None:
            self.sent += len(batch.rids)
            if self.sent >= 40:
                got.set()

    sink = Sink()
    async with capped(tmp_path, "evict_oldest") as store:
        new = asyncio.Event()
        fwd = Forwarder(store, sink, Metrics(), new, 500, 0.05)
        task = asyncio.create_task(fwd.run())
        try:
            w = Window()
            for seq in range(40):
                w.mark(seq)
                await store.commit([frame(seq, 1)], {NODE: Window(w.high, w.bits)})
                new.set()
                await asyncio.sleep(0.02)  # the street's pace: one frame at a time
            await asyncio.wait_for(got.wait(), 30)
            assert sink.sent == 40
            # the forwarder records the last delivery after send returns: the queue empties
            for _ in range(500):
                if not queued(store.path):
                    break
                await asyncio.sleep(0.02)
            assert not queued(store.path)
            assert sum(store.cap.leases.values()) == 0, store.cap.leases
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
