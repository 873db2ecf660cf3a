"""The REKEY / REKEY_COMMIT vectors of docs/protocol.md ("Key rotation and
configuration"), made by the node's own code on the MicroPython unix port and checked with the
tool's and the gateway's code on CPython and with `cryptography`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from lantern.agent import fleetops, protocol
from lantern.tools.field import nodelink as nl

pytestmark = [pytest.mark.fleet, pytest.mark.micropython]

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
DOC = ROOT / "docs/protocol.md"

KEY = bytes(range(32))
NODE = "SL-0042"
COUNTER = 1764331200000  # as the diagnostics vectors
GW_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
NODE_PRIV = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
FIRST = 1000  # the node's next frame sequence at the commit

SCRIPT = """
import sys
from node import commands, frame, rekey, start
from node.outbox import _makedirs

d = sys.argv[1]
_makedirs(d + "/state")
rekey.write_private(d + "/node.key", bytes(range(32)).hex().encode())  # 0600


class Outbox:
    _next = FIRST


class Node:
    kid = b"NODE"
    node_id = "NODE"
    hal = None
    link = None
    outbox = Outbox()
    cfg = {"id": "NODE", "key_file": d + "/node.key", "state_dir": d + "/state", "link": {}}


n = Node()
start.keys(n, n.cfg, None)
cmd = commands.Commands("NODE", n.key, n.cfg["state_dir"], commands.NodeActions(n))
n._commands = cmd
from node import rekey  # noqa: E402 - again: the boot gave it back; the command takes it so

rekey._urandom = lambda k: bytes.fromhex("NODE_PRIV")
for line in sys.stdin:
    for ftype, body, _ in cmd.handle(bytes.fromhex(line.strip())):
        print(frame.encode(ftype, body).hex())
"""


def node_answers(tmp: Path, commands: list[bytes]) -> list[str]:
    script = (SCRIPT.replace("FIRST", str(FIRST)).replace("NODE_PRIV", NODE_PRIV.hex())
              .replace("NODE", NODE))
    tmp.mkdir(exist_ok=True)
    (tmp / "run.py").write_text(script)
    # a COMMAND frame's body: the wire bytes without COBS, type and CRC
    bodies = [protocol.decode_frame(protocol.Deframer().feed(c)[0])[1].hex() for c in commands]
    out = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(tmp / "run.py"),
                          str(tmp)], input="\n".join(bodies) + "\n", env={"MICROPYPATH": MP_PATH},
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.split() if line.startswith("00")]


def test_the_rekey_exchange_in_the_docs_is_what_the_node_sends(tmp_path: Path) -> None:
    gw = X25519PrivateKey.from_private_bytes(GW_PRIV)
    gw_pub = gw.public_key().public_bytes_raw()
    rekey = nl.command_frame(KEY, NODE, COUNTER + 2, 14, {1: gw_pub, 2: 1})
    (reply,) = node_answers(tmp_path, [rekey])
    body = protocol.decode_frame(protocol.Deframer().feed(bytes.fromhex(reply))[0])[1]
    _, counter, msg = nl.unseal(KEY, body, protocol.REPLY)
    node_pub = msg[3][1]
    assert counter == COUNTER + 2 and msg[2] == 0 and msg[3][2] == 1
    assert node_pub == X25519PrivateKey.from_private_bytes(NODE_PRIV).public_key(
        ).public_bytes_raw()
    shared = gw.exchange(X25519PublicKey.from_public_bytes(node_pub))
    new = fleetops.derive(shared, KEY, NODE, 1)
    commit = nl.command_frame(KEY, NODE, COUNTER + 3, 15, {2: 1})
    # a fresh node with the same ephemeral key: the same REPLY, then the COMMIT
    answers = node_answers(tmp_path / "2", [rekey, commit])
    assert answers[0] == reply  # the same REKEY answers the same (the record kept)
    body = protocol.decode_frame(protocol.Deframer().feed(bytes.fromhex(answers[1]))[0])[1]
    _, counter, msg = nl.unseal(new, body, protocol.REPLY)  # under the NEW key
    assert (counter, msg[2], msg[3]) == (COUNTER + 3, 0, {2: 1, 3: FIRST})
    doc = DOC.read_text()
    for what in (rekey.hex(), reply, commit.hex(), answers[1], new.hex(), shared.hex()):
        assert what in doc, what
