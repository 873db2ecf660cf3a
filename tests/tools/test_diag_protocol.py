"""COMMAND / REPLY / STATUS (docs/protocol.md, "Diagnostics"): vectors, both sides, rules.

The node's side (firmware/node/commands.py) runs on the MicroPython unix port; the tool's side
(tools/field/nodelink.py) on CPython with cbor2; pycose checks the MACs independently.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import cbor2
import pytest
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.tools.field import nodelink as nl

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
KEY = bytes(range(32))
NODE = "SL-0042"
CTR = 1764331200000  # 2025-11-28T12:00:00Z in Unix milliseconds

# docs/protocol.md, "Diagnostics" vectors
CMD_STATUS_WIRE = bytes.fromhex(
    "001804d18454a301040447534c2d303034320646019aca559e13a045a2010102a048c6da29edb24c3033c5ef00")
CMD_SET_INTERVAL_WIRE = bytes.fromhex(
    "002f04d18454a301040447534c2d303034320646019aca559e01a049a2010302a101197530484f98f3725202"
    "035ecc8f00")
REPLY_SET_INTERVAL_WIRE = bytes.fromhex(
    "001f05d18454a301040447534c2d303034320646019aca559e01a056a30103021d03a16b696e74657276616c"
    "5f6d7319753048f60137d96ab495c7918900")
STATUS_PROBE_WIRE = bytes.fromhex(
    "001803d18454a301040447534c2d303034320646019aca559e25a05824a50167534c2d303034320265302e31"
    "2e30036d65737033322d6465766b697463050e060148f2ef9619cbfba178662800")
PROBE_WIRE = bytes.fromhex("000404a17400")


def body(wire: bytes) -> tuple[int, bytes]:
    return protocol.decode_frame(wire.strip(b"\x00"))


def test_cpython_side_makes_the_vectors() -> None:
    assert nl.command_frame(KEY, NODE, CTR, nl.OP_STATUS) == CMD_STATUS_WIRE
    assert nl.command_frame(KEY, NODE, CTR + 1, nl.OP_SET_INTERVAL, {1: 30000}) == \
        CMD_SET_INTERVAL_WIRE
    assert nl.PROBE == PROBE_WIRE
    reply = nl.seal(KEY, NODE.encode(), CTR + 1, cbor2.dumps(
        {1: 3, 2: 0, 3: {"interval_ms": 30000}}, canonical=True), protocol.REPLY)
    assert protocol.encode_frame(protocol.REPLY, reply) == REPLY_SET_INTERVAL_WIRE
    status = nl.parse_status(body(STATUS_PROBE_WIRE)[1], KEY)
    assert status == nl.Identity(NODE, "0.1.0", "esp32-devkitc", CTR, nl.R_PROBE, 1, True)


def test_vectors_are_the_ones_in_the_doc() -> None:
    doc = (ROOT / "docs/protocol.md").read_text().replace("\n", "")
    for wire in (CMD_STATUS_WIRE, CMD_SET_INTERVAL_WIRE, REPLY_SET_INTERVAL_WIRE,
                 STATUS_PROBE_WIRE):
        assert wire.hex() in doc


@pytest.mark.parametrize(("wire", "ftype"), [(CMD_STATUS_WIRE, protocol.COMMAND),
                                             (REPLY_SET_INTERVAL_WIRE, protocol.REPLY),
                                             (STATUS_PROBE_WIRE, protocol.STATUS)])
def test_pycose_verifies_with_the_frame_type_as_external_aad(wire: bytes, ftype: int) -> None:
    t, b = body(wire)
    assert t == ftype
    msg = Mac0Message.decode(b)
    msg.key = SymmetricKey(k=KEY)
    msg.external_aad = bytes((ftype,))
    assert msg.verify_tag()
    msg.external_aad = b""  # as DATA or ACK: must not verify (no kind can pose as another)
    assert not msg.verify_tag()


def test_a_command_is_no_data_frame_for_the_gateway() -> None:
    # replayed into the gateway as DATA, a COMMAND would move the replay window by years
    m = protocol.parse_mac0(body(CMD_STATUS_WIRE)[1])
    with pytest.raises(FrameError, match="mac"):
        protocol.verify_mac0(KEY, m)


def test_forged_or_foreign_answers_are_refused_by_the_tool() -> None:
    _, b = body(REPLY_SET_INTERVAL_WIRE)
    with pytest.raises(FrameError, match="mac"):
        nl.unseal(bytes(32), b, protocol.REPLY)
    with pytest.raises(FrameError, match="mac"):  # a REPLY replayed as a STATUS
        nl.unseal(KEY, b, protocol.STATUS)
    assert nl.unseal(None, b, protocol.REPLY)[:2] == (NODE, CTR + 1)


# ---- the node's side, on MicroPython ----

NODE_SCRIPT = r"""
import json, sys
from node import commands, frame

class Actions:
    def __init__(self):
        self.calls = []
    def identity(self):
        return {"id": "SL-0042", "fw": "0.1.0", "board": "esp32-devkitc"}
    def status(self):
        self.calls.append("status")
        return {"big": "x" * self.big} if self.big else {"uptime_s": 7}
    def self_test(self, index):
        return [{"i": index, "ok": True}]
    def set_interval(self, ms):
        self.calls.append("interval %d" % ms)
    def sync_time(self, ms):
        return 5
    def clear_faults(self):
        return 2
    def identify(self, s):
        return "console"
    def latest(self):
        return None
    def reboot(self):
        self.calls.append("reboot")

with open(sys.argv[1]) as f:
    args = json.load(f)
