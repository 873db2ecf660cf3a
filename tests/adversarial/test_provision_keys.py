"""Review finding 4 (2026-12): re-provisioning a wiped node opened a replay hole.

`lantern provision node --flash --erase` kept the node's key while the erase restarted the
node's frame sequence, command floor and BTHome counter: a recorded old ACK then deleted unsent
frames and set the clock back, a recorded old command was obeyed again, BTHome adverts reused
(bindkey, counter) — the AES-CCM keystream — and the gateway refused the new frames as replays.

Here the real tool decides the key (tools/field/provision.py) and the real firmware (node.app,
node.outbox, node.link_uart, node.commands, node.link_ble's counter) runs on the MicroPython
unix port before and after the wipe; the attacker's recordings are replayed after it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.config import load_keys, write_secret
from lantern.tools.field import nodelink
from lantern.tools.field import provision as pv
from lantern.tools.field import provision_steps as ps

from .gateway_harness import RecordingLink, ingest_running

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
NODE = "SL-0042"
KID = NODE.encode()
OLD_KEY = bytes(range(32))
T_OLD = 1_700_000_000_000  # the clock a recorded ACK carries (2023)

# The node's side, from boot: key, state, frames, then whatever was recorded is played to it.
NODE_SCRIPT = r"""
import json, sys, time
from node import app, bthome, start
from node.outbox import Outbox
from node.commands import Commands
from node.link_uart import UartLink
from node.link_ble import Counter

state, key_file, node_id, inp = sys.argv[1:5]
with open(inp) as f:
    rec = json.load(f)
key = start.load_key(key_file)
ob = Outbox(state)
bind = getattr(app, "bind_state", None)
if bind is not None:
    bind(state, key, None)
for i in range(4):
    s = ob.next_seq()
    ob.put(s, b"frame %d" % s)

class Clock:
    set_to = None
    def set_ms(self, ms):
        self.set_to = ms

class Actions:
    def __init__(self):
        self.intervals = []
    def set_interval(self, ms):
        self.intervals.append(ms)
    def identity(self):
        return {"id": node_id, "fw": "test", "board": "test"}

clock = Clock()
link = UartLink(object(), node_id, key, ob, clock)
for s in ob.seqs():
    link._inflight[s] = (0, 1, 0, time.ticks_ms())  # every frame on its way to the gateway
acts = Actions()
cmds = Commands(node_id, key, state, acts)
for h in rec["acks"]:
    link._on_ack(bytes.fromhex(h))
for h in rec["commands"]:
    cmds.handle(bytes.fromhex(h))
counter = Counter(state + "/bthome_counter")
print(json.dumps({"outbox": ob.seqs(), "clock": clock.set_to, "intervals": acts.intervals,
                  "floor": cmds.floor, "bad_acks": link.stats.bad_acks,
                  "bindkey": bthome.derive_bindkey(key).hex(),
                  "bthome": [counter.next() for _ in range(3)]}))
"""


def boot(tmp: Path, key_file: Path, acks: list[bytes], commands: list[bytes]) -> dict[str, Any]:
    """Run the node once on MicroPython with `state` as its flash; what it ended up with.

    A roomier heap than a board's: the link, commands and BLE modules load together here.
    """
    script = tmp / "node_run.py"
    script.write_text(NODE_SCRIPT)
    inp = tmp / "recorded.json"
    inp.write_text(json.dumps({"acks": [a.hex() for a in acks],
                               "commands": [c.hex() for c in commands]}))
    r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=1M", str(script), str(tmp / "state"),
                        str(key_file), NODE, str(inp)], env={"MICROPYPATH": MP_PATH},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, Any] = json.loads(r.stdout.splitlines()[-1])
    return out


def ack_body(key: bytes, seqs: list[int], now_ms: int) -> bytes:
    payload = cbor2.dumps({protocol.ACK_SEQS: seqs, protocol.ACK_TIME: now_ms}, canonical=True)
    return protocol.create_mac0(key, KID, max(seqs), payload)


def set_interval(key: bytes, counter: int, ms: int) -> bytes:
    return nodelink.seal(key, KID, counter, cbor2.dumps({1: 3, 2: {1: ms}}), protocol.COMMAND)


def provision_args(tmp: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pv.add_parser(parser.add_subparsers(dest="command"))
    image = tmp / "micropython.bin"
    image.write_bytes(b"\xe9" + bytes(4095))
    return parser.parse_args(["provision", "node", "--board", "esp32-devkitc", "--id", NODE,
                              "--port", "/dev/ttyUSB0", "--keys", str(tmp / "keys.toml"),
                              "--out", str(tmp / "stage"), *extra])


def key_step(args: argparse.Namespace, device: dict[str, Any] | None = None) -> pv.Plan:
    """The tool's key and config steps, as `lantern provision node` runs them."""
    p = pv.plan(args)
    p.device = device
    pv.step_key(p, False)
    pv.step_config(p, False)
    return p


