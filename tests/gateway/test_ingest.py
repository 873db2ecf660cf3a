"""Link bytes → verified, committed, acknowledged frames (agent/ingest.py), real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cobs import cobs

from lantern.agent import protocol
from lantern.agent.errors import AuthError
from lantern.agent.ingest import Ingest
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import WINDOW, Store

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
N1, N2 = b"SL-0001", b"SL-0002"
KEYS = {N1: K1, N2: K2}
KEY_OF = {"SL-0001": K1, "SL-0002": K2}


def pack(node: bytes = N1, value: Any = 21.5) -> bytes:
    bn = f"urn:dev:lantern:{node.decode()}:"
    return cbor2.dumps([{-2: bn, -3: 1700000000, 0: "temperature", 1: "Cel", 2: value}])


def data_frame(seq: int, node: bytes = N1, key: bytes | None = None,
               payload: bytes | None = None) -> bytes:
    key = KEYS[node] if key is None else key
    payload = pack(node) if payload is None else payload
    return protocol.encode_frame(protocol.DATA, protocol.create_mac0(key, node, seq, payload))


def raw_frame(raw: bytes) -> bytes:
    """Wire bytes for an arbitrary (type + body + CRC) byte string."""
    return b"\x00" + cobs.encode(raw) + b"\x00"


class FakeLink:
    """Collects what the gateway sends; optionally looks at the database at that moment."""

    def __init__(self, name: str = "ttyFAKE0", db: Path | None = None) -> None:
        self.name = name
        self.sent: list[bytes] = []
        self.db = db
        self.rows_at_send: list[list[str]] = []

    def send(self, data: bytes) -> None:
        if self.db is not None:
            con = sqlite3.connect(self.db)
            try:
                self.rows_at_send.append(queued_rids(con))
            finally:
                con.close()
        self.sent.append(data)


def acks(link: FakeLink) -> list[tuple[str, list[int], int]]:
    """Verify every frame sent back as an ACK; (node, seqs, time_ms) each."""
    out = []
    for data in link.sent:
        chunks = protocol.Deframer().feed(data)
        assert len(chunks) == 1 and chunks[0] is not None
        ftype, body = protocol.decode_frame(chunks[0])
        assert ftype == protocol.ACK
        m = protocol.parse_mac0(body)
        node = m.kid.decode()
        protocol.verify_mac0(KEY_OF[node], m)  # raises AuthError if not made with the node key
        payload = cbor2.loads(m.payload)
        assert set(payload) == {1, 2}
        assert m.seq == max(payload[1])
        out.append((node, payload[1], payload[2]))
    return out


def queued_rids(con: sqlite3.Connection) -> list[str]:
    """The reading ids of every queued frame (a frame holds `readings` of them)."""
    return [f"{node}:{seq}:{i}" for node, seq, n in
            con.execute("SELECT node, seq, readings FROM frames ORDER BY id") for i in range(n)]


def rids(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return queued_rids(con)
    finally:
        con.close()


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def quiet(ing: Ingest) -> None:
    """Let the commit task run until nothing is pending any more (then a little longer)."""
    await until(lambda: not getattr(ing, "_pending", None)
                and not getattr(ing, "_pending_ids", None))
    await asyncio.sleep(0.03)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@contextlib.asynccontextmanager
async def running(db: Path) -> AsyncIterator[Ingest]:
    async with Store(db) as store:
        ing = Ingest(store, KEYS, Metrics())
        await ing.start()
        task = asyncio.create_task(ing.run())
        try:
            yield ing
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def ing(db_path: Path) -> AsyncIterator[Ingest]:
    async with running(db_path) as i:
        yield i


@pytest.fixture
def link(db_path: Path) -> FakeLink:
    return FakeLink(db=db_path)


# ---------------------------------------------------------------- the good path


async def test_valid_frame_is_committed_and_acked_once(ing: Ingest, link: FakeLink,
                                                       db_path: Path) -> None:
    t0 = time.time_ns() // 1_000_000
    ing.on_data(link, data_frame(42))
    await until(lambda: len(link.sent) >= 1)
    await quiet(ing)
    assert len(link.sent) == 1
    [(node, seqs, now_ms)] = acks(link)
    assert (node, seqs) == ("SL-0001", [42])
    assert t0 - 1000 <= now_ms <= time.time_ns() // 1_000_000 + 1000
    # the pack as the node sealed it; resolved only on its way upstream
    assert rows(db_path, "SELECT node, seq, readings, body FROM frames") == [
        ("SL-0001", 42, 1, pack())]
    batch = await ing.store.next_batch(10)
    assert batch is not None and batch.rids == ["SL-0001:42:0"]
    assert batch.records()[0]["n"] == "urn:dev:lantern:SL-0001:temperature"
    assert ing.metrics.frames_received["SL-0001"] == 1
    assert ing.metrics.readings_stored == 1
    assert ing.metrics.acks_sent == 1
    assert not ing.metrics.frames_rejected


async def test_ack_is_not_valid_under_another_key(ing: Ingest, link: FakeLink) -> None:
    ing.on_data(link, data_frame(1))
    await until(lambda: len(link.sent) == 1)
    _, body = protocol.decode_frame(protocol.Deframer().feed(link.sent[0])[0] or b"")
    with pytest.raises(AuthError):
        protocol.verify_mac0(K2, protocol.parse_mac0(body))


async def test_ack_only_after_commit(ing: Ingest, link: FakeLink) -> None:
    for seq in range(1, 6):
        ing.on_data(link, data_frame(seq))
        await until(lambda n=seq: len(link.sent) >= n)
    acked = [s for _, seqs, _ in acks(link) for s in seqs]
    assert acked == [1, 2, 3, 4, 5]
    # at the moment each ACK left, the readings it names were already on disk
    for (_, seqs, _), on_disk in zip(acks(link), link.rows_at_send, strict=True):
        for s in seqs:
            assert f"SL-0001:{s}:0" in on_disk


async def test_frames_arriving_together_share_one_commit_and_ack(ing: Ingest,
                                                                 link: FakeLink) -> None:
    ing.on_data(link, b"".join(data_frame(s) for s in (7, 8, 9)))
    await until(lambda: len(link.sent) >= 1)
    await quiet(ing)
    assert [(n, s) for n, s, _ in acks(link)] == [("SL-0001", [7, 8, 9])]
    assert ing.metrics.commits == 1
    assert link.rows_at_send == [["SL-0001:7:0", "SL-0001:8:0", "SL-0001:9:0"]]


async def test_frame_split_across_many_reads(ing: Ingest, link: FakeLink, db_path: Path) -> None:
    wire = data_frame(3) + data_frame(4)
    for i in range(len(wire)):
        ing.on_data(link, wire[i:i + 1])
    await until(lambda: sum(len(s) for _, s, _ in acks(link)) >= 2)
    await quiet(ing)
    assert sorted(s for _, seqs, _ in acks(link) for s in seqs) == [3, 4]
    assert len(rids(db_path)) == 2
    assert not ing.metrics.frames_rejected


async def test_two_nodes_interleaved(ing: Ingest, link: FakeLink, db_path: Path) -> None:
    wire = b""
    for seq in (1, 2, 3):
        wire += data_frame(seq, N1) + data_frame(seq, N2)
    # two at a time so that several group commits happen
    for i in range(0, len(wire), 37):
        ing.on_data(link, wire[i:i + 37])
        await asyncio.sleep(0)
    await until(lambda: sum(len(s) for _, s, _ in acks(link)) >= 6)
    await quiet(ing)
    got: dict[str, list[int]] = {}
    for node, seqs, _ in acks(link):  # acks() verifies each with its own node's key
        got.setdefault(node, []).extend(seqs)
    assert {n: sorted(s) for n, s in got.items()} == {"SL-0001": [1, 2, 3], "SL-0002": [1, 2, 3]}
    assert sorted(rids(db_path)) == [
        f"{n}:{s}:0" for n in ("SL-0001", "SL-0002") for s in (1, 2, 3)]
    assert ing.metrics.frames_received == {"SL-0001": 3, "SL-0002": 3}
    assert not ing.metrics.duplicates


async def test_many_consecutive_frames_from_one_node(ing: Ingest, link: FakeLink,
                                                     db_path: Path) -> None:
    """A node in the field sends frame after frame; more than a window's worth must work."""
    n = 2 * WINDOW + 10
    for seq in range(n):
        ing.on_data(link, data_frame(seq))
        await until(lambda s=seq: s in {q for _, seqs, _ in acks(link) for q in seqs}
                    or ing.metrics.store_errors > 0, timeout=2.0)
        assert ing.metrics.store_errors == 0, f"commit failed at seq {seq}"
    assert len(rids(db_path)) == n


