"""Frames over GATT: drains that break and resume, and frames played back by a spoofer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from bleak import BleakClient

from lantern.agent.links.ble_session import (
    CTRL_UUID,
    DATA_UUID,
    STATE_UUID,
    segments,
    start_message,
    state_nonce,
)
from tests.ble.spoofer import Spoofer

from .bleak_bumble import Adapter
from .harness import World, senml_seqs, until

pytestmark = pytest.mark.ble_virtual


def delivered(world: World, frames: int, extra: dict[str, set[int]] | None = None) -> bool:
    want = {n.node_id: set(range(frames)) | (extra or {}).get(n.node_id, set())
            for n in world.nodes}
    return senml_seqs(world.upstream) == want and all(
        n.node is not None and len(n.outbox) == 0 for n in world.nodes)


async def backlog(world: World, n: int, frames: int, **link: Any) -> None:
    await world.upstream.start()
    link_cfg = {"adv_interval_ms": 50, "rotate_ms": 100, **link}
    for node in world.add_nodes(n, sample_limit=frames, interval_ms=5, link_cfg=link_cfg):
        await node.start(world.link)
    await until(lambda: all(len(x.outbox) == frames for x in world.nodes), 60, "the backlogs")


@pytest.mark.timeout(300)  # above the waits below: they say what was missing
async def test_short_sessions_and_the_smallest_mtu_still_deliver_once(world: World) -> None:
    # sessions cut after 0.3 s; 23-byte ATT MTU: every frame in ~10 segments each way
    world.ble_opts = {"max_session_s": 0.3, "backoff_initial_s": 0.05}
    await backlog(world, 2, 80, mtu=23)
    await world.start_gateway()
    await until(lambda: delivered(world, 80), 180, "every frame, across many sessions")
    ble = world.ble
    assert ble.stats["connects"] > 2 * 2  # the drain resumed on later connections
    assert world.upstream.duplicates == 0


async def test_power_cut_and_gateway_restart_mid_drain(world: World) -> None:
    world.ble_opts = {"idle_timeout_s": 1}
    await backlog(world, 2, 120, window=2, mtu=40)
    first, _ = world.nodes
    await world.start_gateway()
    await until(lambda: 0 < len(first.outbox) < 100, 60, "the first node's drain to be under way")
    await first.stop()  # power cut mid-drain: its unacknowledged frames stay in flash
    await asyncio.sleep(0.5)
    first.sample_limit, first.interval_ms = 1, 3_600_000  # one more pack after the reboot
    await first.start(world.link)  # reboot: the outbox comes back from flash
    await until(lambda: first.node.outbox._next > 120, 30, "the pack sampled at boot")
    extra = {first.node_id: {first.node.outbox._next - 1}}  # sequence numbers skip ahead
    await until(lambda: not delivered(world, 120, extra), 1, "the drain to go on")
    await world.stop_gateway()  # gateway restart mid-drain (the replay window is on disk)
    await world.start_gateway()
    await until(lambda: delivered(world, 120, extra), 180, "every frame after both interruptions")
    assert world.upstream.duplicates == 0


async def test_a_puller_that_stops_acknowledging_is_dropped(world: World) -> None:
    # a gateway whose process hung mid-drain: connected, drain started, then nothing
    await backlog(world, 1, 20, ack_timeout_ms=1500)
    (node,) = world.nodes
    adapter = Adapter(world.link, "F0:00:00:00:00:98")  # not the gateway's
    client = BleakClient(node.address, backend=adapter.backend()[1])
    await client.connect()
    got: list[bytes] = []
    await client.start_notify(DATA_UUID, lambda _c, d: got.append(bytes(d)))
    size = client.services.get_characteristic(CTRL_UUID).max_write_without_response_size
    nonce = state_nonce(await client.read_gatt_char(STATE_UUID))
    for seg in segments(start_message(node.key, node.node_id, nonce), size):
        await client.write_gatt_char(CTRL_UUID, seg, response=True)
    await until(lambda: got, 30, "the drain to start")
    await until(lambda: not client.is_connected, 60, "the node to drop the silent puller")
    stats = node.node.link.stats
    assert stats.dropped_pullers == 1 and stats.acked == 0
    assert len(node.outbox) == 20  # nothing acknowledged, nothing lost: the next drain has them
    await world.start_gateway()
    await until(lambda: delivered(world, 20), 120, "every frame through a working gateway")
    assert world.upstream.duplicates == 0




async def test_replayed_frames_are_rejected_and_counted(world: World) -> None:
    await backlog(world, 1, 100)
    (node,) = world.nodes
    recorded = [node.outbox.get(s) for s in node.outbox.seqs()]  # what went on air
    await world.start_gateway()
    await until(lambda: delivered(world, 100), 120, "the real node's frames")
    ble = world.ble
    metrics = ble.ingest.metrics
    readings = len(world.upstream.readings)

    from bluetooth import Chip

    # the real node goes off air: a gateway tries an address that has not proven itself
    # only for a node whose proven address is silent (agent/links/ble.py _pick)
    await node.stop()
    chip = Chip(world.link, "F0:00:00:00:02:01")
    await chip.power_on()
    spoofer = Spoofer(chip, node.node_id, recorded)
    await spoofer.advertise()
    # seq 0..35 lie below the 64-frame window under seq 99: replays; 36..99: duplicates
    await until(lambda: metrics.frames_rejected["replay"] == 36, 60, "36 replays refused")
    await until(lambda: metrics.duplicates[node.node_id] >= 64, 30, "64 duplicates seen")
    chip.power_cut()
    assert spoofer.sent == 100
    assert len(world.upstream.readings) == readings and world.upstream.duplicates == 0
