"""The hold seals each held sample exactly once, whatever step of the seal a power cut hits.

The firmware's own node/hold.py, node/outbox.py and `Node.seal` on the MicroPython unix port.
The board's flash is reached through the `os` module and `open`: the test wraps them in the
hold's and the outbox's module (a true hardware boundary) and counts each flash operation that
writes, renames or removes; at step k the power fails (an exception nothing catches, a torn
temporary file if it was a write). Then the board boots again: a new outbox and hold over the
same flash, a clock already set, and the flush. Each k from 1 until a flush runs through.

What came out is every pack the outbox held plus, in the second variant, every pack the link
delivered (acknowledged, removed from the outbox) before the hold was loaded again after the
boot: the gateway's ACK can overtake the first sample of a boot.

The third variant resets twice: after the cut, a boot in which the link delivers every pack and
takes the gateway's ACK before the hold is loaded (the ACK of the newest frame an earlier boot
left is noted on flash, node/window.py), the power failing again at each flash step of that
too, and a third boot that loads the hold. What the link delivered goes through the gateway's
real ingest and queue: each sample is taken once, every frame is acknowledged (a frame sent
twice comes under its own sequence number, with the same bytes, and is a duplicate there).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.ingest import Ingest
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import Store
from lantern.agent.timesync import TimeSync
from tests.helpers.flash import MICROPYTHON, ROOT
from tests.helpers.timecheck import KernelClock, packs

pytestmark = pytest.mark.micropython

MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
SHIFT_S = 1000  # what the clock's first set moved it by

SCRIPT = r"""
import asyncio, json, os, sys, time
from node import cbor, cose, hold, outbox
from node.app import Node
from node.outbox import Outbox
from node.window import Window

ROOT_DIR, MODE, SHIFT_S = sys.argv[1], sys.argv[2], int(sys.argv[3])
ACK_FIRST = MODE == "1"
real_open = open


class PowerCut(Exception):
    pass


class Flash:
    # os and open for the hold's and the outbox's modules: every write, rename and remove is
    # a step; the power fails before step `cut` completes
    def __init__(self, cut):
        self.cut = cut
        self.steps = 0

    def _step(self):
        self.steps += 1
        if self.steps == self.cut:
            raise PowerCut()

    def open(self, path, mode="r"):
        if "w" in mode or "a" in mode:
            try:
                self._step()
            except PowerCut:
                with real_open(path, "wb") as f:
                    f.write(b"\xa5")  # a torn write
                raise
        return real_open(path, mode)

    def rename(self, a, b):
        self._step()
        os.rename(a, b)

    def remove(self, p):
        self._step()
        os.remove(p)

    def __getattr__(self, name):
        return getattr(os, name)


class FullFlash(Flash):
    # a flash with no room for the window's note of an ACK (ENOSPC); every other step passes
    def open(self, path, mode="r"):
        if "w" in mode and path.endswith("outbox.acked.tmp"):
            raise OSError(28)
        return real_open(path, mode)


class Clock:
    def __init__(self, synced):
        self.synced = synced
        self.known = False
        self.on_set = None

    def now_ms(self):
        return 50000000

    def now(self):
        return self.now_ms() // 1000


class Board:
    seal = Node.seal
    seal_errors = 0
    beat_ms = 0
    link = None

    def __init__(self, d, synced):
        self.cfg = {"state_dir": d, "max_untimed": 8}
        self.clock = Clock(synced)
        self.boot = {"reset": "power"}
        self.boot_ms = time.ticks_ms()
        self.key = bytes(32)
        self.kid = b"SL-0001"
        self.outbox = Outbox(d)


def wire(flash):
    # (the window notes an ACK with the outbox module's atomic write)
    for m in (hold, outbox):
        m.os = flash if flash else os
        m.open = flash.open if flash else real_open


def reading(frame):
    payload = cose.mac0_peek(frame)[3]
    pack = cbor.loads(payload)
    bt = pack[0].get(-3, 0)
    n = q = None
    for r in pack:
        if r.get(0) == "n":
            n = r[2]
        if r.get(0) == "time.q":
            q = r[2]
    return n, bt, q


def first_boot(d, cut, out=None):
    # three samples held, the clock set, the flush cut at step `cut`: whether it was. With
    # `out` (the frames the link delivers), an earlier boot's frame was delivered and its ACK
    # noted first, and the time request is answered before the flush: the outbox is empty
    # when the first seal begins, and the note is older than the seal
    os.mkdir(d)
    b = Board(d, False)
    if out is not None:
        b.seal(0, {"earlier": 1})
        b = Board(d, False)
        b.link = Window("t", b.outbox, 4, 1000)
        out.append(b.outbox.get(b.outbox.newest()))
        b.link._acked([b.outbox.newest()])
    h = hold.Hold(b, lambda: None)
    h.request()  # a time request waits in the outbox: `after` is not -1
    if out is not None:
        out.append(b.outbox.get(b.outbox.newest()))
        b.link._acked([b.outbox.newest()])
    for i in range(1, 4):
        h.hold(100 + i, {"n": i})
    b.clock.synced = True
    h.shift_ms = SHIFT_S * 1000
    h._boot_abs = 0
    flash = Flash(cut)
    wire(flash)
    try:
        asyncio.run(h.flush())
        cut_hit = False
    except PowerCut:
        cut_hit = True
    wire(None)
    return cut_hit


