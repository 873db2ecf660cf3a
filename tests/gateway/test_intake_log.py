"""The intake log (agent/queue/intake.py): what an ACK waits for when deliveries are recorded
in rounds. A gateway that dies before its round ends (a crash here: the process exits
without closing anything) finds its acknowledged frames on the log when it starts again."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2
import pytest

from lantern.agent.errors import ConfigError
from lantern.agent.queue import intake
from lantern.agent.queue.store import Accepted, Store, Window
from lantern.tools.field.provision_steps import gateway_mark

NODE = "SL-0001"

# A gateway's store that takes frames and dies before its round ends: os._exit, nothing
# closed or flushed by Python (the log's appends were synced when each commit returned).
CRASH = """
import asyncio, os, sys
import cbor2
from lantern.agent.queue.store import Accepted, Store, Window

async def main(path, node, seqs):
    store = Store(path)
    await store.__aenter__()
    store.deliver_every_s = 3600.0
    w = Window()
    for group in seqs:
        frames = [Accepted(node, s, b"", None, n=1,
                           pack=cbor2.dumps([{-3: 1700000000 + s, 0: "temperature", 2: 21.5}]))
                  for s in group]
        for f in frames:
            w.mark(f.seq)
        await store.commit(frames, {node: w})
    os._exit(0)

asyncio.run(main(__import__("pathlib").Path(sys.argv[1]), sys.argv[2],
                 [[int(s) for s in g.split(",")] for g in sys.argv[3:]]))
"""


def crash_after(path: Path, *groups: tuple[int, ...], node: str = NODE) -> None:
    """A store process that commits each group (one intake record each), then dies."""
    subprocess.run([sys.executable, "-c", CRASH, str(path), node,
                    *(",".join(map(str, g)) for g in groups)], check=True, timeout=60)


def log_of(queue: Path) -> Path:
    return queue.with_name(queue.name + intake.SUFFIX)


def frames_in(queue: Path) -> list[tuple[str, int]]:
    con = sqlite3.connect(queue)
    try:
        return [(n, s) for n, s in con.execute("SELECT node, seq FROM frames ORDER BY id")]
    finally:
        con.close()


def pack(seq: int) -> bytes:
    return cbor2.dumps([{-3: 1700000000 + seq, 0: "temperature", 2: 21.5}])


@contextlib.asynccontextmanager
async def paced(queue: Path) -> AsyncIterator[Store]:
    """A store that records deliveries in rounds (its frames go to the intake log)."""
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        yield store


async def take(store: Store, w: Window, *seqs: int) -> None:
    """One group commit of NODE's frames `seqs`, marked in its window w."""
    for s in seqs:
        w.mark(s)
    await store.commit([Accepted(NODE, s, b"", None, pack=pack(s), n=1) for s in seqs],
                       {NODE: w})


async def test_frames_acknowledged_from_the_log_survive_a_crash_with_their_windows(
        tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    crash_after(queue, (1, 2), (3,))
    assert frames_in(queue) == []  # never in SQLite before the crash
    assert [r[2] for rows, _ in intake.read(log_of(queue)) for r in rows] == [1, 2, 3]
    async with Store(queue) as store:
        assert frames_in(queue) == [(NODE, 1), (NODE, 2), (NODE, 3)]
        assert intake.read(log_of(queue)) == []  # recorded: the log started over
        windows = await store.windows()
        assert windows[NODE].high == 3 and windows[NODE].seen(2) is True
        overview = await store.overview()
        assert overview["queue_readings"] == 3 and overview["nodes"][NODE]["frames"] == 3
        batch = await store.next_batch(10)
        assert batch is not None and len(batch.rids) == 3


async def test_frames_every_sink_has_leave_with_the_round_and_enter_only_the_history(
        tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    async with paced(queue) as store:
        await take(store, Window(), 1, 2, 3)
        batch = await store.next_batch(2)
        assert batch is not None
        await store.delivered_to("http", batch, ["http"])
        assert (await store.depth())[0] == 1  # the third still waits
    # the round ended at close: the two delivered frames never entered the frames table,
    # the third waits there; the history has all that was resolved
    assert frames_in(queue) == [(NODE, 3)]
    async with Store(queue) as again:
        readings, _, _ = await again.recent(NODE, 0, 100)
        assert sorted(r["t"] for r in readings) == [1700000001, 1700000002, 1700000003]
        assert await again.cursor("http") == batch.last_id


async def test_a_torn_append_is_where_the_log_ends(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    crash_after(queue, (1,), (2,))
    log = log_of(queue)
    whole = log.stat().st_size
    with open(log, "r+b") as f:
        f.truncate(whole - 3)  # the power went while the second record was written
    assert [r[2] for rows, _ in intake.read(log) for r in rows] == [1]
    async with Store(queue) as store:
        assert frames_in(queue) == [(NODE, 1)]  # (seq 2 was never acknowledged)
        store.deliver_every_s = 3600.0
        w = (await store.windows())[NODE]
        w.mark(2)
        await store.commit([Accepted(NODE, 2, b"", None, pack=pack(2), n=1)], {NODE: w})
        assert [r[2] for rows, _ in intake.read(log) for r in rows] == [2]


async def test_records_of_a_round_already_recorded_are_not_read_again(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    async with paced(queue) as store:
        w = Window()
        for s in (1, 2):  # two records of the same size
            await take(store, w, s)
        batch = await store.next_batch(100)
        assert batch is not None
        await store.delivered_to("http", batch, ["http"])
    # the round ended at close; the next one's first record (the same size again) lands
    # over the first, and the second of the old round follows it whole, CRC and all
    crash_after(queue, (3,))
    assert [r[2] for rows, _ in intake.read(log_of(queue)) for r in rows] == [3]
    async with Store(queue):
        assert frames_in(queue) == [(NODE, 3)]  # not seq 2 again: it was delivered


async def test_a_log_that_is_not_one_is_refused_with_one_line_and_kept(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    async with Store(queue):
        pass
    log_of(queue).write_bytes(b"this is not an intake log at all")
    with pytest.raises(ConfigError, match=r"not an intake log .*may hold acknowledged frames"):
        async with Store(queue):
            pass
    assert log_of(queue).read_bytes() == b"this is not an intake log at all"


async def test_a_full_disk_under_the_log_fails_the_commit_as_sqlite_does_and_loses_nothing(
        tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    async with paced(queue) as store:
        w = Window()
        await take(store, w, 1)
        assert store._log is not None
        fd = store._log._fd
        saved = os.dup(fd)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)  # the log's file now answers ENOSPC, as a full card does
        try:
            w2 = Window(w.high, w.bits)
            w2.mark(2)
            with pytest.raises(sqlite3.OperationalError, match=r"intake log .*space"):
                await store.commit([Accepted(NODE, 2, b"", None, pack=pack(2), n=1)],
                                   {NODE: w2})
            assert (await store.depth())[0] == 1  # not taken: its ACK is not sent
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            os.close(full)
        await store.commit([Accepted(NODE, 2, b"", None, pack=pack(2), n=1)], {NODE: w2})
        assert (await store.depth())[0] == 2
    assert frames_in(queue) == [(NODE, 1), (NODE, 2)]


def test_provision_sees_the_sequences_still_on_the_log(tmp_path: Path) -> None:
    """A new key starts above every sequence the gateway took, on the log included."""
    queue = tmp_path / "queue.sqlite"
    crash_after(queue, (40, 41))
    assert frames_in(queue) == []
    mark = gateway_mark(queue, NODE)
    assert mark.high == 41
