"""docs/protocol.md "Update transfer vectors": OFFER, CHUNK and ROTATE, made again on CPython
(tools/field/nodelink.py, tools/field/release.py) and answered by the node's own code
(firmware/node/commands.py, ota.py, update.py) on the MicroPython unix port."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import lantern
from lantern.agent import protocol
from lantern.tools.field import nodelink as nl
from lantern.tools.field import release

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
KEY = bytes(range(32))
NODE = "SL-0042"
CTR = 1764331200000
# RFC 8032 §7.1 tests 1 and 2: the release key of the bundle vector, and the one it rotates to
RFC8032_TEST1 = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_TEST2 = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
OLD = Ed25519PrivateKey.from_private_bytes(RFC8032_TEST1)
NEW = Ed25519PrivateKey.from_private_bytes(RFC8032_TEST2)

pytestmark = pytest.mark.ota


def doc_block(marker: str) -> bytes:
    doc = (lantern.CHECKOUT / "docs/protocol.md").read_text()  # type: ignore[operator]
    m = re.search(rf"<!-- {marker} -->\n```\n([0-9a-f\n]+)```", doc)
    assert m is not None, marker
    return bytes.fromhex(m.group(1).replace("\n", ""))


def vector_bundle() -> bytes:
    """The "Update bundle vector" (tests/tools/test_release.py checks it against the doc)."""
    return release.bundle(OLD, "1.0.0", 1, "0.1.0", ["unix-sim"], (6, 3),
                          [("main.py", b"print('hi')\n")])


def test_cpython_makes_the_documented_offer_chunk_and_rotate() -> None:
    b = vector_bundle()
    head = b[:8 + int.from_bytes(b[4:8], "big")]
    assert len(head) == 172 and b[len(head):] == b"print('hi')\n"
    assert nl.command_frame(KEY, NODE, CTR + 2, 9, {1: head}) == doc_block("update-offer-vector")
    assert nl.command_frame(KEY, NODE, CTR + 3, 10, {1: 0, 2: b[len(head):]}) == \
        doc_block("update-chunk-vector")
    record = release.rotation(OLD, NEW.public_key())
    assert record == doc_block("update-rotation-record")
    assert nl.command_frame(KEY, NODE, CTR + 4, 13, {1: record}) == \
        doc_block("update-rotate-vector")
    assert release.key_id(NEW.public_key()).hex() == "39f713d0a644253f"


NODE_SCRIPT = r"""
import json, sys
from node import commands, ota

with open(sys.argv[1]) as f:
    args = json.load(f)

class Actions:
    def __init__(self):
        self.u = None
    def updater(self):
        if self.u is None:
            self.u = ota.Updater({"state_dir": args["state"]}, "unix-sim",
                                 args["dir"] + "/node.json")
        return self.u
    def identity(self):
        return {"id": "SL-0042", "fw": "0.1.0", "board": "unix-sim"}
    def reboot(self):
        pass

c = commands.Commands("SL-0042", bytes(range(32)), args["state"], Actions())
out = []
for hexbody in args["bodies"]:
    out.append([[t, b.hex()] for t, b, _ in c.handle(bytes.fromhex(hexbody))])
print(json.dumps(out))
"""


def run_node(tmp_path: Path, wires: list[bytes]) -> list[dict[Any, Any]]:
    """The node's REPLY payload to each COMMAND frame, in order."""
    assert MICROPYTHON.exists(), "run `make micropython` first"
    (tmp_path / "release.pub").write_bytes(OLD.public_key().public_bytes_raw())
    (tmp_path / "state").mkdir()
    (tmp_path / "ota_script.py").write_text(NODE_SCRIPT)
    bodies = [protocol.decode_frame(w.strip(b"\x00"))[1].hex() for w in wires]
    arg = tmp_path / "args.json"
    arg.write_text(json.dumps({"state": str(tmp_path / "state"), "dir": str(tmp_path),
                               "bodies": bodies}))
    # sources, not .mpy: compiling them takes heap the bytes on the wire do not need
    r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=1M", str(tmp_path / "ota_script.py"),
                        str(arg)], env={"MICROPYPATH": MP_PATH}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    replies = []
    for answer in json.loads(r.stdout.strip().splitlines()[-1]):
        ((ftype, hexbody),) = answer
        assert ftype == protocol.REPLY
        replies.append(nl.unseal(KEY, bytes.fromhex(hexbody), ftype)[2])
    return replies


@pytest.mark.micropython
def test_the_node_answers_the_documented_offer_chunk_and_rotate(tmp_path: Path) -> None:
    apply = nl.command_frame(KEY, NODE, CTR + 5, 11)
    replies = run_node(tmp_path, [doc_block("update-offer-vector"),
                                  doc_block("update-chunk-vector"),
                                  doc_block("update-rotate-vector"), apply])
    assert [(r[1], r[2], r[3]) for r in replies] == [
        (9, 0, {1: 0, 2: 12, 3: 768}),
        (10, 0, {1: 12}),
        (13, 0, {1: bytes.fromhex("39f713d0a644253f")}),
        (11, 0, {1: "1.0.0"}),
    ]
    staged = tmp_path / "state/fw/a"
    assert (staged / "main.py").read_bytes() == b"print('hi')\n"
    assert (tmp_path / "release.pub.next").read_bytes() == NEW.public_key().public_bytes_raw()
    assert json.loads((tmp_path / "state/fw/boot.json").read_text())["cver"] == "1.0.0"
