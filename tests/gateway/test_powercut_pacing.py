"""Pacing the gateway's writes for an SD card (issue 22), without moving an ACK before its
commit: the group-commit window (ingest.COMMIT_WINDOW_S) and deliveries recorded in groups
(store.DELIVER_EVERY_S). The power-cut scenario (hil_tests/test_powercut.py) shows the ACKs
still wait for the disk; these show what each lever does, on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2
import pytest

from lantern.agent import ingest as ingest_mod
from lantern.agent import protocol
from lantern.agent.ingest import Ingest
from lantern.agent.metrics import Metrics
from lantern.agent.queue import intake
from lantern.agent.queue import store as store_mod
from lantern.agent.queue.store import Accepted, Store, Window

KEY = bytes(range(32))
NODE = b"SL-0001"
NODES = (NODE, b"SL-0002", b"SL-0003")


def mac0(seq: int, node: bytes = NODE) -> bytes:
    payload = cbor2.dumps([{-3: 1700000000 + seq, 0: "temperature", 2: 21.5}])
    return protocol.create_mac0(KEY, node, seq, payload)


def frame(seq: int, node: bytes = NODE) -> bytes:
    return protocol.encode_frame(protocol.DATA, mac0(seq, node))


class Link:
    name = "ttyPACE0"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def rows(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT count(*) FROM frames").fetchone()[0])
    finally:
        con.close()


def log_path(queue: Path) -> Path:
    return queue.with_name(queue.name + intake.SUFFIX)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Ingest, Link, Path]]:
    path = tmp_path / "queue.sqlite"
    async with Store(path) as store:
        ing = Ingest(store, dict.fromkeys(NODES, KEY), Metrics())
        await ing.start()
        task = asyncio.create_task(ing.run())
        try:
            yield ing, Link(), path
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_commit_window_holds_frames_until_it_is_full_then_acks_them_together(
        running: tuple[Ingest, Link, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_mod, "COMMIT_WINDOW_S", 3600.0)
    monkeypatch.setattr(ingest_mod, "COMMIT_FRAMES", 3)
    ing, link, path = running
    # one frame from each of three slow nodes (two back to back from one node would close
    # the window: that node drains a backlog or samples fast)
    ing.on_data(link, frame(1, NODES[0]) + frame(1, NODES[1]))
    for _ in range(50):  # the loop runs the ingest task: it must keep the window open
        await asyncio.sleep(0)
    assert ing.metrics.commits == 0 and link.sent == [] and rows(path) == 0
    ing.committed.clear()
    ing.on_data(link, frame(1, NODES[2]))  # the third frame fills it: committed at once
    await asyncio.wait_for(ing.committed.wait(), 10)
    assert ing.metrics.commits == 1 and rows(path) == 3
    assert len(link.sent) == 3  # one ACK per node, each sent after the one commit


async def test_a_frame_whose_node_waits_awake_is_committed_at_once_with_what_waits(
        running: tuple[Ingest, Link, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A BLE session's frame (awake=True): a battery node keeps its radio on until the ACK,
    so the window does not hold it; the slow serial frames waiting share its commit."""
    monkeypatch.setattr(ingest_mod, "COMMIT_WINDOW_S", 3600.0)
    ing, link, path = running
    ble = Link()
    ble.name = "ble:hci0 F0:00:00:00:01:01 SL-0003"
    ing.on_data(link, frame(1, NODES[0]))
    for _ in range(50):
        await asyncio.sleep(0)
    assert ing.metrics.commits == 0 and rows(path) == 0
    assert ing.on_frame(ble, protocol.DATA, mac0(1, NODES[2]), awake=True) == "SL-0003"
    await asyncio.wait_for(ing.committed.wait(), 10)
    assert ing.metrics.commits == 1 and rows(path) == 2
    assert len(ble.sent) == 1 and len(link.sent) == 1


async def test_without_a_window_a_frame_is_committed_as_it_comes(
        running: tuple[Ingest, Link, Path]) -> None:
    # an Ingest made without configuration commits at once; the gateway sets its window
    # from [queue] commit_window_ms (default 8000: tests/gateway/test_queue_pacing.py)
    assert ingest_mod.COMMIT_WINDOW_S == 0.0 and running[0].window_s == 0.0
    ing, link, path = running
    ing.on_data(link, frame(1))
    await asyncio.wait_for(ing.committed.wait(), 10)
    assert rows(path) == 1 and len(link.sent) == 1


async def test_deliveries_are_recorded_together_and_count_as_delivered_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "DELIVER_EVERY_S", 3600.0)
    path = tmp_path / "queue.sqlite"
    async with Store(path) as store:
        frames = [Accepted("SL-0001", s, b"", None, pack=cbor2.dumps(
            [{-3: 1700000000 + s, 0: "temperature", 2: 21.5}]), n=1) for s in range(1, 5)]
        w = Window()
        for f in frames:
            w.mark(f.seq)
        await store.commit(frames, {"SL-0001": w})
        first = await store.next_batch(2)
        assert first is not None
        await store.delivered_to("http", first, ["http"])
        second = await store.next_batch(2, first.last_id)
        assert second is not None
        await store.delivered_to("http", second, ["http"])
        # nothing recorded in SQLite yet: the frames are on the intake log, and the round's
        # end records both deliveries in one transaction
        assert rows(path) == 0
        assert [r[2] for rs, _ in intake.read(log_path(path)) for r in rs] == [1, 2, 3, 4]
        assert (await store.depth())[0] == 0  # and none of them is waiting
        assert await store.cursor("http") == 0
        assert len(store.cap.leases) == 2  # both batches stay out of eviction's reach
    # closing records what was owed (nothing is sent again after a clean stop), and both
    # leases end with it; the frames every sink had never entered the frames table, and
    # their ids are never given again
    assert not store.cap.leases and intake.read(log_path(path)) == []
    async with Store(path) as again:
        assert rows(path) == 0 and await again.cursor("http") == second.last_id
        await again.commit([Accepted("SL-0001", 5, b"", None, pack=frames[0].pack, n=1)],
                           {"SL-0001": w})
        batch = await again.next_batch(10, second.last_id)
        assert batch is not None and batch.first_id == second.last_id + 1
