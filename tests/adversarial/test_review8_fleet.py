"""Review 8: live key rotation, group configuration and fleet provisioning under attack
(issue 17). Each test is a finding that fails on today's code (strict xfail); its docstring
says the attack, what should happen, and what happens instead."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from lantern import FIRMWARE
from lantern.agent.errors import ConfigError
from lantern.agent.fleetops import FleetOps, check_settings, parse_assignments
from lantern.agent.registry import Registry
from lantern.tools.street.sim import MICROPYTHON
from tests.helpers.fleet import Link, frame, gateway, rotate, send

A = "SL-0001"
KA, KN = bytes(range(32)), bytes(range(100, 132))


# The node's own command handling (node/commands.py, node/rekey.py) on the MicroPython unix
# port; the Node object holds only what they read (its outbox's next sequence, its config).
NODE_PRELUDE = """
import json, sys
from node import cbor, frame
from node.commands import Commands, NodeActions
from node.probe import seal
from node.x25519 import public

STATE = sys.argv[1]
K0 = bytes(range(32))
T = 1764331200000


class Outbox:
    _next = 7


class Hal:
    pass


class N:
    pass


n = N()
n.node_id, n.kid, n.board = "SL-0001", b"SL-0001", {"name": "unix-sim"}
n.cfg = {"state_dir": STATE, "key_file": STATE + "/node.key"}
n.key, n.key_version, n.key_prev, n.key_first = K0, 0, None, None
n.outbox, n.hal, n.link = Outbox(), Hal(), None
cmds = Commands("SL-0001", K0, STATE, NodeActions(n))
n._commands = cmds


def cmd(key, counter, op, args):
    body = seal(key, n.kid, counter, cbor.dumps({1: op, 2: args}), frame.COMMAND)
    return ["reply" if t == frame.REPLY else "status" for t, b, a in cmds.handle(body)]


