"""UART link memory: frames a full outbox drops leave no trace in the link (MicroPython VM).

Found in a review (2026-11-29): `_inflight` kept an entry for every frame evicted from a full
outbox, so a long gateway outage grew the heap until a MemoryError ended the link task.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"

# --- 1. UART: _inflight leaks one entry per evicted frame (MicroPython unix port) ----------

LEAK = r"""
import asyncio, gc, sys
from node.outbox import Outbox
from node.link_uart import UartLink

class Writer:  # the UART at the hardware boundary: bytes go nowhere (no gateway)
    def write(self, b): pass
    async def drain(self): pass

class Clock:
    def set_ms(self, ms): pass

ob = Outbox(sys.argv[1], max_frames=8)
link = UartLink(object(), "SL-0001", bytes(32), ob, Clock(), window=4, rto_ms=5)
link._writer = Writer()

async def main():
    asyncio.create_task(link._tx())
    gc.collect()
    m0 = gc.mem_alloc()
    for i in range(int(sys.argv[2])):
        s = ob.next_seq()
        ob.put(s, b"x" * 40)
        link.kick()
        await asyncio.sleep_ms(3)
    await asyncio.sleep_ms(50)
    gc.collect()
    print(len(ob), ob.evicted, len(link._inflight), gc.mem_alloc() - m0)

asyncio.run(main())
"""


@pytest.mark.micropython
def test_uart_inflight_stays_bounded_while_a_full_outbox_evicts(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    script = tmp_path / "leak.py"
    script.write_text(LEAK)
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.run([str(MICROPYTHON), str(script), str(state), "300"],
                          capture_output=True, text=True, timeout=300,
                          env={"MICROPYPATH": MP_PATH})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    outbox, evicted, inflight, growth = map(int, proc.stdout.split())
    assert (outbox, evicted) == (8, 292)
    # at most the window can be in flight; every evicted frame that was in flight stays
    # in _inflight for good (about 55 bytes of heap each on the unix port)
    assert inflight <= 4, f"{inflight} entries in _inflight, heap grew {growth} bytes"




# --- 2. order: a frame lost on the line goes again before anything newer (both links) --------

ORDER = r"""
import asyncio, sys, time
from node.outbox import Outbox
from node.link_uart import UartLink

class Clock:
    def set_ms(self, ms): pass

ob = Outbox(sys.argv[1], max_frames=16)
link = UartLink(object(), "SL-0001", bytes(32), ob, Clock(), window=4, rto_ms=2000)
sent = []

async def transmit(conn, data):  # the line: records which frame went out
    sent.append(int(data))
    return True

link._transmit = transmit

def put():
    s = ob.next_seq()
    ob.put(s, b"%d" % s)
    return s

async def main():
    first = [put() for _ in range(4)]
    await link._send_due(None)          # all four go out
    newer = put()                       # waits: the window is full
    link._acked([first[3]])             # the gateway took the last: the three before it were
    await link._send_due(None)          # lost on the way (a gateway restarting, say)
    print("ACK", [s - first[0] for s in sent])
    # jitter: a newer frame's timer firing first does not resend it before an older one
    sent.clear()
    now = time.ticks_ms()
    link._inflight = {first[0]: (time.ticks_add(now, 1000), 1, 1),
                      first[1]: (time.ticks_add(now, -5), 1, 2)}
    ob.remove(first[2]); ob.remove(newer)
    wait = await link._send_due(None)
    print("JITTER", sent, 0 < wait <= 1000)

asyncio.run(main())
"""


@pytest.mark.micropython
def test_frames_lost_on_the_line_go_again_before_newer_ones(tmp_path: Path) -> None:
    """A gateway restarting drops what the node sent while its port was closed; an ACK of a
    frame sent later shows it, and the lost ones go again first (found by reliability
    scenario 3: up to 44 packs reached upstream after newer ones)."""
    script = tmp_path / "order.py"
    script.write_text(ORDER)
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.run([str(MICROPYTHON), str(script), str(state)],
                          env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines())
    assert lines["ACK"] == "[0, 1, 2, 3, 0, 1, 2, 4]", proc.stdout
    assert lines["JITTER"] == "[] True", proc.stdout
