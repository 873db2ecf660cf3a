"""The gateway's trust boundary for frames (issue 21: findings 1, 7, 9 and the gateway half of 4).

Each test failed before its fix. Bad bytes from a peer — with or without a node's key — are
an expected event: counted, logged once, survived; good frames around them still go through.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import pty
import shutil
import sqlite3
import sys
import time
import tty
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lantern.agent import logsetup, protocol
from lantern.agent.config import NODE_ID, load_keys
from lantern.agent.errors import ConfigError, FrameError
from lantern.agent.ingest import Ingest
from lantern.agent.links.serial import SerialLink
from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.layout import SCHEMA_VERSION
from lantern.agent.queue.resolve import Batch
from lantern.agent.queue.store import Accepted, Store, Window

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
NODE = "SL-0001"
KID = NODE.encode()
T0 = 1_764_331_200

# tag 5 (bigfloat) and tag 4 (decimal fraction) whose exponents overflow Python's decimal:
# cbor2 raises decimal.Overflow / InvalidOperation / OverflowError while decoding them
POISON_VALUES = {
    "bigfloat": cbor2.CBORTag(5, [10**30, 1]),
    "decimal fraction": cbor2.CBORTag(4, [-(2**63), 1]),
    "decimal fraction, huge": cbor2.CBORTag(4, [10**30, 1]),
}


def good_pack(seq: int) -> bytes:
    return bytes(cbor2.dumps([{-3: T0 + seq, 0: "temperature", 2: 21.5},
                              {0: "humidity", 2: 48.25}], canonical=True))


def poison_pack(value: Any = POISON_VALUES["bigfloat"]) -> bytes:
    return bytes(cbor2.dumps([{-3: T0, 0: "temperature", 2: value}]))


def frame(seq: int, payload: bytes | None = None, key: bytes = K1, kid: bytes = KID) -> bytes:
    payload = good_pack(seq) if payload is None else payload
    return protocol.encode_frame(protocol.DATA, protocol.create_mac0(key, kid, seq, payload))


def unkeyed_poison() -> bytes:
    """A DATA frame no key made: a COSE_Mac0 whose unprotected header holds a bigfloat."""
    prot = cbor2.dumps({1: 4, 4: b"SL-9999", 6: b"\x01"}, canonical=True)
    body = cbor2.dumps(cbor2.CBORTag(17, [prot, {5: POISON_VALUES["bigfloat"]},
                                          good_pack(1), bytes(8)]))
    return protocol.encode_frame(protocol.DATA, bytes(body))


class FakeLink:
    name = "ttyFAKE0"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def acked(link: FakeLink, keys: dict[str, bytes] | None = None) -> list[int]:
    out = []
    for data in link.sent:
        [chunk] = protocol.Deframer().feed(data)
        assert chunk is not None
        _, body = protocol.decode_frame(chunk)
        m = protocol.parse_mac0(body)
        protocol.verify_mac0((keys or {NODE: K1})[m.kid.decode()], m)
        out += cbor2.loads(m.payload)[1]
    return sorted(out)


class Sink:
    name = "http"

    def __init__(self) -> None:
        self.rids: list[str] = []

    async def send(self, batch: Batch) -> None:
        self.rids += batch.rids


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def until(cond: Callable[[], bool], what: str, *tasks: asyncio.Task[None],
                timeout: float = 20.0) -> None:
    """Wait for cond(); fail at once, with its exception, if a task has died."""
    deadline = time.monotonic() + timeout
    while not cond():
        for t in tasks:
            if t.done():
                exc = None if t.cancelled() else t.exception()
                pytest.fail(f"task {t.get_name()} died (waiting for {what}): {exc!r}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def gateway(db: Path, keys: dict[bytes, bytes] | None = None
                  ) -> AsyncIterator[tuple[Ingest, Sink, list[asyncio.Task[None]]]]:
    """The real path: ingest → SQLite queue → forwarder → a sink (as agent/gateway.py wires it)."""
    async with Store(db) as store:
        metrics = Metrics()
        ingest = Ingest(store, {KID: K1} if keys is None else keys, metrics)
        await ingest.start()
        ev = asyncio.Event()
        ingest.listeners.append(ev)
        sink = Sink()
        fwd = Forwarder(store, sink, metrics, ev, max_records=4, max_age_s=0.0)
        tasks = [asyncio.create_task(ingest.run(), name="ingest"),
                 asyncio.create_task(fwd.run(), name="forward-http")]
        try:
            yield ingest, sink, tasks
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t


def rids(seqs: list[int]) -> list[str]:
    return [f"{NODE}:{s}:{i}" for s in seqs for i in range(2)]


# ---- finding 1: a poison pack under a valid key ---------------------------------------------


@pytest.mark.parametrize("poison", list(POISON_VALUES))
async def test_poison_pack_under_a_valid_key_is_dead_lettered_and_the_gateway_stays_up(
        poison: str, tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite"
    link = FakeLink()
    good = [1, 2, 3, 5, 6, 7]
    async with gateway(db) as (ingest, sink, tasks):
        wire = b"".join(frame(s) for s in (1, 2, 3)) + frame(4, poison_pack(
            POISON_VALUES[poison])) + b"".join(frame(s) for s in (5, 6, 7))
        ingest.on_data(link, wire)
        await until(lambda: sorted(sink.rids) == sorted(rids(good))
                    and ingest.metrics.readings_delivered == 12, "the good frames", *tasks)
        await until(lambda: (acked(link) == [1, 2, 3, 4, 5, 6, 7]), "every ACK", *tasks)
        # the poison is ACKed (so the node does not resend it for ever) and dead-lettered
        assert ingest.metrics.dead_letters == 1
        assert ingest.metrics.frames_rejected["cbor"] == 1
        assert not any(t.done() for t in tasks)
    [(seq, reason)] = rows(db, "SELECT seq, reason FROM dead_letters")
    assert seq == 4 and "tag" in reason
    assert rows(db, "SELECT count(*) FROM frames") == [(0,)]
    # a restart: nothing poisonous is left in the queue; the gateway stays up and delivers
    link = FakeLink()
    async with gateway(db) as (ingest, sink, tasks):
        ingest.on_data(link, frame(8))
        await until(lambda: sink.rids == rids([8]), "a frame after the restart", *tasks)
        assert ingest.metrics.dead_letters == 0
    assert rows(db, "SELECT count(*) FROM dead_letters") == [(1,)]


async def test_a_poison_pack_queued_by_an_earlier_version_is_dead_lettered(tmp_path: Path
                                                                          ) -> None:
    """Defence in depth: what an older gateway stored unchecked never stops the forwarder."""
    db = tmp_path / "queue.sqlite"
    async with Store(db) as store:
        w = Window()
        frames = []
        for seq in range(1, 8):
            p = poison_pack() if seq == 4 else good_pack(seq)
            frames.append(Accepted(NODE, seq, b"", None, pack=p, n=1 if seq == 4 else 2))
            w.mark(seq)
        await store.commit(frames, {NODE: w})
    for _ in range(2):  # and again after a restart
        async with gateway(db) as (ingest, sink, tasks):
            await until(lambda: rows(db, "SELECT count(*) FROM frames") == [(0,)],
                        "the queue to drain", *tasks)
            await until(lambda: sorted(sink.rids) == sorted(
                rids([1, 2, 3, 5, 6, 7]) if ingest.metrics.dead_letters else []),
                "the good frames", *tasks)
    [(seq, kind, reason)] = rows(db, "SELECT seq, kind, reason FROM dead_letters")
    assert (seq, kind) == (4, "pack") and "tag 5" in reason


async def test_a_frame_the_resolver_fails_on_unexpectedly_is_dead_lettered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a bug in resolution raises, the forwarder dead-letters that one frame."""
    real = protocol.resolve_pack

    def buggy(payload: bytes, *, node: str | None = None) -> list[dict[str, Any]]:
        if payload == good_pack(2):
            raise ZeroDivisionError("a bug")
        return real(payload, node=node)

    monkeypatch.setattr(protocol, "resolve_pack", buggy)
    db = tmp_path / "queue.sqlite"
    link = FakeLink()
    async with gateway(db) as (ingest, sink, tasks):
        ingest.on_data(link, b"".join(frame(s) for s in (1, 2, 3)))
        await until(lambda: sorted(sink.rids) == sorted(rids([1, 3])), "frames 1 and 3", *tasks)
        assert ingest.metrics.dead_letters == 1
    assert rows(db, "SELECT seq, reason FROM dead_letters") == [
        (2, "internal: ZeroDivisionError: a bug")]
    [bug] = [r for r in caplog.records if r.levelno == logging.ERROR]  # once, with its traceback
    assert "ZeroDivisionError" in bug.getMessage() and bug.exc_info is not None


