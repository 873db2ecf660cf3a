"""The node's UART receive task outlives any exception while it handles one frame.

The review's MemoryError ended UartLink._rx (finding 2). Whatever a handler raises now — an
exception nobody expected, a MemoryError, a UART read that fails — is counted
(`rx_failures`, also in `rx_errors`), printed once, and the frames after it are still heard.
Runs the real link on the MicroPython unix port.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lantern.agent import protocol
from lantern.tools.street.sim import MICROPYTHON

pytestmark = pytest.mark.micropython

ROOT = Path(__file__).resolve().parents[2]
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
KEY = bytes(range(32))

HARNESS = r"""
import asyncio, binascii, sys
from node.link_uart import UartLink

class Outbox:
    evicted = 0
    def __init__(self): self.seqs = {1, 2, 3}
    def remove(self, seq):
        if seq in self.seqs:
            self.seqs.discard(seq)
            return True
        return False

class Clock:
    def set_ms(self, ms): pass

class Boom:
    # the diagnostics, failing the way a short heap makes them fail
    calls = 0
    def handle(self, body):
        Boom.calls += 1
        raise MemoryError("memory allocation failed, allocating 8192 bytes")

class Line:
    # the UART as the link's StreamReader sees it: reads as the test scripts them
    def __init__(self, reads):
        self.reads = reads
        self.idle = asyncio.Event()
    async def read(self, n):
        if not self.reads:
            self.idle.set()
            await asyncio.Event().wait()
        r = self.reads.pop(0)
        if r == "fail":
            raise OSError(5)
        return r

reads = [binascii.unhexlify(x) if x != "fail" else x for x in sys.stdin.read().split()]
link = UartLink(object(), "SL-0001", bytes(range(32)), Outbox(), Clock())
link.commands = Boom()
line = Line(reads)
link._reader = line

async def main():
    task = asyncio.create_task(link._rx())
    try:
        await asyncio.wait_for_ms(line.idle.wait(), 5000)  # a dead task reads no further
    except asyncio.TimeoutError:
        pass
    await asyncio.sleep_ms(0)
    s = link.stats
    print("result", sorted(link._outbox.seqs), Boom.calls, getattr(s, "rx_failures", None),
          s.rx_errors, s.bad_acks, task.done())

asyncio.run(main())
"""


def test_uart_rx_survives_what_a_handler_raises(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    ack = [protocol.encode_ack(KEY, b"SL-0001", [s], 1764331201234) for s in (1, 2, 3)]
    command = protocol.encode_frame(protocol.COMMAND, b"\xd1\x84")
    reads = [
        (command + ack[0] + command).hex(),  # two failures around a genuine ACK, one read
        "fail",  # the UART itself fails once
        (command + ack[1]).hex(),
        ack[2].hex(),
    ]
    (tmp_path / "guard.py").write_text(HARNESS)
    proc = subprocess.run(
        [str(MICROPYTHON), "-X", "heapsize=110K", str(tmp_path / "guard.py")],
        input=" ".join(reads), capture_output=True, text=True, env={"MICROPYPATH": MP_PATH},
        timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[-1] == "result [] 3 4 4 0 False", out  # every ACK heard, the task alive
    printed = [line for line in out if line.startswith("uart rx")]
    assert printed == ["uart rx frame failed: MemoryError('memory allocation failed, "
                       "allocating 8192 bytes',) (later ones only counted)"], out