# ---------------------------------------------------------------- duplicates and replays


async def test_duplicate_is_reacked_counted_and_stored_once(ing: Ingest, link: FakeLink,
                                                            db_path: Path) -> None:
    wire = data_frame(10)
    ing.on_data(link, wire)
    await until(lambda: len(link.sent) == 1)
    await quiet(ing)
    ing.on_data(link, wire)  # the node did not hear our ACK
    await until(lambda: len(link.sent) == 2)
    await quiet(ing)
    assert [(n, s) for n, s, _ in acks(link)] == [("SL-0001", [10]), ("SL-0001", [10])]
    assert ing.metrics.duplicates["SL-0001"] == 1
    assert rids(db_path) == ["SL-0001:10:0"]
    assert rows(db_path, "SELECT frames FROM nodes") == [(1,)]
    assert ing.metrics.readings_stored == 1


async def test_duplicate_while_commit_pending_is_stored_once(ing: Ingest, link: FakeLink,
                                                             db_path: Path) -> None:
    ing.on_data(link, data_frame(10) + data_frame(10))
    await until(lambda: len(link.sent) >= 1)
    await quiet(ing)
    assert [s for _, s, _ in acks(link)] == [[10]]
    assert rids(db_path) == ["SL-0001:10:0"]


async def test_replay_older_than_the_window(ing: Ingest, link: FakeLink, db_path: Path) -> None:
    ing.on_data(link, data_frame(100))
    await until(lambda: len(link.sent) == 1)
    await quiet(ing)
    ing.on_data(link, data_frame(100 - WINDOW))  # too old to tell: a replay
    await quiet(ing)
    assert ing.metrics.frames_rejected == {"replay": 1}
    assert len(link.sent) == 1
    # inside the window: new (the oldest slot itself is covered by the store tests)
    ing.on_data(link, data_frame(100 - WINDOW + 2))
    await until(lambda: len(link.sent) == 2)
    assert acks(link)[1][1] == [100 - WINDOW + 2]
    assert len(rids(db_path)) == 2


