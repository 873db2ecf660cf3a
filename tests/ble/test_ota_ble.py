"""Updates over BLE: agent/ota/transfer.py push() through the gateway's real BLE link (bleak
on the bumble virtual radio, tests/ble/bleak_bumble.py) to the node firmware's BLE link, its
COMMAND handling and its update code (node/commands.py, node/ota.py) on CPython.

The node boots as main.py does (harness.OtaNode): the boot record picks the slot and a
candidate is on trial until a pack of its own is ACKed. Bundles are real: `lantern release`'s
code, this firmware tree, mpy-cross.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent.nodecmd import OK, OP_STATUS, Channel, CommandError
from lantern.agent.ota.transfer import Outcome, TransferStats, push, split
from lantern.tools.field import provision_steps as ps
from lantern.tools.field import release

from .harness import (
    BASE_VERSION,
    OtaNode,
    World,
    add_ota_node,
    restore_boot,
    senml_seqs,
    until,
)

pytestmark = [pytest.mark.ota, pytest.mark.ble_virtual]

BOARD = "unix-sim"  # tests/ble/harness.py BOARD
NODE = "SL-0001"


@pytest.fixture(scope="module")
def rel() -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    mpy_cross = ps.find_mpy_cross()
    found = ps.mpy_cross_version(mpy_cross)
    assert found is not None
    files = release.firmware_files(mpy_cross, [BOARD])
    return {"key": key, "pub": key.public_key().public_bytes_raw(), "mpy": found[1],
            "files": files,
            "v2": release.bundle(key, "2.0.0", 1, "0.1.0", [BOARD], found[1], files)}


@pytest.fixture(autouse=True)
def _boot_state() -> Iterator[None]:
    yield
    restore_boot()  # the firmware version and boot record are per process here


@contextlib.asynccontextmanager
async def ota_node(world: World, rel: dict[str, Any], **kw: Any) -> AsyncIterator[OtaNode]:
    """One node (restarted when it resets) and the gateway, with the node's address proven."""
    kw.setdefault("interval_ms", 200)
    kw.setdefault("extra", {"update_trial_s": 120})
    node = add_ota_node(world, rel["pub"], **kw)
    await world.upstream.start()
    await node.start(world.link)
    supervisor = asyncio.create_task(node.supervise(world.link))
    try:
        await world.start_gateway()
        await until(lambda: world.ble.serves(NODE), 30, "the node's address proven")
        yield node
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor


def commander(world: World) -> Channel:
    ch = world.ble.commander
    assert isinstance(ch, Channel)
    return ch


async def all_delivered(world: World, node: OtaNode, what: str) -> None:
    """Every pack the node sealed, in any boot, upstream; none left in its outbox."""
    await until(lambda: node.node is not None and len(node.outbox) == 0
                and senml_seqs(world.upstream).get(node.node_id, set()) == set(node.sampled),
                60, what)


async def test_push_over_ble_while_packs_keep_flowing(world: World, rel: dict[str, Any]) -> None:
    async with ota_node(world, rel, sample_limit=60) as node:
        metrics = world.ble.ingest.metrics
        await until(lambda: metrics.frames_received[NODE] >= 1, 30, "a first pack")
        area = len(split(rel["v2"]).files)
        stats = TransferStats()
        before = metrics.frames_received[NODE]
        task = asyncio.create_task(push(commander(world), NODE, rel["v2"], stats=stats,
                                        confirm_s=120))
        await until(lambda: stats.bytes_sent >= area or task.done(), 120, "the file bytes sent")
        during = metrics.frames_received[NODE] - before
        out = await task
        assert out == Outcome(NODE, "updated", None, "2.0.0", "runs 2.0.0"), out
        # packs were taken while the chunks went down the same connection
        assert during > 0
        assert stats.bytes_sent >= area and not stats.refusals
        assert node.boots == 2 and node.versions == [BASE_VERSION, "2.0.0"]
        # nothing lost or doubled across the transfer and the reboot into the candidate
        await all_delivered(world, node, "every pack of both boots upstream")
        assert world.upstream.duplicates == 0
        assert metrics.frames_rejected["unexpected"] == 0  # REPLY/STATUS went to the channel
        # every REPLY matched its command (STATUS polls while the node resets may time out:
        # bumble has no supervision timeout, the dead connection ends at idle_timeout_s)
        assert commander(world).stats["late_replies"] == 0


