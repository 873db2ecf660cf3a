"""[queue] commit_window_ms and deliver_every_s (issue 22, SD-card wear): configuration with
one clear line per bad value, and what the gateway's ingest does with the window — slow nodes'
frames share a commit, a node with a backlog is never held back, and no ACK goes before its
commit. The power-cut scenario (hil_tests/test_powercut.py) shows the ACKs wait for the disk."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.ingest import Ingest
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import OWED_FRAMES_MAX, Accepted, Store, Window

KEYS = {b"SL-0001": bytes(range(32)), b"SL-0002": bytes(range(1, 33))}

BASE = """\
[gateway]
state_dir = "state"
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB0"

[sinks.http]
url = "http://127.0.0.1:8080/senml"
"""


def frame(node: bytes, seq: int) -> bytes:
    payload = cbor2.dumps([{-3: 1700000000 + seq, 0: "temperature", 2: 21.5}])
    return protocol.encode_frame(protocol.DATA,
                                 protocol.create_mac0(KEYS[node], node, seq, payload))


def acked(sent: list[bytes]) -> list[tuple[str, int]]:
    """(node, seq) named by the ACKs a link was sent, in order."""
    out = []
    for data in sent:
        for chunk in protocol.Deframer().feed(data):
            _, body = protocol.decode_frame(chunk or b"")
            m = protocol.parse_mac0(body)
            out += [(m.kid.decode(), s) for s in cbor2.loads(m.payload)[1]]
    return out


class Link:
    name = "ttyPACE1"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def rows(path: Path) -> set[tuple[str, int]]:
    con = sqlite3.connect(path)
    try:
        return {(n, s) for n, s in con.execute("SELECT node, seq FROM frames")}
    finally:
        con.close()


# ---------------------------------------------------------------- configuration

def test_the_defaults_pace_the_writes(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(BASE)
    q = load_config(tmp_path / "gateway.toml").queue
    assert (q.commit_window_ms, q.deliver_every_s) == (9000, 600.0)


def test_both_keys_are_read(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(
        BASE + "\n[queue]\ncommit_window_ms = 0\ndeliver_every_s = 2.5\n")
    q = load_config(tmp_path / "gateway.toml").queue
    assert (q.commit_window_ms, q.deliver_every_s) == (0, 2.5)


@pytest.mark.parametrize(("line", "says"), [
    ("commit_window_ms = -1", "queue.commit_window_ms: must be 0..10000 (milliseconds; 0: "
     "commit every frame at once), got -1"),
    ("commit_window_ms = 60000", "must be 0..10000"),
    ("commit_window_ms = 8.5", "queue.commit_window_ms: expected int, got 8.5"),
    ('commit_window_ms = "8000"', "expected int, got '8000'"),
    ("deliver_every_s = -0.5", "queue.deliver_every_s: must be 0..3600 (seconds; 0: record "
     "each delivery at once), got -0.5"),
    ("deliver_every_s = inf", "queue.deliver_every_s: must be 0..3600"),
    ("deliver_every_s = nan", "queue.deliver_every_s: must be 0..3600"),
    ("deliver_every_s = true", "queue.deliver_every_s: expected int or float, got True"),
])
def test_a_bad_value_is_one_line_naming_file_line_and_key(tmp_path: Path, line: str,
                                                           says: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BASE + f"\n[queue]\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path} line {BASE.count(chr(10)) + 3}: "), msg
    assert says in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- the window

@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Ingest, Link, Path]]:
    path = tmp_path / "queue.sqlite"
    async with Store(path) as store:
        ing = Ingest(store, KEYS, Metrics())
        ing.commit_window_s = 3600.0  # longer than any test: only an early close commits
        await ing.start()
        task = asyncio.create_task(ing.run())
        try:
            yield ing, Link(), path
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def settle() -> None:
    """Let the ingest task run as far as it can without time passing."""
    for _ in range(50):
        await asyncio.sleep(0)


async def test_slow_nodes_frames_wait_for_the_window_unacknowledged(
        running: tuple[Ingest, Link, Path]) -> None:
    ing, link, path = running
    ing.on_data(link, frame(b"SL-0001", 1) + frame(b"SL-0002", 1))
    await settle()
    assert ing.metrics.commits == 0 and rows(path) == set() and link.sent == []


async def test_a_nodes_next_frame_closes_the_window_and_every_node_is_acked_after_it(
        running: tuple[Ingest, Link, Path]) -> None:
    ing, link, path = running
    ing.on_data(link, frame(b"SL-0001", 1) + frame(b"SL-0002", 7))
    await settle()
    assert link.sent == []
    ing.committed.clear()
    ing.on_data(link, frame(b"SL-0001", 2))  # a backlog: it must not wait for the window
    await asyncio.wait_for(ing.committed.wait(), 10)
    assert ing.metrics.commits == 1
    assert rows(path) == {("SL-0001", 1), ("SL-0001", 2), ("SL-0002", 7)}
    assert sorted(acked(link.sent)) == [("SL-0001", 1), ("SL-0001", 2), ("SL-0002", 7)]


async def test_a_node_whose_last_frame_came_within_a_window_is_not_held(
        running: tuple[Ingest, Link, Path]) -> None:
    ing, link, path = running
    ing.on_data(link, frame(b"SL-0001", 1) + frame(b"SL-0001", 2))
    await asyncio.wait_for(ing.committed.wait(), 10)
    ing.committed.clear()
    ing.on_data(link, frame(b"SL-0001", 3))  # alone now, but the node sends fast
    await asyncio.wait_for(ing.committed.wait(), 10)
    assert ing.metrics.commits == 2 and ("SL-0001", 3) in rows(path)
    assert acked(link.sent)[-1] == ("SL-0001", 3)


async def test_a_resent_frame_does_not_count_as_a_backlog(
        running: tuple[Ingest, Link, Path]) -> None:
    ing, link, _ = running
    ing.on_data(link, frame(b"SL-0001", 1))
    ing.on_data(link, frame(b"SL-0001", 1))  # its retransmission: the same frame
    await settle()
    assert ing.metrics.commits == 0 and link.sent == []
    assert ing.metrics.duplicates["SL-0001"] == 1


@pytest.mark.parametrize("window_s", [0.05, 0.0])
async def test_a_short_window_or_none_commits_by_time(running: tuple[Ingest, Link, Path],
                                                      window_s: float) -> None:
    ing, link, path = running
    ing.commit_window_s = window_s
    ing.on_data(link, frame(b"SL-0002", 3))
    await asyncio.wait_for(ing.committed.wait(), 10)
    assert rows(path) == {("SL-0002", 3)} and acked(link.sent) == [("SL-0002", 3)]


async def test_a_commit_moves_only_its_nodes_windows(
        running: tuple[Ingest, Link, Path]) -> None:
    ing, link, _ = running
    ing.commit_window_s = 0.0
    ing.on_data(link, frame(b"SL-0002", 40))
    await asyncio.wait_for(ing.committed.wait(), 10)
    before = ing.windows["SL-0002"]
    ing.committed.clear()
    ing.on_data(link, frame(b"SL-0001", 9))
    await asyncio.wait_for(ing.committed.wait(), 10)
    assert ing.windows["SL-0002"] is before and before.high == 40
    assert ing.windows["SL-0001"].high == 9
    assert await ing.store.windows() == {"SL-0001": ing.windows["SL-0001"],
                                         "SL-0002": before}


# ---------------------------------------------------------------- deliveries

async def test_deliver_every_s_set_on_the_store_groups_deliveries(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    async with Store(path) as store:
        store.deliver_every_s = 3600.0
        frames = [Accepted("SL-0001", s, b"", None, pack=cbor2.dumps(
            [{-3: 1700000000 + s, 0: "temperature", 2: 21.5}]), n=1) for s in (1, 2)]
        w = Window()
        for f in frames:
            w.mark(f.seq)
        await store.commit(frames, {"SL-0001": w})
        batch = await store.next_batch(500)
        assert batch is not None
        await store.delivered_to("http", batch, ["http"])
        # on the intake log, delivered, not recorded yet: no longer waiting
        assert rows(path) == set() and (await store.depth())[0] == 0
        assert await store.cursor("http") == 0
        store.deliver_every_s = 0.0  # the next commit ends the round: the owed one recorded
        await store.commit([], {})
        assert rows(path) == set() and await store.cursor("http") == batch.last_id


async def test_a_backlog_is_recorded_every_owed_frames_max_frames(tmp_path: Path) -> None:
    """A gateway restarting more often than deliver_every_s still records its deliveries."""
    path = tmp_path / "queue.sqlite"
    async with Store(path) as store:
        store.deliver_every_s = 3600.0
        n = OWED_FRAMES_MAX + 10
        frames = [Accepted("SL-0001", s, b"", None, pack=cbor2.dumps(
            [{-3: 1700000000 + s, 0: "temperature", 2: 21.5}]), n=1) for s in range(1, n + 1)]
        w = Window()
        for f in frames:
            w.mark(f.seq)
        await store.commit(frames, {"SL-0001": w})
        cursor = 0
        while (batch := await store.next_batch(100, cursor)) is not None:
            await store.delivered_to("http", batch, ["http"])
            cursor = batch.last_id
            if await store.cursor("http"):
                break
        # the batch that took the owed frames past the bound was recorded with the others
        # (ids count from 1), and the round ended: the frames still owed to the sink are now
        # in SQLite, the delivered ones never entered it
        assert OWED_FRAMES_MAX <= cursor < OWED_FRAMES_MAX + 100
        assert await store.cursor("http") == cursor
        assert len(rows(path)) == n - cursor