GW = public(bytes(range(200, 232)))  # the gateway's ephemeral public key
assert cmd(K0, T + 1, 14, {1: GW, 2: 1}) == ["reply"]
assert cmd(K0, T + 2, 15, {2: 1}) == ["reply"] and n.key != K0
"""


def on_node(tmp: Path, script: str) -> dict[str, object]:
    """Run the prelude and `script` on the unix port; the JSON it prints last."""
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    path = tmp / "script.py"
    path.write_text(NODE_PRELUDE + script)
    r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=1M", str(path), str(state)],
                       env={"MICROPYPATH": f"{FIRMWARE}:{MICROPYTHON.parents[1] / 'extmod'}"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def queued(path: Path, node: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [s for (s,) in db.execute("SELECT seq FROM frames WHERE node = ? ORDER BY seq",
                                         (node,))]


async def test_an_old_key_frame_committed_beside_a_new_key_frame_is_not_taken_twice(
        tmp_path: Path) -> None:
    """Attack: right after a rotation the node's outbox holds seq 2 (sealed under the old
    key, below first_new = 3) and seq 3 (new key); both reach the gateway in one group commit.
    The ACK of seq 2 is lost and the node sends it again (or anyone on the radio plays the
    recorded frame back, at any time until the next rotation).
    Expected: seq 2 is a duplicate: counted, acknowledged again, never taken a second time.
    Instead: ingest marks every seq of a commit in the window current at commit time (the new
    key's, swapped in by seq 3); the old key's own window never records seq 2, so the resend
    is taken as new. The queue's UNIQUE (node, seq) hides it only while the first copy is
    still queued: once forwarded, each replay is queued and sent upstream again."""
    async with gateway(tmp_path, {A: KA}) as (ingest, fleet, metrics, _store):
        link = Link()
        ops = fleet.attach(ingest, [link], metrics)
        assert isinstance(ops, FleetOps)
        await send(ingest, link, frame(KA, A, 1))
        await rotate(fleet, ops, A, KA, KN, 3)
        ingest.committed.clear()
        ingest.on_data(link, frame(KA, A, 2))
        ingest.on_data(link, frame(KN, A, 3))
        await asyncio.wait_for(ingest.committed.wait(), 10)
        while ingest._pending:  # both in one commit or not: wait until neither waits
            ingest.committed.clear()
            await asyncio.wait_for(ingest.committed.wait(), 10)
        assert metrics.frames_received[A] == 3
        ingest.on_data(link, frame(KA, A, 2))  # the same frame again (ACK lost / replayed)
        # decided at once: a duplicate is counted and ACKed, a frame taken waits for a commit
        taken = (A, 2) in ingest._pending_ids
        assert (taken, metrics.duplicates[A]) == (False, 1), dict(metrics.frames_rejected)


@pytest.mark.micropython
def test_a_stolen_old_key_cannot_lock_the_gateway_out_of_the_node(tmp_path: Path) -> None:
    """Attack: after a rotation (committed, its REPLY heard), the thief of the old key sends
    one COMMIT of the committed version under the old key with counter 2^62 (any time until
    the next rotation: the previous key is kept that long). Then the gateway sends its next
    COMMAND under the new key with its usual counter (Unix ms).
    Expected: the old-key COMMIT moves nothing (at most answered, never raising the floor a
    new-key COMMAND must pass), and the gateway's COMMAND is answered.
    Instead: _recommit lets it through the MAC check, the counter check takes 2^62 as the new
    floor (persisted), and every COMMAND the gateway sends after it is refused as a replay
    (STATUS reason 3): no more rotations, configuration or updates for this node."""
    out = on_node(tmp_path, """
thief = cmd(K0, 1 << 62, 15, {2: 1})
floor = cmds.floor
gateway = cmd(n.key, T + 1000, 14, {1: GW, 2: 2})
print(json.dumps({"thief": thief, "floor": floor, "gateway": gateway}))
""")
    assert out["floor"] < 1 << 62 and out["gateway"] == ["reply"], out  # type: ignore[operator]


async def test_a_replayed_old_frame_does_not_reopen_new_key_frames(tmp_path: Path) -> None:
    """Attack: a radio attacker with no key records any old-key frame (seq 2, below
    first_new = 3) and, long after the rotation, plays it back while a new-key frame (seq 4)
    waits for its group commit; later it plays seq 4 back.
    Expected: both playbacks are duplicates; seq 4 is never taken twice.
    Instead: the playback of seq 2 (a duplicate, rightly) still makes the old key's window the
    node's current one; the commit then marks seq 4 in the old key's window, the new key's
    never records it, and the playback of seq 4 is taken as new (queued and forwarded again
    once the first copy has left the queue)."""
    async with gateway(tmp_path, {A: KA}) as (ingest, fleet, metrics, _store):
        link = Link()
        ops = fleet.attach(ingest, [link], metrics)
        assert isinstance(ops, FleetOps)
        for seq in (1, 2):
            await send(ingest, link, frame(KA, A, seq))
        await rotate(fleet, ops, A, KA, KN, 3)
        await send(ingest, link, frame(KN, A, 3))
        ingest.committed.clear()
        ingest.on_data(link, frame(KN, A, 4))
        ingest.on_data(link, frame(KA, A, 2))  # the playback: a duplicate
        assert metrics.duplicates[A] == 1
        while (A, 4) in ingest._pending_ids:
            ingest.committed.clear()
            await asyncio.wait_for(ingest.committed.wait(), 10)
        ingest.on_data(link, frame(KN, A, 4))  # the second playback
        taken = (A, 4) in ingest._pending_ids
        assert (taken, metrics.duplicates[A]) == (False, 2), dict(metrics.frames_rejected)


def test_group_offsets_out_of_the_nodes_range_are_refused_before_sending() -> None:
    """Careless operator: `lantern gateway group set north offsets.temperature=50` (or
    `=inf`, a typo for a sensor offset).
    Expected: refused by the CLI as window=9 is ("offsets.temperature: expected a number from
    -20 to 20"), nothing written: the node's range (node/netcfg.py OFFSET_MAX) is the contract.
    Instead: check_settings only checks that an offset is a number; the registry gets a new
    group version, every node of the group refuses it (code 2) and the whole group drifts."""
    for bad in (["offsets.temperature=50"], ["offsets.sound=inf"]):
        with pytest.raises(ConfigError, match="offsets"):
            check_settings(parse_assignments(bad))


async def test_one_bad_group_row_does_not_stop_revocations(tmp_path: Path) -> None:
    """Careless operator: a group's settings edited by hand with sqlite3 and left as invalid
    JSON ({interval_ms: 30000}); then node A's key is reported stolen and revoked.
    Expected: the bad row is reported (and skipped); `Registry` still opens, so the revocation
    is written, and the running gateway refuses A's frames at its next registry tick.
    Instead: Registry._refresh parses every group's JSON before reading the nodes, so opening
    the registry raises JSONDecodeError (a traceback in `lantern gateway nodes revoke`). The
    running gateway's tick raises the same once, after noting the file's data_version, so its
    later ticks see no change: a revocation written by any means is never applied, and A's
    frames keep being accepted."""
    async with gateway(tmp_path, {A: KA}) as (ingest, fleet, metrics, _store):
        link = Link()
        fleet.attach(ingest, [link], metrics)
        await send(ingest, link, frame(KA, A, 1))
        await asyncio.to_thread(fleet.registry.set_group, "north", {"interval_ms": 30000})
        path = fleet.registry.path
        with contextlib.closing(sqlite3.connect(path)) as db:  # the hand edit
            db.execute("UPDATE groups SET settings = '{interval_ms: 30000}'")
            db.commit()
        other = await asyncio.to_thread(Registry, path)  # as `lantern gateway nodes revoke`
        try:
            await asyncio.to_thread(other.revoke, A, "key stolen")
        finally:
            other.close()
        await fleet.tick({A: 1.0}, {}, ingest.forget, [])
        ingest.on_data(link, frame(KA, A, 2))
        assert metrics.frames_rejected["revoked"] == 1