async def test_uart_one_read_with_a_poison_between_good_frames(tmp_path: Path) -> None:
    """Bytes no key made, read from the line together with good frames in one os.read."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    db = tmp_path / "queue.sqlite"
    async with Store(db) as store:
        ingest = Ingest(store, {KID: K1}, Metrics())
        await ingest.start()
        reads: list[int] = []

        def on_data(link: SerialLink, data: bytes) -> None:
            reads.append(len(data))
            ingest.on_data(link, data)

        link = SerialLink(os.ttyname(slave), 115200, on_data, ingest.intake)
        tasks = [asyncio.create_task(ingest.run(), name="ingest"),
                 asyncio.create_task(link.run(), name="serial")]
        try:
            await until(lambda: link.connected, "the link", *tasks)
            wire = frame(1) + frame(2) + unkeyed_poison() + frame(3, poison_pack(), ) + frame(4)
            os.write(master, wire)
            await until(lambda: rows(db, "SELECT count(*) FROM frames") == [(3,)]
                        and ingest.metrics.dead_letters == 1, "frames 1 2 4 and a dead letter",
                        *tasks)
            assert reads == [len(wire)]  # one read: the case the finding is about
            # the unkeyed poison refused; the keyed one acknowledged and kept as a dead letter
            assert ingest.metrics.frames_rejected["cbor"] == 2
            assert rows(db, "SELECT seq FROM frames ORDER BY seq") == [(1,), (2,), (4,)]
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            os.close(master)
            os.close(slave)


@pytest.mark.parametrize("poison", list(POISON_VALUES))
def test_decoding_peer_cbor_raises_only_frame_error(poison: str) -> None:
    """The one boundary: protocol._loads (every decode of peer bytes) and its callers."""
    p = poison_pack(POISON_VALUES[poison])
    for call in (lambda: protocol.resolve_pack(p, node=NODE),
                 lambda: protocol._loads(p),
                 lambda: protocol.parse_mac0(unkeyed_poison()[1:-1])):
        with pytest.raises(FrameError):
            call()


# ---- finding 7: a rejected replay does not refresh liveness --------------------------------


async def test_a_rejected_replay_does_not_refresh_liveness(tmp_path: Path) -> None:
    link = FakeLink()
    async with gateway(tmp_path / "queue.sqlite") as (ingest, _, tasks):
        ingest.on_data(link, b"".join(frame(s) for s in range(1, 101)))
        await until(lambda: len(acked(link)) == 100, "100 ACKs", *tasks)
        seen = ingest.metrics.nodes[NODE]
        seen.last_seen -= 3600.0  # an hour of silence: the node is stale
        before = (seen.last_seen, seen.seq)
        ingest.on_data(link, frame(1))  # a recording, older than the window: refused
        assert ingest.metrics.frames_rejected["replay"] == 1
        ingest.on_data(link, frame(100))  # a recording inside the window: a duplicate
        await until(lambda: len(link.sent) >= 2, "the re-ACK", *tasks)
        now = ingest.metrics.nodes[NODE]
        assert (now.last_seen, now.seq) == before
        ingest.on_data(link, frame(101))  # a new frame: alive
        await until(lambda: ingest.metrics.nodes[NODE].seq == 101, "seq 101", *tasks)
        assert ingest.metrics.nodes[NODE].last_seen > before[0] + 3000


# ---- finding 9: a newline from a peer forges a log line --------------------------------------


FORGED = "2099-01-01 00:00:00,000 WARNING lantern.ingest: gateway compromised"


async def test_a_senml_name_with_a_newline_cannot_forge_a_plain_log_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logsetup.setup("INFO")
    try:
        link = FakeLink()
        bad = cbor2.dumps([{-3: T0, 0: f"x\n{FORGED}\r\x1b[2K", 2: "not a number"}])
        async with gateway(tmp_path / "queue.sqlite") as (ingest, sink, tasks):
            ingest.on_data(link, frame(1, bad) + frame(2))
            await until(lambda: sink.rids == rids([2]) and ingest.metrics.dead_letters == 1,
                        "frame 2 and the dead letter", *tasks)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    text = err.getvalue()
    assert "gateway compromised" in text  # the line was logged, escaped
    assert not any(line.startswith("2099-") for line in text.splitlines())
    assert "\r" not in text and "\x1b" not in text


def test_the_plain_formatter_indents_the_lines_of_a_traceback() -> None:
    """A record's own lines after its first are indented: no line of it looks like a record."""
    try:
        raise ValueError(f"peer said\n{FORGED}")
    except ValueError:
        rec = logging.LogRecord("lantern.x", logging.ERROR, __file__, 1, "failed %s",
                                ("a\nb",), sys.exc_info())
    lines = logsetup.PlainFormatter().format(rec).split("\n")
    assert lines[0].endswith("lantern.x: failed a\\nb")
    assert all(line.startswith(" ") for line in lines[1:]) and len(lines) > 2


