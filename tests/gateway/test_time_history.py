"""The history (agent/queue/history.py) of packs anchored at a receipt the gateway stamped while
its clock was unsynchronised: corrected by the step once the clock syncs, as the sinks resolve
them; flagged (time.q bit 4) when no step will ever be known — the same as upstream."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cbor2

from lantern.agent.queue.store import Accepted, Store
from lantern.agent.timesync import GATEWAY_UNSYNCED, TimeSync
from tests.helpers.api import commit
from tests.helpers.timecheck import KernelClock

STEP = 500.0  # what NTP moves the wall clock by when it answers
REQUEST = cbor2.dumps([{0: "time.q", 2: 1, -3: 0}])  # a time request: "now"
FULL = cbor2.dumps([{0: "time.q", 2: 1, -3: -30}, {0: "uptime", 2: 40}])  # a full hold's oldest
SAMPLE = cbor2.dumps([{0: "uptime", 2: 41, -3: 1_764_331_200}])  # an ordinary pack


class Mono:
    """A monotonic clock that does not move when the wall clock steps (the kernel's)."""

    def __init__(self) -> None:
        self.lag = 0.0

    def __call__(self) -> float:
        return time.monotonic() - self.lag


def _by_name(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["n"], []).append(r)
    return out


def _upstream(store: Store) -> list[dict[str, Any]]:
    batch = store.out.next_batch(100)
    assert batch is not None
    store.cap.release(batch.first_id, batch.last_id)
    return batch.records()


async def _received(store: Store) -> list[float]:
    return [r[0] for r in store.db.execute("SELECT received_at FROM frames ORDER BY id")]


async def test_history_corrected_by_the_step_once_the_clock_syncs(tmp_path: Path) -> None:
    kernel, mono = KernelClock(False), Mono()
    ts = TimeSync(probe=kernel, mono=mono, path=tmp_path / "clock.json")
    async with Store(tmp_path / "queue.sqlite") as store:
        store.out.clock = store.history.clock = ts
        await commit(store, [Accepted("SL-0042", 6, b"cose", None, pack=REQUEST, n=1),
                             Accepted("SL-0042", 8, b"cose", None, pack=FULL, n=2),
                             Accepted("SL-0042", 9, b"cose", None, pack=SAMPLE, n=1)])
        received = await _received(store)
        # unsynchronised: the history shows what a sink would get now, flagged
        rows, _, _ = await store.recent("SL-0042", 0, 100)
        before = _by_name(rows)
        assert [r["v"] for r in before["time.q"]] == [1 | GATEWAY_UNSYNCED] * 2
        assert sorted(r["t"] for r in before["time.q"]) == [round(received[1]) - 30,
                                                            round(received[0])]
        # NTP answers: the wall clock steps, the monotonic one does not
        mono.lag += STEP
        kernel.synchronized = True
        ts._checked = -1e18  # (read the kernel again now, not after CHECK_S)
        upstream = _by_name(_upstream(store))
        rows, _, _ = await store.recent("SL-0042", 0, 100)
        overview = await store.overview()
    after = _by_name(rows)
    # the history has the corrected times and no flag of the gateway, as the sinks do
    assert sorted((r["t"], r["v"]) for r in after["time.q"]) == [
        (round(received[1] + STEP) - 30, 1), (round(received[0] + STEP), 1)], after
    assert [(r["t"], r["v"]) for r in after["uptime"]] == [
        (1_764_331_200, 41),  # the node's own time: as it was
        (round(received[1] + STEP) - 30, 40)]
    sent = upstream["urn:dev:lantern:SL-0042:time.q"]
    assert sorted((r["t"], r["v"]) for r in sent) == sorted(
        (r["t"], r["v"]) for r in after["time.q"])
    latest = overview["latest"]["SL-0042"]
    assert latest["time.q"] == {"n": "time.q", "t": round(received[0] + STEP), "v": 1}
    assert (latest["uptime"]["t"], latest["uptime"]["v"]) == (round(received[1] + STEP) - 30, 40)
    assert ts.corrected >= 2


async def test_history_keeps_the_flag_when_no_step_will_be_known(tmp_path: Path) -> None:
    """The gateway stopped before its clock synced: after the restart the span has no step,
    so upstream and the history both keep the receipt as stamped, flagged — also after the
    history is read back from disk."""
    state = tmp_path / "clock.json"
    first = TimeSync(probe=KernelClock(False), path=state)
    first.state()  # a span opens, and the gateway stops with it open
    ts = TimeSync(probe=KernelClock(True), path=state)
    async with Store(tmp_path / "queue.sqlite") as store:
        store.out.clock = store.history.clock = ts
        await commit(store, [Accepted("SL-0042", 6, b"cose", None, pack=REQUEST, n=1)])
        received = await _received(store)
        upstream = _upstream(store)
        rows, _, _ = await store.recent("SL-0042", 0, 100)
    assert upstream[0]["v"] == 1 | GATEWAY_UNSYNCED and upstream[0]["t"] == round(received[0])
    assert [(r["t"], r["v"]) for r in rows] == [(round(received[0]), 1 | GATEWAY_UNSYNCED)]
    async with Store(tmp_path / "queue.sqlite") as store:  # read back after a restart
        store.history.clock = ts
        rows, _, _ = await store.recent("SL-0042", 0, 100)
        overview = await store.overview()
        pending = store.db.execute("SELECT count(*) FROM recent_unsynced").fetchone()[0]
    assert [(r["t"], r["v"]) for r in rows] == [(round(received[0]), 1 | GATEWAY_UNSYNCED)]
    assert overview["latest"]["SL-0042"]["time.q"]["v"] == 1 | GATEWAY_UNSYNCED
    assert pending == 0  # settled: nothing left to correct


async def test_history_corrected_after_a_restart_of_the_store(tmp_path: Path) -> None:
    """Rows written flagged while unsynchronised and corrected by a later store, same clock."""
    kernel, mono = KernelClock(False), Mono()
    ts = TimeSync(probe=kernel, mono=mono, path=tmp_path / "clock.json")
    async with Store(tmp_path / "queue.sqlite") as store:
        store.out.clock = store.history.clock = ts
        await commit(store, [Accepted("SL-0042", 6, b"cose", None, pack=REQUEST, n=1)])
        received = await _received(store)
        rows, _, _ = await store.recent("SL-0042", 0, 100)
    assert rows[0]["v"] == 1 | GATEWAY_UNSYNCED
    mono.lag += STEP
    kernel.synchronized = True
    ts._checked = -1e18
    async with Store(tmp_path / "queue.sqlite") as store:
        store.out.clock = store.history.clock = ts
        rows, _, _ = await store.recent("SL-0042", 0, 100)
    assert [(r["t"], r["v"]) for r in rows] == [(round(received[0] + STEP), 1)]