@pytest.mark.micropython
def test_reprovisioning_after_an_erase_closes_the_replay_hole(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    keys = tmp_path / "keys.toml"
    write_secret(keys, ps.keys_text(keys, NODE, OLD_KEY))
    node_key = tmp_path / "node.key"  # the key the node runs under (NVS on a real ESP32)
    write_secret(node_key, OLD_KEY.hex() + "\n")

    # in service: the gateway acknowledges frames 0 and 1, a technician sets the interval;
    # an attacker on the line (or on air) records both
    old_ack = ack_body(OLD_KEY, [0, 1], T_OLD)
    old_cmd = set_interval(OLD_KEY, 5, 5000)
    before = boot(tmp_path, node_key, [old_ack], [old_cmd])
    assert before["outbox"] == [2, 3] and before["clock"] == T_OLD
    assert before["intervals"] == [5000] and before["floor"] == 5

    # the board is erased (esptool erase-flash) and provisioned again, as installers do
    shutil.rmtree(tmp_path / "state")
    p = key_step(provision_args(tmp_path, "--flash", str(tmp_path / "micropython.bin"),
                                "--erase"))
    assert p.key is not None
    write_secret(node_key, p.key.hex() + "\n")  # what the deploy puts on the node
    after = boot(tmp_path, node_key, [old_ack], [old_cmd])

    # (b) the recorded ACK deletes nothing and sets no clock; the recorded command is refused
    assert after["outbox"] == [0, 1, 2, 3], "a recorded old ACK deleted unsent frames"
    assert after["clock"] is None, "a recorded old ACK set the node's clock back"
    assert after["intervals"] == [], "a recorded old command was obeyed again"
    assert after["bad_acks"] == 1
    # (c) no (bindkey, counter) pair of an advert before the wipe is used after it
    pairs_before = {(before["bindkey"], c) for c in before["bthome"]}
    pairs_after = {(after["bindkey"], c) for c in after["bthome"]}
    assert not pairs_before & pairs_after, "BTHome adverts reuse the AES-CCM keystream"

    # the gateway's key file: the new key, the old one retired (named by its id only), 0600
    assert load_keys(keys) == {KID: p.key} and p.key != OLD_KEY
    text = keys.read_text()
    assert OLD_KEY.hex() not in text and f"retired key {ps.key_id(OLD_KEY)}" in text
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600


def test_keeping_the_key_across_an_erase_is_refused_in_one_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_secret(keys, ps.keys_text(keys, NODE, OLD_KEY))
    args = provision_args(tmp_path, "--flash", str(tmp_path / "micropython.bin"), "--erase")
    args.keep_key = True  # the installer insists on the old key
    with pytest.raises(pv.StepError) as e:
        key_step(args)
    assert "\n" not in e.value.what and "--erase" in e.value.what
    assert "counters" in e.value.what and "--keep-key" in e.value.fix
    assert load_keys(keys) == {KID: OLD_KEY}  # nothing changed


@pytest.mark.parametrize(("state", "reused"), [
    (f"key:{ps.key_id(OLD_KEY)}", True),  # the node's counters are bound to this key
    ("none", False),  # a fresh filesystem (reformatted, a reflash that overlapped it)
    (f"key:{ps.key_id(bytes(32))}", False),  # the node holds another key's counters
    (f"legacy:{ps.key_id(OLD_KEY)}", True),  # firmware before key ids: state and this key
    ("legacy:-", False),  # state, but its key unreadable: cannot tell
    (f"lost:{ps.key_id(OLD_KEY)}", False),  # its state directory deleted: the node refuses it
])
def test_a_key_is_reused_only_where_the_node_shows_its_counters(
        tmp_path: Path, state: str, reused: bool) -> None:
    keys = tmp_path / "keys.toml"
    write_secret(keys, ps.keys_text(keys, NODE, OLD_KEY))
    device = {"version": "1.25.0", "mpy": (6, 3), "platform": "esp32", "free_kb": 2000,
              "state": state}
    p = key_step(provision_args(tmp_path), device)
    assert (p.key == OLD_KEY) is reused
    assert load_keys(keys) == {KID: p.key}


# ---- (a) the gateway takes the re-provisioned node's frames (its window follows the key) --
# This half is the gateway's (agent/ingest.py, agent/queue/store.py: a window per key, not per id).

def data_frame(key: bytes, seq: int) -> bytes:
    pack = cbor2.dumps([{0: "temperature", 2: 21.5}])
    return protocol.encode_frame(protocol.DATA, protocol.create_mac0(key, KID, seq, pack))


async def _acked(link: RecordingLink, n: int) -> None:
    import asyncio

    for _ in range(600):
        if len(link.sent) >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(link.sent)} ACKs, expected {n}")