async def test_push_over_ble_resumes_after_the_connection_drops(world: World,
                                                                rel: dict[str, Any]) -> None:
    async with ota_node(world, rel, sample_limit=60) as node:
        area = len(split(rel["v2"]).files)
        stats = TransferStats()
        task = asyncio.create_task(push(commander(world), NODE, rel["v2"], stats=stats,
                                        timeout=2.0, confirm_s=120))
        await until(lambda: stats.bytes_sent > area * 0.6 or task.done(), 120,
                    "more than half the bundle sent")
        assert not task.done()
        # the link drops (out of range): the node's controller ends the connection
        assert node.chip is not None
        conns = list(node.chip.device.connections.values())
        assert conns, "no connection to drop"
        for conn in conns:
            await conn.disconnect()
        out = await task
        link = node.node.link if node.node else None
        assert out.status == "updated" and out.version == "2.0.0", (out, link and vars(link))
        # the session that dropped failed; the commands went on in a new one (sent again by
        # the channel, or after push's own backoff)
        assert world.ble.stats["session_failures"] >= 1
        assert commander(world).stats["retries"] + stats.resumes >= 1
        # taken up from the node's `have`: a transfer from the start would resend > 60 %
        assert stats.bytes_sent < 1.5 * area, (stats, area)
        assert node.boots == 2  # the drop cost no reboot: only the one into the candidate
        await all_delivered(world, node, "every pack upstream")
        assert world.upstream.duplicates == 0


async def test_an_apply_whose_answer_is_lost_does_not_send_the_bundle_again(
        world: World, rel: dict[str, Any]) -> None:
    """The node resets as soon as its answer to APPLY is queued; with the reset immediate
    (flush_on_reset=False) that answer never leaves. push must then read the node's state,
    not offer the bundle again: before this was fixed, a retried APPLY met the candidate,
    heard "incomplete" and the whole bundle went out again, without end."""
    async with ota_node(world, rel, sample_limit=60, flush_on_reset=False) as node:
        area = len(split(rel["v2"]).files)
        stats = TransferStats()
        out = await asyncio.wait_for(
            push(commander(world), NODE, rel["v2"], stats=stats, confirm_s=60), 90)
        assert (out.status, out.version) == ("updated", "2.0.0"), (out, stats)
        assert stats.offers == 1 and "incomplete" not in stats.refusals, stats
        assert stats.bytes_sent < 1.5 * area, (stats, area)
        assert node.boots == 2, node.boots  # one reboot, into the candidate


@pytest.mark.parametrize("case", ["other_board", "other_key", "flipped"])
async def test_a_refusal_over_ble_reaches_the_outcome(world: World, rel: dict[str, Any],
                                                      case: str) -> None:
    key = Ed25519PrivateKey.generate() if case == "other_key" else rel["key"]
    boards = ["esp32-devkitc"] if case == "other_board" else [BOARD]
    bundle = bytearray(release.bundle(key, "2.0.1", 1, "0.1.0", boards, rel["mpy"],
                                      rel["files"]))
    if case == "flipped":
        bundle[-100] ^= 0x01  # in the last file: its hash fails when it completes
    async with ota_node(world, rel, sample_limit=30) as node:
        stats = TransferStats()
        out = await push(commander(world), NODE, bytes(bundle), stats=stats, confirm_s=30)
        expect = {"other_board": "other_board", "other_key": "other_key", "flipped": "file"}
        assert (out.status, out.reason) == ("refused", expect[case]), out
        assert stats.refusals[expect[case]] >= 1 and stats.outcomes["refused"] == 1
        assert node.boots == 1 and node.versions == [BASE_VERSION]
        code, st = await commander(world).command(NODE, OP_STATUS)
        assert code == OK and st["fw"] == BASE_VERSION and st["upd"]["state"] != "candidate"


async def test_commands_open_a_session_and_cannot_hold_the_radio(world: World) -> None:
    """A node with nothing to send is connected for a command; a node commanded without end
    yields its connection at max_command_session_s, and a node with a backlog gets it."""
    world.ble_opts = {"max_connections": 1, "max_session_s": 1, "max_command_session_s": 3}
    a, b = world.add_nodes(2, sample_limit=3, interval_ms=20)
    b.sample_limit = 20
    await world.upstream.start()
    await a.start(world.link)
    await world.start_gateway()
    ble = world.ble
    ch = commander(world)
    await until(lambda: len(a.outbox) == 0 and not ble.sessions and ble.serves(a.node_id), 60,
                "the first node drained and let go")
    answered = 0
    stop = asyncio.Event()

    async def keep_commanding() -> None:
        nonlocal answered
        while not stop.is_set():
            with contextlib.suppress(CommandError):
                code, _ = await ch.command(a.node_id, OP_STATUS, timeout=2.0, retries=0)
                answered += code == OK

    task = asyncio.create_task(keep_commanding())
    try:
        await until(lambda: answered >= 1, 30, "an answer from the idle node")
        assert ch.stats["command_connects"] >= 1  # opened for the command: no backlog
        await b.start(world.link)  # a backlog waits; the one connection is the first node's
        await until(lambda: senml_seqs(world.upstream).get(b.node_id) == set(range(20)), 60,
                    "the second node drained while the first is commanded")
        assert ch.stats["command_limits"] >= 1
        before = answered
        await until(lambda: answered > before, 30, "the first node commanded again")
    finally:
        stop.set()
        await task
    assert world.upstream.duplicates == 0

