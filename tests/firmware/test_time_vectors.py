"""docs/protocol.md "Time": the vectors, made by the node's own Node.seal on the MicroPython unix
port, verified and resolved by the gateway's code, relative times anchored at receipt."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from node.window import open_ack

from lantern.agent import protocol
from lantern.agent.timesync import BEFORE, RELATIVE, TimeSync
from tests.helpers.timecheck import KernelClock

pytestmark = pytest.mark.micropython

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
KEY = bytes(range(32))

SCRIPT = """
import binascii
from node import app, frame

class Box:
    def __init__(self, seq):
        self.seq = seq
    def next_seq(self):
        return self.seq
    def put(self, seq, data):
        self.data = data

class N:
    pass

for seq, bt, values in ((6, 0, {"time.q": 1}), (7, 1764331200, {"uptime": 12, "time.q": 2}),
                        (8, -30, {"uptime": 40, "time.q": 1})):
    n = N()
    n.key = bytes(range(32))
    n.kid = b"SL-0042"
    n.outbox = Box(seq)
    app.Node.seal(n, bt, values)
    print(binascii.hexlify(frame.encode(frame.DATA, n.outbox.data)).decode())
"""


def _doc_frames() -> list[str]:
    text = (ROOT / "docs/protocol.md").read_text()
    section = text[text.index("### Time"):text.index("## 4. Vectors")]
    return re.findall(r"```\n([0-9a-f]+)\n```", section)


def test_the_node_makes_the_documented_bytes(tmp_path: Path) -> None:
    script = tmp_path / "vectors.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [str(MICROPYTHON), "-X", "heapsize=110K", str(script)], capture_output=True, text=True,
        env={"MICROPYPATH": f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"},
        timeout=60, check=True).stdout.split()
    request, ack, before, relative = _doc_frames()
    assert out == [request, before, relative]

    ts = TimeSync(probe=KernelClock(True))
    got = []
    for wire in out:
        _, body = protocol.decode_frame(protocol.Deframer().feed(bytes.fromhex(wire))[0])
        m = protocol.parse_mac0(body)
        protocol.NodeKey(KEY, m.kid).verify(m)  # the MAC covers the time and its flag
        got.append((m.seq, ts.fix_times(protocol.resolve_pack(m.payload, node="SL-0042"),
                                         1_764_331_260.0)))
    (s6, r6), (s7, r7), (s8, r8) = got
    assert s6 == 6 and r6 == [{"n": "urn:dev:lantern:SL-0042:time.q", "t": 1_764_331_260,
                               "v": RELATIVE}]
    assert s7 == 7 and {r["t"] for r in r7} == {1_764_331_200} and r7[0]["v"] == BEFORE
    assert s8 == 8 and {r["t"] for r in r8} == {1_764_331_230} and r8[0]["v"] == RELATIVE
    # the ACK: the node's own check takes it, and it sets no clock
    _, body = protocol.decode_frame(protocol.Deframer().feed(bytes.fromhex(ack))[0])
    assert open_ack(body, b"SL-0042", KEY)[:2] == ([6], None)