async def test_replay_window_survives_gateway_restart(db_path: Path) -> None:
    link = FakeLink()
    async with running(db_path) as ing:
        ing.on_data(link, data_frame(5) + data_frame(6))
        await until(lambda: len(link.sent) == 1)
    async with running(db_path) as ing:
        ing.on_data(link, data_frame(5))  # same frame after a restart: a duplicate
        await until(lambda: len(link.sent) == 2)
        await quiet(ing)
        assert ing.metrics.duplicates["SL-0001"] == 1
        assert acks(link)[1][1] == [5]
    assert len(rids(db_path)) == 2


# ---------------------------------------------------------------- rejections


def _retag(seq: int, tag: int) -> bytes:
    m = cbor2.loads(protocol.create_mac0(K1, N1, seq, pack()))
    return cbor2.dumps(cbor2.CBORTag(tag, m.value))


def _corrupt_crc() -> bytes:
    raw = bytearray(cobs.decode(data_frame(1)[1:-1]))
    raw[-1] ^= 0x01
    return raw_frame(bytes(raw))


def _mac0_with_protected(protected: dict[int, Any]) -> bytes:
    pb = cbor2.dumps(protected)
    return cbor2.dumps(cbor2.CBORTag(17, [pb, {}, pack(), b"\x00" * 8]))