a = Actions()
a.big = args.get("big", 0)
c = commands.Commands("SL-0042", bytes(range(32)), args["state"], a)
out = []
for hexbody in args["bodies"]:
    if hexbody == "wait":
        import time
        time.sleep_ms(150)
        continue
    res = c.handle(bytes.fromhex(hexbody))
    out.append([[t, b.hex(), after is not None] for t, b, after in res])
print(json.dumps({"out": out, "calls": a.calls, "counters": c.counters(),
                  "other": c.other_node}))
"""


def run_node(tmp_path: Path, bodies: list[str], **extra: Any) -> dict[str, Any]:
    assert MICROPYTHON.exists(), "run `make micropython` first"
    script = tmp_path / "cmd_script.py"
    script.write_text(NODE_SCRIPT)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    # in a file: this unix port build dies on an argument of 256 characters or more
    arg = tmp_path / "args.json"
    arg.write_text(json.dumps({"state": str(state), "bodies": bodies, **extra}))
    r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(script), str(arg)],
                       env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def cmd(counter: int, op: int, args: dict[int, Any] | None = None, key: bytes = KEY,
        node: str = NODE) -> str:
    return body(nl.command_frame(key, node, counter, op, args))[1].hex()


def decode_reply(entry: list[Any]) -> tuple[int, dict[Any, Any]]:
    ftype, hexbody, _ = entry
    kid, counter, payload = nl.unseal(KEY, bytes.fromhex(hexbody), ftype)
    assert kid == NODE
    return counter, payload


@pytest.mark.micropython
def test_node_answers_the_doc_vector_byte_for_byte(tmp_path: Path) -> None:
    res = run_node(tmp_path, [body(CMD_SET_INTERVAL_WIRE)[1].hex(), "wait", ""])
    (reply,), (status,) = res["out"]
    assert reply[0] == protocol.REPLY
    assert protocol.encode_frame(reply[0], bytes.fromhex(reply[1])) == REPLY_SET_INTERVAL_WIRE
    assert res["calls"] == ["interval 30000"]
    # the probe's STATUS carries the floor, now the vector's counter
    assert nl.parse_status(bytes.fromhex(status[1]), KEY).floor == CTR + 1


@pytest.mark.micropython
def test_node_refuses_replays_forgeries_and_junk(tmp_path: Path) -> None:
    res = run_node(tmp_path, [
        cmd(CTR, nl.OP_STATUS),                       # accepted
        cmd(CTR, nl.OP_STATUS), "wait",               # the same counter again: replay
        cmd(CTR - 5, nl.OP_REBOOT), "wait",           # an older one: replay, no reboot
        cmd(CTR + 1, nl.OP_STATUS, key=bytes(32)), "wait",  # wrong key
        cmd(CTR + 2, nl.OP_STATUS, node="SL-0041"),   # another node's: silence
        "a0", "wait",                                 # not a COSE_Mac0
        cmd(CTR + 3, 99),                             # unknown operation
        cmd(CTR + 4, nl.OP_SET_INTERVAL, {1: 10}),    # out of range
        cmd(CTR + 5, nl.OP_REBOOT),                   # accepted: reboot once the reply is out
    ])
    out = res["out"]
    counter, p = decode_reply(out[0][0])
    assert (counter, p[1], p[2], p[3]["uptime_s"]) == (CTR, nl.OP_STATUS, 0, 7)
    reasons = [nl.parse_status(bytes.fromhex(o[0][1]), KEY).reason for o in (out[1], out[2])]
    assert reasons == [nl.R_REPLAY, nl.R_REPLAY]
    # the node cannot sign with the key we forged with; it still says why, under its own key
    assert nl.parse_status(bytes.fromhex(out[3][0][1]), KEY).reason == nl.R_BAD_MAC
    assert out[4] == []
    assert res["other"] == 1
    assert nl.parse_status(bytes.fromhex(out[5][0][1]), KEY).reason == nl.R_MALFORMED
    assert decode_reply(out[6][0])[1][2] == 1  # E_OP
    assert decode_reply(out[7][0])[1][2] == 2  # E_ARG
    assert out[8][0][2] is True  # reboot runs after its REPLY went out
    assert res["calls"] == ["status"]  # the refused ones ran nothing
    assert res["counters"] == {"accepted": 4, "refused": 4, "floor": CTR + 5}


@pytest.mark.micropython
def test_counter_floor_survives_a_restart(tmp_path: Path) -> None:
    run_node(tmp_path, [cmd(CTR + 10, nl.OP_CLEAR_FAULTS)])
    res = run_node(tmp_path, [cmd(CTR + 10, nl.OP_REBOOT), "wait", cmd(CTR + 11, nl.OP_STATUS)])
    assert nl.parse_status(bytes.fromhex(res["out"][0][0][1]), KEY).reason == nl.R_REPLAY
    assert decode_reply(res["out"][1][0])[0] == CTR + 11
    assert res["calls"] == ["status"]


@pytest.mark.micropython
def test_unauthenticated_status_is_rate_limited(tmp_path: Path) -> None:
    res = run_node(tmp_path, ["", "", "a0", "wait", ""])
    assert [len(o) for o in res["out"]] == [1, 0, 0, 1]


@pytest.mark.micropython
def test_an_answer_too_big_for_a_frame_says_so(tmp_path: Path) -> None:
    res = run_node(tmp_path, [cmd(CTR, nl.OP_STATUS)], big=1100)
    (entry,), = res["out"]
    _, p = decode_reply(entry)
    assert p[2] == nl.E_BIG and p[3]["bytes"] > protocol.MAX_FRAME - 3
    assert len(bytes.fromhex(entry[1])) + 3 <= protocol.MAX_FRAME