def run(cut):
    d = "%s/k%d" % (ROOT_DIR, cut)
    cut_hit = first_boot(d, cut)
    # the boot after the cut
    b2 = Board(d, True)
    out = []
    if ACK_FIRST:  # the link delivers every frame before the first sample loads the hold
        b2.link = Window("t", b2.outbox, 4, 1000)
        seqs = b2.outbox.seqs()
        out += [b2.outbox.get(s) for s in seqs]
        b2.link._acked(seqs)
    h2 = hold.Hold(b2, lambda: None)
    asyncio.run(h2.flush())
    out += [b2.outbox.get(s) for s in b2.outbox.seqs()]
    left = [x for x in os.listdir(d + "/untimed") if x != "run"]
    got = [reading(f) for f in out]
    print(json.dumps({"cut": cut, "hit": cut_hit, "left": left,
                      "got": sorted([g for g in got if g[0] is not None])}))
    return cut_hit


def run_twice(cut, cut2):
    # the cut at `cut`; a boot whose link delivers everything and takes the ACK, cut at
    # `cut2`; a third boot that loads the hold. Every frame the link delivered, in order
    d = "%s/k%d-%d" % (ROOT_DIR, cut, cut2)
    out = []
    cut_hit = first_boot(d, cut, out)
    b2 = Board(d, True)
    b2.link = Window("t", b2.outbox, 4, 1000)
    seqs = b2.outbox.seqs()
    out += [b2.outbox.get(s) for s in seqs]
    wire(Flash(cut2) if cut2 else FullFlash(0))
    try:
        b2.link._acked(seqs)
        cut2_hit = False
    except PowerCut:
        cut2_hit = True
    wire(None)
    b3 = Board(d, True)
    b3.link = Window("t", b3.outbox, 4, 1000)
    h3 = hold.Hold(b3, lambda: None)
    asyncio.run(h3.flush())
    out += [b3.outbox.get(s) for s in b3.outbox.seqs()]
    left = [x for x in os.listdir(d + "/untimed") if x != "run"]
    print(json.dumps({"cut": cut, "cut2": cut2, "hit": cut_hit, "hit2": cut2_hit, "left": left,
                      "frames": [bytes(f).hex() for f in out]}))
    return cut_hit, cut2_hit


if MODE == "full":
    k = 1
    while run_twice(k, 0)[0]:
        k += 1
    print(json.dumps({"steps": k}))
elif MODE == "twice":
    k = 1
    while True:
        j = 1
        while True:
            hit, hit2 = run_twice(k, j)
            if not hit2:
                break
            j += 1
        if not hit:
            break
        k += 1
    print(json.dumps({"steps": k}))
else:
    k = 1
    while run(k):
        k += 1
    print(json.dumps({"steps": k}))
"""


def _run(tmp_path: Path, mode: str) -> list[str]:
    script = tmp_path / "cut.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([str(MICROPYTHON), str(script), str(tmp_path), mode, str(SHIFT_S)],
                          env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("ack_first", [False, True], ids=["outbox", "delivered-before-reload"])
def test_a_power_cut_at_any_step_of_the_seal_neither_loses_nor_duplicates(
        tmp_path: Path, ack_first: bool) -> None:
    out = [json.loads(ln) for ln in _run(tmp_path, "1" if ack_first else "0")
           if ln.startswith("{")]
    cuts, steps = out[:-1], out[-1]["steps"]
    assert [c["cut"] for c in cuts] == list(range(1, steps + 1))
    assert [c["hit"] for c in cuts] == [True] * (steps - 1) + [False]
    for c in cuts:
        k, got = c["cut"], c["got"]
        assert [g[0] for g in got] == [1, 2, 3], (k, got)  # every sample once
        assert c["left"] == [], (k, c["left"])  # nothing held any more
        for n, bt, q in got:
            # sealed before the cut, or timed before it: the time it was taken (+ the shift);
            # only a sample whose time was never decided is sealed BEFORE in the new run
            assert (bt == 100 + n + SHIFT_S and q is None) or q == 2, (k, n, bt, q)
    # three samples, each: its seal record (write, rename), its pack (write, rename; the first
    # also reserves a block of sequence numbers), its file removed
    assert steps >= 3 * 5, steps


KEY, KID = bytes(32), b"SL-0001"  # the script's Board


def _reading(frame: bytes) -> tuple[int, int | None, int | None]:
    """(seq, n, time.q) of a sealed pack."""
    m = protocol.parse_mac0(frame)
    n = q = None
    for r in cbor2.loads(m.payload):
        if r.get(0) == "n":
            n = r[2]
        if r.get(0) == "time.q":
            q = r[2]
    return m.seq, n, q


class _Line:
    """The node's line at the gateway: the ACKs ingest sends, each seq it names."""

    name = "uart0"

    def __init__(self) -> None:
        self.acked: set[int] = set()
        self.news = asyncio.Event()

    def send(self, data: bytes) -> None:
        for chunk in protocol.Deframer().feed(data):
            assert chunk is not None
            _, body = protocol.decode_frame(chunk)
            m = protocol.parse_mac0(body)
            protocol.verify_mac0(KEY, m)
            self.acked.update(cbor2.loads(m.payload)[1])
        self.news.set()