@pytest.mark.parametrize("node", ["SL-1\n", "SL-1\r", "\nSL-1"])
def test_a_node_id_with_a_newline_is_refused(node: str, tmp_path: Path) -> None:
    assert not NODE_ID.match(node)
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[nodes]\n"{node.encode("unicode_escape").decode()}" = "{K1.hex()}"\n')
    keys.chmod(0o600)
    with pytest.raises(ConfigError, match="a node id is"):
        load_keys(keys)


# ---- finding 4, gateway half: the replay window belongs to the key ---------------------------


async def _send(db: Path, key: bytes, seqs: list[int]) -> tuple[list[int], Metrics]:
    """Run the gateway with `key` configured for the node; send seqs; what was ACKed."""
    link = FakeLink()
    async with gateway(db, {KID: key}) as (ingest, sink, tasks):
        ingest.on_data(link, b"".join(frame(s, key=key) for s in seqs))
        await until(lambda: sum(ingest.metrics.frames_rejected.values())
                    + len(acked(link, {NODE: key})) >= len(seqs), "every frame handled", *tasks)
        got = acked(link, {NODE: key})
        await until(lambda: sorted(sink.rids) == sorted(rids(got)), "the deliveries", *tasks)
        return got, ingest.metrics


async def test_a_new_key_starts_a_fresh_replay_window(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "queue.sqlite"
    assert (await _send(db, K1, [500]))[0] == [500]
    shutil.copy(db, tmp_path / "k1.sqlite")
    # the node was wiped and provisioned again with a new key: its sequence starts over
    caplog.set_level(logging.INFO)
    got, metrics = await _send(db, K2, [1, 2])
    assert got == [1, 2]
    assert metrics.window_restarts == 1
    assert [r.getMessage() for r in caplog.records if "key changed" in r.getMessage()] == [
        f"node {NODE}: key changed, replay window restarted"]
    # K1 unchanged: seq 1 is a replay, as before
    got, metrics = await _send(tmp_path / "k1.sqlite", K1, [1])
    assert got == [] and metrics.frames_rejected["replay"] == 1
    assert metrics.window_restarts == 0
    # no secret on disk: the fingerprint is not the key, nor a prefix of its hash
    [(fp,)] = rows(db, "SELECT key_id FROM nodes")
    assert len(fp) == 8 and fp not in K2


LAYOUT_2 = """
CREATE TABLE frames (id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL,
    seq INTEGER NOT NULL, received_at REAL NOT NULL, readings INTEGER NOT NULL,
    format INTEGER NOT NULL, body BLOB NOT NULL, UNIQUE (node, seq));
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, node TEXT NOT NULL, seq INTEGER NOT NULL,
    reason TEXT NOT NULL, received_at REAL NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE sink_cursors (sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
CREATE TABLE nodes (node TEXT PRIMARY KEY, high INTEGER NOT NULL, window INTEGER NOT NULL,
    last_seen REAL NOT NULL, frames INTEGER NOT NULL);
INSERT INTO nodes VALUES ('SL-0001', 500, 1, 1764331200.0, 1);
PRAGMA user_version=2;
"""


async def test_a_queue_of_layout_2_keeps_its_windows_under_the_configured_key(
        tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite"
    con = sqlite3.connect(db)
    con.executescript(LAYOUT_2)
    con.close()
    got, metrics = await _send(db, K1, [1, 501])
    assert got == [501] and metrics.frames_rejected["replay"] == 1
    assert metrics.window_restarts == 0
    assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]  # migrated in place
    [(high, fp)] = rows(db, "SELECT high, key_id FROM nodes")
    assert high == 501 and fp == protocol.NodeKey(K1, KID).key_id


# ---- property: arbitrary CBOR through the whole decode path ---------------------------------

TAGS = [0, 1, 2, 3, 4, 5, 17, 21, 24, 25, 28, 29, 30, 32, 35, 37, 256, 258, 260, 55799]


def _tagged(tag: int, item: bytes) -> bytes:
    return protocol.cbor_head(6, tag) + item


def _map(pairs: list[tuple[bytes, bytes]], indefinite: bool = False) -> bytes:
    body = b"".join(k + v for k, v in pairs)
    return b"\xbf" + body + b"\xff" if indefinite else protocol.cbor_head(5, len(pairs)) + body


def _array(items: list[bytes], indefinite: bool = False) -> bytes:
    body = b"".join(items)
    return b"\x9f" + body + b"\xff" if indefinite else protocol.cbor_head(4, len(items)) + body


_LEAVES = st.one_of(
    st.integers(-(2**70), 2**70).map(cbor2.dumps),  # bignums (tags 2, 3) beyond 64 bits
    st.floats(allow_nan=True, allow_infinity=True).map(cbor2.dumps),
    st.text(max_size=12).map(cbor2.dumps),
    st.binary(max_size=12).map(cbor2.dumps),
    st.tuples(st.sampled_from([4, 5]), st.integers(-(2**80), 2**80),
              st.integers(-(2**80), 2**80)).map(  # decimal fractions and bigfloats
        lambda t: _tagged(t[0], _array([cbor2.dumps(t[1]), cbor2.dumps(t[2])]))),
    st.sampled_from([
        b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xf8\x20", b"\xe0", b"\xff", b"\x1c", b"\xfc",
        b"\x5f\xff", b"\x7f\x61a\x61b\xff", b"\x7f\x41a\xff", b"\x5f\x5f\xff\xff",
        b"\xf9\x7e\x00", b"\xa1\xf9\x7e\x00\x00", b"\x7f" + b"\x60" * 1000 + b"\xff",
        b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x5b\x00\x00\x00\x01\x00\x00\x00\x00",
        b"\xd8\x1c\x81\xd8\x1d\x00", b"\xd8\x23\x63(a)", b"\xc1\x1b\x7f\xff\xff\xff\xff\xff\xff"
        b"\xff"]),
)


def _extend(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.tuples(st.lists(children, max_size=4), st.booleans()).map(lambda t: _array(*t)),
        st.tuples(st.lists(st.tuples(children, children), max_size=3), st.booleans()).map(
            lambda t: _map(*t)),
        st.tuples(st.sampled_from(TAGS), children).map(lambda t: _tagged(*t)),
        st.tuples(st.integers(0, 2**64 - 1), children).map(  # a count the bytes cannot hold
            lambda t: protocol.cbor_head(4, t[0]) + t[1]),
        st.tuples(st.integers(1, 400), st.booleans()).map(  # deep nesting
            lambda t: b"\x9f" * t[0] + b"\xff" * t[0] if t[1] else b"\x81" * t[0] + b"\x00"),
        children.map(lambda c: b"\x81\xa2\x00\x61t\x02" + c),  # a pack with it as a value
        children.map(lambda c: _array([_map([(c, b"\x00")])])),  # ... as a label
    )


HOSTILE = st.recursive(_LEAVES, _extend, max_leaves=12).filter(lambda b: len(b) <= 600)


@settings(max_examples=600, deadline=None)
@given(item=HOSTILE)
def test_property_decoding_arbitrary_cbor_raises_only_frame_error(item: bytes) -> None:
    for call in (lambda: protocol._loads(item), lambda: protocol.pack_size(item),
                 lambda: protocol.resolve_pack(item, node=NODE),
                 lambda: protocol.parse_mac0(_unkeyed(item))):
        with contextlib.suppress(FrameError):
            call()


def _unkeyed(item: bytes) -> bytes:
    """A COSE_Mac0 no key made, with `item` in its unprotected header."""
    prot = cbor2.dumps({1: 4, 4: b"SL-9999", 6: b"\x01"}, canonical=True)
    return (b"\xd1\x84" + cbor2.dumps(prot) + _map([(b"\x05", item)]) + cbor2.dumps(b"")
            + cbor2.dumps(bytes(8)))


@settings(max_examples=40, deadline=None)
@given(items=st.lists(HOSTILE, min_size=1, max_size=4))
def test_property_arbitrary_cbor_through_the_gateway(tmp_path_factory: pytest.TempPathFactory,
                                                      items: list[bytes]) -> None:
    """Keyed (the pack) and unkeyed (a COSE header): every frame ends counted — taken, a dead
    letter or refused — never as an error of ours; the good frames around them arrive."""
    async def run() -> None:
        db = tmp_path_factory.mktemp("q") / "queue.sqlite"
        link = FakeLink()
        async with gateway(db) as (ingest, sink, tasks):
            last = len(items) + 2
            # a map where a pack belongs is the shape of the gateway's own ACKs: refused
            # (`reflected`), never kept or acknowledged
            reflected = {s for s, p in enumerate(items, 2) if p[:1] and p[0] >> 5 == 5}
            wire = frame(1) + b"".join(frame(s, p) + protocol.encode_frame(
                protocol.DATA, _unkeyed(p)) for s, p in enumerate(items, 2)) + frame(last)
            ingest.on_data(link, wire)
            expected = [s for s in range(1, last + 1) if s not in reflected]
            await until(lambda: acked(link) == expected, "every ACK", *tasks)
            await until(lambda: rows(db, "SELECT count(*) FROM frames") == [(0,)],
                        "the queue to drain", *tasks)
            m = ingest.metrics
            assert m.frames_rejected["internal"] == 0
            assert {f"{NODE}:1:0", f"{NODE}:{last}:0"} <= set(sink.rids)
            dead = {s for (s,) in rows(db, "SELECT seq FROM dead_letters")}
            taken = {int(r.split(":")[1]) for r in sink.rids}
            assert dead | taken == set(expected) and not dead & taken
            assert m.dead_letters == len(dead)
            assert m.frames_rejected["reflected"] == len(reflected)
            # every unkeyed frame refused and counted, once
            assert sum(m.frames_rejected.values()) - len(dead) == len(items) + len(reflected)

    asyncio.run(run())


async def _ingest_only(db: Path, key: bytes, seqs: list[int], later: int, dead: int
                       ) -> Metrics:
    """No sink runs (upstream down): frames stay queued. What the ingest counted."""
    link = FakeLink()
    async with Store(db) as store:
        ingest = Ingest(store, {KID: key}, Metrics())
        await ingest.start()
        task = asyncio.create_task(ingest.run(), name="ingest")
        try:
            ingest.on_data(link, b"".join(frame(s, good_pack(s + later), key=key)
                                          for s in seqs))
            await until(lambda: acked(link, {NODE: key}) == seqs, "the ACKs", task)
            await until(lambda: ingest.metrics.dead_letters == dead, "the dead letters", task)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return ingest.metrics


async def test_a_new_keys_frame_whose_seq_is_still_queued_is_kept_not_dropped(
        tmp_path: Path) -> None:
    """Frames of the old key wait for a sink (upstream down) when the node, provisioned again,
    sends seq 1 again: the queue holds (node, seq) once, so the new frame becomes a dead
    letter — kept and counted — instead of being ignored as 'the same frame again'."""
    db = tmp_path / "queue.sqlite"
    await _ingest_only(db, K1, [1, 2, 3], 0, 0)
    metrics = await _ingest_only(db, K2, [1, 2, 4], 10_000, 2)  # (newer readings)
    assert metrics.frames_rejected["seq_collision"] == 2
    assert rows(db, "SELECT seq FROM frames ORDER BY seq") == [(1,), (2,), (3,), (4,)]
    dead = rows(db, "SELECT seq, kind, body FROM dead_letters ORDER BY seq")
    assert [(s, k) for s, k, _ in dead] == [(1, "pack"), (2, "pack")]
    assert [b for _, _, b in dead] == [good_pack(10_001), good_pack(10_002)]
