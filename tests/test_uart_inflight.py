"""UART link memory: frames a full outbox drops leave no trace in the link (MicroPython VM).

Found in a review (2026-11-29): `_inflight` kept an entry for every frame evicted from a full
outbox, so a long gateway outage grew the heap until a MemoryError ended the link task.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