async def _gateway_takes(db: Path, frames: list[bytes]) -> tuple[Metrics, set[int]]:
    """Each frame into the gateway's ingest, in the order the link delivered them, each
    acknowledged before the next comes; what ingest counted and what it acknowledged."""
    async with Store(db) as store:
        metrics = Metrics()
        ingest = Ingest(store, {KID: KEY}, metrics)
        await ingest.start()
        task = asyncio.create_task(ingest.run())
        line = _Line()
        try:
            for f in frames:
                seq = protocol.parse_mac0(f).seq
                line.news.clear()
                ingest.on_frame(line, protocol.DATA, f)
                while seq not in line.acked:
                    await asyncio.wait_for(line.news.wait(), 10)
                    line.news.clear()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return metrics, line.acked


def test_a_second_reset_after_the_ack_neither_loses_nor_duplicates(tmp_path: Path) -> None:
    out = [json.loads(ln) for ln in _run(tmp_path, "twice") if ln.startswith("{")]
    cases, steps = out[:-1], out[-1]["steps"]
    assert steps >= 3 * 5, steps
    assert sorted({c["cut"] for c in cases}) == list(range(1, steps + 1))
    # each first cut followed by a cut at every step of the second boot's ACK (its note: write,
    # rename; the frames' removal), then by a second boot that runs through
    assert all(c["hit"] for c in cases if c["cut"] < steps)
    for k in range(1, steps + 1):
        second = [c for c in cases if c["cut"] == k]
        assert [c["cut2"] for c in second] == list(range(1, len(second) + 1)), k
        assert [c["hit2"] for c in second] == [True] * (len(second) - 1) + [False], k
    assert max(c["cut2"] for c in cases) >= 3
    for c in cases:
        where = (c["cut"], c["cut2"])
        assert c["left"] == [], (where, c["left"])
        frames = [bytes.fromhex(h) for h in c["frames"]]
        by_seq: dict[int, bytes] = {}
        for f in frames:
            seq = protocol.parse_mac0(f).seq
            # a frame sent again is the same frame: the same sequence number, the same bytes
            assert by_seq.setdefault(seq, f) == f, where
        got = sorted((n, q) for _, n, q in map(_reading, by_seq.values()) if n is not None)
        assert [n for n, _ in got] == [1, 2, 3], (where, got)
        if c["hit2"] is False:
            # the second reset came after the ACK was noted: nothing went out twice
            assert len(frames) == len(by_seq), (where, [_reading(f) for f in frames])
        taken = _at_the_gateway(tmp_path / f"q{c['cut']}-{c['cut2']}.sqlite", frames, by_seq,
                                where)
        assert taken == [1, 2, 3], (where, taken)


def _at_the_gateway(db: Path, frames: list[bytes], by_seq: dict[int, bytes],
                    where: object) -> list[int]:
    """The frames through the gateway's ingest: none refused, every one acknowledged, each
    sent again a duplicate there; the samples (`n`) its queue holds."""
    metrics, acked = asyncio.run(_gateway_takes(db, frames))
    assert not metrics.frames_rejected, (where, dict(metrics.frames_rejected))
    assert acked == set(by_seq), where  # nothing left for the node to send forever
    assert metrics.duplicates["SL-0001"] == len(frames) - len(by_seq), where
    ts = TimeSync(probe=KernelClock(synchronized=True))
    return sorted(n for n in (p.value("n") for p in packs(db, "SL-0001", ts)) if n is not None)


def test_an_ack_that_cannot_be_noted_loses_nothing(tmp_path: Path) -> None:
    """The second boot's flash is full: the ACK of the sealed sample cannot be noted (printed
    once); the third boot cannot tell that the seal went out and seals it again. The one case
    where a sample may reach the gateway twice (docs/time.md): at least once, never lost."""
    lines = _run(tmp_path, "full")
    assert any("ack note failed" in ln for ln in lines), lines
    cases = [json.loads(ln) for ln in lines if ln.startswith("{")][:-1]
    assert len(cases) >= 3 * 5
    for c in cases:
        where = c["cut"]
        assert c["left"] == [], (where, c["left"])
        frames = [bytes.fromhex(h) for h in c["frames"]]
        by_seq = {protocol.parse_mac0(f).seq: f for f in frames}
        taken = _at_the_gateway(tmp_path / f"q{where}.sqlite", frames, by_seq, where)
        assert sorted(set(taken)) == [1, 2, 3], (where, taken)