async def test_gateway_accepts_a_reprovisioned_node_under_its_new_key(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    link = RecordingLink()
    async with ingest_running(db, {KID: OLD_KEY}) as (ing, _):
        ing.on_data(link, data_frame(OLD_KEY, 500))
        await _acked(link, 1)
    keys = tmp_path / "keys.toml"
    write_secret(keys, ps.keys_text(keys, NODE, OLD_KEY))
    p = key_step(provision_args(tmp_path, "--flash", str(tmp_path / "micropython.bin"),
                                "--erase"))
    assert p.key is not None and p.key != OLD_KEY
    # restarted with the key file it was given
    async with ingest_running(db, load_keys(keys)) as (ing, _):
        ing.on_data(link, data_frame(p.key, 0))  # the wiped node starts again at 0
        await _acked(link, 2)
        assert not ing.metrics.frames_rejected
        # and the retired key's frames are no longer taken
        ing.on_data(link, data_frame(OLD_KEY, 501))
        assert ing.metrics.frames_rejected


# ---- the node binds its counters to its key (node.app.bind_state) ---------------------------

BIND_SCRIPT = r"""
import sys
from node import app, start
from node.outbox import Outbox

class Hal:  # an ESP32-like HAL: the key outlives the filesystem (NVS), so it remembers use
    def __init__(self, used):
        self.used = used
    def key_used(self, kid):
        return kid in self.used
    def mark_key_used(self, kid):
        self.used.append(kid)

state = sys.argv[1]
key = bytes(range(32))
hal = Hal([])
Outbox(state)
print("bound", start.bind_state(state, key, hal), hal.used)
print("again", start.bind_state(state, key, hal))
import os
for n in os.listdir(state + "/outbox"):
    os.remove(state + "/outbox/" + n)
for n in os.listdir(state):
    if n != "outbox":
        os.remove(state + "/" + n)  # the filesystem lost the counters; NVS kept the key
Outbox(state)
try:
    start.bind_state(state, key, hal)
    print("accepted a used key with its counters gone")
except app.ConfigError as e:
    print("refused", e)
print("new key", start.bind_state(state, bytes(32), hal))
"""


@pytest.mark.micropython
def test_a_used_key_whose_counters_are_gone_is_refused_by_the_node(tmp_path: Path) -> None:
    script = tmp_path / "bind.py"
    script.write_text(BIND_SCRIPT)
    r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(script),
                        str(tmp_path / "state")], env={"MICROPYPATH": MP_PATH},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    kid = ps.key_id(bytes(range(32)))  # the tool's key id is the node's
    lines = r.stdout.splitlines()
    assert lines[0] == f"bound {kid} ['{kid}']" and lines[1] == f"again {kid}"
    assert lines[2].startswith(f"refused node key {kid} was in use on this board")
    assert "issues a new key" in lines[2]
    assert lines[3] == f"new key {ps.key_id(bytes(32))}"


@pytest.mark.micropython
def test_the_tools_probe_sees_the_counters_the_node_bound(tmp_path: Path) -> None:
    """PROBE_SCRIPT (what `provision` runs at the board's REPL) on MicroPython, after a boot."""
    board = tmp_path / "board"
    board.mkdir()
    (board / "node.json").write_text(json.dumps({"id": NODE, "key_file": "node.key",
                                                 "state_dir": "state"}))
    write_secret(board / "node.key", OLD_KEY.hex() + "\n")
    probe = tmp_path / "probe.py"
    probe.write_text(ps.PROBE_SCRIPT)

    def run_probe() -> str:
        r = subprocess.run([str(MICROPYTHON), str(probe)], env={"MICROPYPATH": MP_PATH},
                           capture_output=True, text=True, timeout=60, cwd=board)
        assert r.returncode == 0, r.stdout + r.stderr
        return str(ps.parse_probe(r.stdout)["state"])

    assert run_probe() == "none"  # provisioned, never booted
    (board / "state").mkdir()
    (board / "state/seq").write_text("32")
    assert run_probe() == f"legacy:{ps.key_id(OLD_KEY)}"  # firmware from before key ids
    script = tmp_path / "boot.py"
    script.write_text("from node import start\nfrom node.outbox import Outbox\n"
                      "Outbox('state')\n"
                      "start.bind_state('state', start.load_key('node.key'), None)\n")
    r = subprocess.run([str(MICROPYTHON), str(script)], env={"MICROPYPATH": MP_PATH},
                       capture_output=True, text=True, timeout=60, cwd=board)
    assert r.returncode == 0, r.stdout + r.stderr
    assert run_probe() == f"key:{ps.key_id(OLD_KEY)}"


# ---- finding 6: the node's key-file check does not pretend -----------------------------------

@pytest.mark.micropython
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="a mode-000 file is readable by root only")
def test_a_key_file_without_permission_bits_is_reported_not_passed(tmp_path: Path) -> None:
    """littlefs reports st_mode 0o100000 for every file: no bits, so the 0600 check cannot
    fail there. A mode-000 file on the unix port gives the node the same st_mode."""
    key_file = tmp_path / "node.key"
    key_file.write_text(OLD_KEY.hex() + "\n")
    key_file.chmod(0)
    script = tmp_path / "load.py"
    script.write_text("import sys\nfrom node import start\n"
                      "print(start.load_key(sys.argv[1]).hex())\n")
    r = subprocess.run([str(MICROPYTHON), str(script), str(key_file)],
                       env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == OLD_KEY.hex()
    assert "keeps no permission bits" in r.stdout, r.stdout
    key_file.chmod(0o644)
    r = subprocess.run([str(MICROPYTHON), str(script), str(key_file)],
                       env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "mode 644 lets other users read it" in r.stderr
