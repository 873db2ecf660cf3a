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
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.flash import MICROPYTHON, ROOT

pytestmark = pytest.mark.micropython

MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
SHIFT_S = 1000  # what the clock's first set moved it by

SCRIPT = r"""
import asyncio, json, os, sys, time
from node import cbor, cose, hold, outbox
from node.app import Node
from node.outbox import Outbox
from node.window import Window

ROOT_DIR, ACK_FIRST, SHIFT_S = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
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


def run(cut):
    d = "%s/k%d" % (ROOT_DIR, cut)
    os.mkdir(d)
    b = Board(d, False)
    h = hold.Hold(b, lambda: None)
    h.request()  # a time request waits in the outbox: `after` is not -1
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


k = 1
while run(k):
    k += 1
print(json.dumps({"steps": k}))
"""


def _run(tmp_path: Path, ack_first: bool) -> list[str]:
    script = tmp_path / "cut.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([str(MICROPYTHON), str(script), str(tmp_path), "1" if ack_first else "0",
                           str(SHIFT_S)],
                          env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("ack_first", [False, True], ids=["outbox", "delivered-before-reload"])
def test_a_power_cut_at_any_step_of_the_seal_neither_loses_nor_duplicates(
        tmp_path: Path, ack_first: bool) -> None:
    out = [json.loads(ln) for ln in _run(tmp_path, ack_first) if ln.startswith("{")]
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
