"""An ACK's freshness (node/window.py) on the board's wrapping tick counter.

`time.ticks_ms` wraps (every 2**30 ms, 12.4 days, on an ESP32) and `ticks_diff` is only right
within half that period, so a first-send tick compared late reads young again. The window
looks at every frame in flight each send round (at most RTO_MAX_MS apart) and marks a first
send older than TIME_FRESH_MS stale for good; an age below zero is never fresh. The firmware's
window on the MicroPython unix port; the tick counter (a hardware clock) stepped by the test,
with the port's own ticks_add and ticks_diff, so it wraps as the board's does.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.flash import MICROPYTHON, ROOT

pytestmark = pytest.mark.micropython

MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"

SCRIPT = r"""
import asyncio, json, sys, time
from node import window
from node.outbox import Outbox

PERIOD = time.ticks_add(0, -1) + 1
NOW = [0]  # the board's millisecond tick counter: a hardware clock, stepped here


class Ticks:
    # the window's `time`: the counter above, and the port's own ticks_add and ticks_diff
    ticks_add = staticmethod(time.ticks_add)
    ticks_diff = staticmethod(time.ticks_diff)

    def ticks_ms(self):
        return NOW[0]


async def transmit(self, conn, data):
    return True  # the wire: every frame goes out


window.time = Ticks()
Window = window.Window
Window._transmit = transmit


def at(t):
    # the counter t ms after tick 0, wrapped as the board's (ticks_add takes under half a period)
    t %= PERIOD
    v = 0
    while t > PERIOD // 4:
        v = time.ticks_add(v, PERIOD // 4)
        t -= PERIOD // 4
    return time.ticks_add(v, t)


def case(name, steps):
    # one frame first sent at tick 0; the send rounds at the given ticks (ms since the first
    # send, each a round of the send task); the ACK at the last
    d = "%s/%s" % (sys.argv[1], name)
    box = Outbox(d)
    seq = box.next_seq()
    box.put(seq, b"frame")
    w = Window("uart", box, 4, 1000)
    NOW[0] = 0
    asyncio.run(w._send_due(None))
    for t in steps[:-1]:
        NOW[0] = at(t)
        asyncio.run(w._send_due(None))
    NOW[0] = at(steps[-1])
    fresh = w._acked([seq])
    return {"case": name, "fresh": fresh, "late_acks": w.late_acks, "sent": w.sent,
            "gone": seq not in box}


out = [
    case("prompt", [2000]),
    case("after-resends", [1000, 3000, 12000]),
    case("late", [1000, 3000, 7000, 15000, 16000]),
    # the send task stalled (no round), the ACK over half a period late: ticks_diff reads
    # a negative age
    case("a-half-period-late", [PERIOD // 2 + 20000]),
    # rounds every 30 s for a while, then the send task stalls; the ACK comes a whole tick
    # period plus 5 s after the first send, where ticks_diff reads 5 s
    case("a-period-late", [30000, 60000, PERIOD + 5000]),
]
print(json.dumps(out))
"""


def test_freshness_holds_across_the_tick_counters_wrap(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    script = tmp_path / "ticks.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([str(MICROPYTHON), str(script), str(tmp_path)],
                          env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = {c["case"]: c for c in json.loads(proc.stdout.splitlines()[-1])}
    assert got["prompt"]["fresh"] is True and got["prompt"]["late_acks"] == 0
    assert got["after-resends"]["fresh"] is True  # resends keep the first send's tick
    assert got["after-resends"]["sent"] >= 2
    for name in ("late", "a-half-period-late", "a-period-late"):
        assert got[name]["fresh"] is False and got[name]["late_acks"] == 1, got[name]
    for c in got.values():
        assert c["gone"], c  # a late ACK still takes its frame out of the outbox