BAD: dict[str, tuple[str, bytes]] = {
    "garbage bytes": ("cobs", b"\x00\x05\x01\x00"),
    "too short": ("short", raw_frame(b"\x01\x02")),
    "bad crc": ("crc", _corrupt_crc()),
    "unknown frame type": ("type", protocol.encode_frame(0x7E, b"hello")),
    "ack from a node": ("unexpected",
                        protocol.encode_ack(K1, N1, [1], 1_700_000_000_000)),
    "bad cbor body": ("cbor", protocol.encode_frame(protocol.DATA, b"\x1c\x00\x00")),
    "truncated cbor body": ("cbor", protocol.encode_frame(
        protocol.DATA, protocol.create_mac0(K1, N1, 1, pack())[:-12])),
    "wrong cose tag": ("cose", protocol.encode_frame(protocol.DATA, _retag(1, 18))),
    "untagged cose": ("cose", protocol.encode_frame(protocol.DATA, cbor2.dumps([1, 2, 3]))),
    "alg of the wrong type": ("cose", protocol.encode_frame(
        protocol.DATA, _mac0_with_protected({1: [4], 4: N1, 6: b"\x01"}))),
    "kid of the wrong type": ("cose", protocol.encode_frame(
        protocol.DATA, _mac0_with_protected({1: 4, 4: "SL-0001", 6: b"\x01"}))),
    "unknown node": ("unknown_node", data_frame(1, b"SL-9999", key=K1)),
    "bad mac": ("mac", data_frame(1, N1, key=K2)),
    "oversize": ("oversize", b"\x00" + b"\x55" * (protocol.MAX_WIRE + 10) + b"\x00"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_input_is_counted_by_kind_and_never_raises(case: str, ing: Ingest,
                                                             link: FakeLink,
                                                             db_path: Path) -> None:
    kind, wire = BAD[case]
    ing.on_data(link, wire)
    await quiet(ing)
    assert dict(ing.metrics.frames_rejected) == {kind: 1}
    assert link.sent == []
    assert rows(db_path, "SELECT count(*) FROM frames") == [(0,)]
    # and the link carries on: the next good frame goes through
    ing.on_data(link, data_frame(77))
    await until(lambda: len(link.sent) == 1)
    assert acks(link)[0][1] == [77]
    assert sum(ing.metrics.frames_rejected.values()) == 1


async def test_truncated_frame(ing: Ingest, link: FakeLink) -> None:
    wire = data_frame(1)
    ing.on_data(link, wire[: len(wire) // 2] + b"\x00")  # the line dropped the rest
    await quiet(ing)
    assert sum(ing.metrics.frames_rejected.values()) == 1
    assert set(ing.metrics.frames_rejected) <= {"cobs", "crc", "short"}
    assert link.sent == []


async def test_bad_mac_does_not_move_the_window(ing: Ingest, link: FakeLink,
                                                db_path: Path) -> None:
    """A forged frame with a high sequence must not make the real ones look like replays."""
    ing.on_data(link, data_frame(1_000_000, N1, key=K2))
    ing.on_data(link, data_frame(1))
    await until(lambda: len(link.sent) == 1)
    assert acks(link)[0][1] == [1]
    assert ing.metrics.frames_rejected == {"mac": 1}


async def test_one_warning_per_source_and_kind(ing: Ingest, link: FakeLink,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lantern.ingest")
    bad = _corrupt_crc()
    for _ in range(100):
        ing.on_data(link, bad)
    assert ing.metrics.frames_rejected["crc"] == 100
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ttyFAKE0" in warnings[0].getMessage() and "crc" in warnings[0].getMessage()

    for _ in range(10):
        ing.on_data(link, BAD["bad mac"][1])  # another kind: one more warning
    other = FakeLink("ttyFAKE1")
    for _ in range(10):
        ing.on_data(other, bad)  # another source: one more warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3


# ---------------------------------------------------------------- dead letters


async def test_authentic_pack_with_nan_becomes_a_dead_letter(ing: Ingest, link: FakeLink,
                                                             db_path: Path) -> None:
    payload = pack(value=math.nan)
    wire = data_frame(12, payload=payload)
    ing.on_data(link, wire)
    await until(lambda: len(link.sent) == 1)
    await quiet(ing)
    assert acks(link)[0][1] == [12]  # the ACK path looks at the pack's array head only
    assert ing.metrics.dead_letters == 0
    assert await ing.store.next_batch(10) is None  # resolving it, on its way upstream
    assert ing.metrics.dead_letters == 1
    assert ing.metrics.frames_rejected == {"senml": 1}
    assert ing.metrics.store_errors == 0
    assert rows(db_path, "SELECT count(*) FROM frames") == [(0,)]
    [(node, seq, reason, kind, body)] = rows(
        db_path, "SELECT node, seq, reason, kind, body FROM dead_letters")
    assert (node, seq, kind) == ("SL-0001", 12, "pack")
    assert "senml" in reason
    assert body == payload
    # sent again (ACK lost): a duplicate, not a second dead letter
    ing.on_data(link, wire)
    await until(lambda: len(link.sent) == 2)
    await quiet(ing)
    assert rows(db_path, "SELECT count(*) FROM dead_letters") == [(1,)]
    assert ing.metrics.duplicates["SL-0001"] == 1


BN = "urn:dev:lantern:SL-0001:"
UNUSABLE_PACKS: dict[str, Any] = {
    "not an array": "x",  # (a map is refused as `reflected`: test_a_map_is_refused_...)
    "empty": [],
    "unknown label": [{-2: BN, 0: "t", 2: 1.0, 99: 1}],
    "no value": [{-2: BN, 0: "t"}],
    "two values": [{-2: BN, 0: "t", 2: 1.0, 3: "one"}],
    "infinite value": [{-2: BN, 0: "t", 2: math.inf}],
    "text as v": [{-2: BN, 0: "t", 2: "21.5"}],
    "name is a number": [{0: 5, 2: 1.0}],
    "base name is a number": [{-2: 7, 0: "t", 2: 1.0}],
    "vs is a byte string": [{-2: BN, 0: "t", 3: b"\x01\x02"}],
    "vd is text": [{-2: BN, 0: "t", 8: "not bytes"}],
    "unit is a byte string": [{-2: BN, 0: "t", 1: b"Cel", 2: 1.0}],
}


@pytest.mark.parametrize("case", list(UNUSABLE_PACKS))
async def test_authentic_unusable_pack_is_dead_lettered_and_acked(case: str, ing: Ingest,
                                                                  link: FakeLink,
                                                                  db_path: Path) -> None:
    """Whatever an authentic node sends, the gateway keeps it (reading or dead letter), ACKs it,
    and never lets it break the commit of other frames."""
    ing.on_data(link, data_frame(20, payload=cbor2.dumps(UNUSABLE_PACKS[case])) + data_frame(21))
    await until(lambda: sum(len(s) for _, s, _ in acks(link)) >= 2
                or ing.metrics.store_errors > 0, timeout=2.0)
    await quiet(ing)
    assert ing.metrics.store_errors == 0
    assert sorted(s for _, seqs, _ in acks(link) for s in seqs) == [20, 21]
    batch = await ing.store.next_batch(100)  # resolved on the way upstream
    assert batch is not None and "SL-0001:21:0" in batch.rids
    dead = rows(db_path, "SELECT count(*) FROM dead_letters WHERE seq = 20")[0][0]
    assert dead + sum(r.startswith("SL-0001:20:") for r in batch.rids) >= 1
    assert ing.metrics.dead_letters == dead == 1  # each of these is unusable, and counted


# ---------------------------------------------------------------- the ACK path's own work


async def test_the_ack_path_never_resolves_a_pack(ing: Ingest, link: FakeLink,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no(payload: bytes) -> list[dict[str, Any]]:
        raise AssertionError("resolve_pack on the ACK path")

    monkeypatch.setattr(protocol, "resolve_pack", no)
    ing.on_data(link, b"".join(data_frame(s) for s in range(1, 6)))
    await until(lambda: sum(len(s) for _, s, _ in acks(link)) == 5)
    assert ing.metrics.readings_stored == 5 and ing.metrics.store_errors == 0


async def test_intake_closes_while_frames_wait_and_opens_after_the_commit(
        ing: Ingest, link: FakeLink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lantern.agent.ingest.INTAKE_HIGH", 4)
    monkeypatch.setattr("lantern.agent.ingest.INTAKE_LOW", 2)
    assert ing.intake.is_set()
    ing.on_data(link, b"".join(data_frame(s) for s in range(1, 4)))
    assert ing.intake.is_set()  # 3 waiting
    ing.on_data(link, data_frame(4))
    assert not ing.intake.is_set()  # 4: links stop reading (the event loop has not run yet)
    await until(lambda: ing.intake.is_set())
    await until(lambda: sum(len(s) for _, s, _ in acks(link)) == 4)
    await quiet(ing)
    assert ing.intake.is_set()


async def test_a_map_is_refused_as_reflected_never_kept_acked_or_marked(
        ing: Ingest, link: FakeLink, db_path: Path) -> None:
    """The gateway's own ACK (a map, MACed under the node key like DATA) played back as DATA is
    refused as `reflected`: no dead letter, no ACK, and its sequence stays free in the window,
    so the node's real frame of that number is taken later; the frame after it goes on."""
    nk = protocol.NodeKey(K1, N1)
    _, body = protocol.decode_frame(protocol.Deframer().feed(nk.ack([30], 1))[0] or b"")
    echo = protocol.encode_frame(protocol.DATA, body)
    ing.on_data(link, echo + data_frame(21))
    await until(lambda: len(link.sent) >= 1)
    await quiet(ing)
    assert ing.metrics.frames_rejected["reflected"] == 1
    assert ing.metrics.dead_letters == 0
    assert rows(db_path, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert [s for _, seqs, _ in acks(link) for s in seqs] == [21]
    ing.on_data(link, data_frame(30))
    await until(lambda: len(link.sent) >= 2)
    assert [s for _, seqs, _ in acks(link) for s in seqs] == [21, 30]


# ---------------------------------------------------------------- order at the disk cap


def seqs_queued(db: Path) -> list[int]:
    return [s for (s,) in rows(db, "SELECT seq FROM frames ORDER BY id")]


async def feed_in_order(ing: Ingest, link: FakeLink, seqs: list[int]) -> None:
    """Each frame on its own read, the commit task run in between (a node's resends)."""
    for s in seqs:
        ing.on_data(link, data_frame(s))
        await asyncio.sleep(0)
    await quiet(ing)


async def test_frames_refused_at_the_cap_are_taken_in_order_whichever_comes_back_first(
        ing: Ingest, link: FakeLink, db_path: Path) -> None:
    """docs/reliability.md, scenario 3: frames refused at the cap must come back before newer
    ones are taken. A node's frames in flight come back on their own timers (a frame refused
    once waits its first backoff and holds nothing back: firmware/node/link_uart.py), so 12
    may come back before 11. With only the oldest refused sequence remembered, 12 was taken as
    soon as 10 was back, and reached the queue (and upstream) before 11."""
    ing.store.cap.paused = True  # the queue at its cap (policy pause_intake)
    await feed_in_order(ing, link, [10, 11, 12])
    assert ing.metrics.frames_rejected["queue_full"] == 3
    ing.store.cap.paused = False
    await feed_in_order(ing, link, [10, 12, 11, 12])
    assert seqs_queued(db_path) == [10, 11, 12], "a newer frame overtook a refused one"
    assert ing.metrics.frames_rejected["queue_full"] == 4  # 12 once more, waiting for 11
    assert not ing._held  # all back: nothing waits any more


async def test_a_frame_refused_while_waiting_for_order_keeps_its_place(
        ing: Ingest, link: FakeLink, db_path: Path) -> None:
    """12 (new) is refused because 10 is still out; once 10 is back, 13 must still wait for
    12, or 13 reaches upstream before 12."""
    ing.store.cap.paused = True
    await feed_in_order(ing, link, [10])
    ing.store.cap.paused = False
    await feed_in_order(ing, link, [12, 10, 13, 12, 13])
    assert seqs_queued(db_path) == [10, 12, 13], "a newer frame overtook a refused one"


async def test_frames_of_a_failed_commit_are_not_overtaken_by_newer_ones(
        ing: Ingest, link: FakeLink, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that fails (disk full, I/O error) acknowledges nothing: its frames come back.
    Frames of the same node taken meanwhile must not reach the queue before them."""
    real = ing.store.commit
    release = asyncio.Event()
    failed: list[int] = []

    async def commit(frames: Any, windows: Any) -> None:
        if not failed:
            failed.extend(f.seq for f in frames)
            await release.wait()
            raise sqlite3.OperationalError("database or disk is full")
        await real(frames, windows)

    monkeypatch.setattr(ing.store, "commit", commit)
    ing.on_data(link, data_frame(10))
    await until(lambda: bool(failed))  # the commit of 10 is under way...
    ing.on_data(link, data_frame(11))  # ...the node's next frame arrives meanwhile
    release.set()  # and the commit of 10 fails
    await until(lambda: ing.metrics.store_errors == 1)
    await feed_in_order(ing, link, [10, 11])  # the node resends both, oldest first
    await until(lambda: len(seqs_queued(db_path)) == 2)
    assert seqs_queued(db_path) == [10, 11], "a newer frame overtook one of a failed commit"


# ---------------------------------------------------------------- a window per (node, key)


@contextlib.asynccontextmanager
async def running_with(db: Path, keys: dict[bytes, bytes]) -> AsyncIterator[Ingest]:
    async with Store(db) as store:
        ing = Ingest(store, keys, Metrics())
        await ing.start()
        task = asyncio.create_task(ing.run())
        try:
            yield ing
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_each_key_keeps_its_window_and_one_coming_back_finds_its_own(
        db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A window per key the node ever had (its keys are an operator's doing: few), one row
    each; a key configured again gets its own window back, never a fresh one."""
    caplog.set_level(logging.INFO, "lantern.ingest")
    ka, kb, kc = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
    served = [(ka, [1, 2, 3]), (kb, [1000, 1001]), (kc, [5000]), (ka, [3, 4])]
    taken = []
    for i, (key, seqs) in enumerate(served):
        link = FakeLink()
        async with running_with(db_path, {N1: key}) as ing:
            ing.on_data(link, b"".join(data_frame(s, key=key) for s in seqs))
            await quiet(ing)
            restarts = ing.metrics.window_restarts
        assert restarts == (1 if i in (1, 2) else 0)  # a new key; not the first, not one back
        taken += [(key, s) for s in seqs if (key, s) not in taken]
    assert [s for (s,) in rows(db_path, "SELECT seq FROM frames ORDER BY id")] == [
        s for _, s in taken]  # seq 3 of key a, the second time: a duplicate, stored once
    assert rows(db_path, "SELECT key_id, high FROM windows ORDER BY high") == [
        (protocol.key_id(ka), 4), (protocol.key_id(kb), 1001), (protocol.key_id(kc), 5000)]
    assert rows(db_path, "SELECT high FROM nodes") == [(5000,)]  # the node id's highest
    back = [r.getMessage() for r in caplog.records if "is back" in r.getMessage()]
    assert back == [f"node SL-0001: key {protocol.key_id(ka).hex()} is back; its own replay "
                    "window is kept (nothing up to seq 3 is taken again)"]
