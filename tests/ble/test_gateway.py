"""The gateway's BLE link under load and faults: connection limit, retries, adapter trouble."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from lantern.agent.links.ble import node_tag
from lantern.agent.links.ble_adverts import UNPROVEN_PER_NODE
from lantern.agent.links.ble_session import SERVICE_UUID

from .bleak_bumble import Adapter
from .harness import World, ble_metrics, check_exported, senml_seqs, until

pytestmark = pytest.mark.ble_virtual


def all_delivered(world: World, frames: int) -> bool:
    want = {n.node_id: set(range(frames)) for n in world.nodes}
    return senml_seqs(world.upstream) == want and all(
        n.node is not None and len(n.outbox) == 0 for n in world.nodes)


async def backlog(world: World, n: int, frames: int, **link: int) -> None:
    await world.upstream.start()
    link_cfg = {"adv_interval_ms": 50, "rotate_ms": 100, **link}
    for node in world.add_nodes(n, sample_limit=frames, interval_ms=5, link_cfg=link_cfg):
        await node.start(world.link)
    await until(lambda: all(len(x.outbox) == frames for x in world.nodes), 60, "the backlogs")


async def test_connection_limit_is_kept(world: World) -> None:
    world.ble_opts = {"max_connections": 2}
    await backlog(world, 4, 60)
    await world.start_gateway()
    await until(lambda: all_delivered(world, 60), 120, "every backlog drained")
    assert world.adapter is not None and world.adapter.max_concurrent == 2
    assert world.upstream.duplicates == 0


async def test_refused_connects_are_retried_with_backoff(world: World) -> None:
    world.api = True
    await backlog(world, 2, 30)
    world.adapter = adapter = Adapter(world.link)
    adapter.fail_connects = 4
    await world.start_gateway()
    await until(lambda: all_delivered(world, 30), 120, "every backlog drained despite refusals")
    ble = world.ble
    await until(lambda: not ble.sessions, 30, "the last session to end")
    # plus any connect request a node missed while re-advertising (the radio refused it)
    failures = 4 + world.link.refused_connects
    assert ble.stats["session_failures"] == failures and adapter.fail_connects == 0
    assert ble.stats["drains"] >= 2 and world.upstream.duplicates == 0
    # the same counters on /metrics, as Prometheus reads them
    before = dict(ble.stats)
    scraped = ble_metrics(await world.scrape(), ble.name)
    check_exported(before, scraped, dict(ble.stats))
    assert scraped["session_failures"] == failures and scraped["connects"] >= 2 + failures
    assert scraped["drains"] >= 2 and scraped["frames"] >= 60
    assert scraped["scanner_starts"] >= 1 and "scanner_restarts" in scraped
    assert scraped["rejected_advert_replay"] == 0  # every kind there from the start


async def test_connect_request_the_node_missed_fails_the_connect(world: World) -> None:
    """A node's advertiser is off as the request comes (it re-advertises every rotate_ms):
    the connect fails with BleakError, as on a real radio, and the next one is taken."""
    await backlog(world, 1, 5)
    node = world.nodes[0]
    ctrl = node.chip.controller
    take, missed = ctrl.on_le_connect_ind, []

    def miss_first(packet: Any) -> None:
        if missed:
            take(packet)
        else:
            missed.append(packet)

    ctrl.on_le_connect_ind = miss_first
    adapter = Adapter(world.link)
    client = adapter.backend()[1](node.address, timeout=5.0)
    with pytest.raises(BleakError, match="device disconnected"):
        await client.connect(pair=False)
    assert len(missed) == 1 and world.link.refused_connects == 1
    assert not client.is_connected and not adapter.device.connections
    assert not adapter.controller.le_connections
    await client.connect(pair=False)
    assert client.is_connected and client.mtu_size > 23 and world.link.refused_connects == 1
    await client.disconnect()


async def test_scanner_that_will_not_start_is_retried(world: World) -> None:
    await backlog(world, 1, 20)
    world.adapter = adapter = Adapter(world.link)
    adapter.fail_scan_starts = 3
    await world.start_gateway()
    await until(lambda: all_delivered(world, 20), 120, "the backlog drained")
    assert world.ble.stats["scanner_start_failures"] == 3
    assert adapter.scan_starts == 1


async def test_adapter_that_vanishes_mid_drain_is_recovered(world: World) -> None:
    world.ble_opts = {"scan_stall_s": 1, "idle_timeout_s": 2}
    # one frame in flight, 20-byte segments: a drain slow enough to pull the plug on
    await backlog(world, 2, 150, window=1, mtu=23)
    await world.start_gateway()
    ble = world.ble
    gateway = world.gw_task
    await until(lambda: len(world.upstream.readings) > 0, 60, "the drain to begin")
    assert world.adapter is not None and not all_delivered(world, 150)
    world.adapter.vanish()  # USB adapter unplugged: no adverts, connections dead
    await until(lambda: ble.stats["scanner_restarts"] >= 1, 30, "the stall to be noticed")
    await until(lambda: ble.stats["scanner_start_failures"] >= 1, 30,
                "a failed restart while the adapter is gone")
    world.adapter.come_back()
    await until(lambda: all_delivered(world, 150), 180, "every backlog drained after recovery")
    assert gateway is world.gw_task and not gateway.done()  # the same process carried on
    assert world.upstream.duplicates == 0


async def test_advert_flood_does_not_keep_the_real_node_from_its_gateway(world: World) -> None:
    """The node's tag from 20,000 random addresses with the largest backlog there is (fed to
    the link's advert callback, as the scanner would) and from two spoofers on the radio that
    accept connections but serve no Lantern service; the gateway meanwhile restarted and has
    never proven the node's address. The node comes back: proven by its encrypted adverts,
    drained in full, shown at its own address; the link kept 4 claimers, not 20,000."""
    from bluetooth import Chip

    await backlog(world, 1, 30)
    node = world.nodes[0]
    await node.stop()  # powered off with its backlog in flash
    await world.start_gateway()
    ble = world.ble
    tag = node_tag(node.node_id)
    claim = b"\x01\xff\xff" + tag
    ad = AdvertisementData(None, {}, {SERVICE_UUID: claim}, [SERVICE_UUID], None, -40, ())
    raw = (b"\x02\x01\x06\x18\x21" + bytes.fromhex(SERVICE_UUID.replace("-", ""))[::-1]
           + claim)
    spoofers = [Chip(world.link, f"F0:00:00:00:0E:{i:02X}") for i in range(2)]
    for chip in spoofers:
        await chip.power_on()
        await chip.device.start_advertising(advertising_data=raw, advertising_interval_min=20,
                                            advertising_interval_max=20)
    rng = random.Random(21)
    for _ in range(20):
        for _ in range(1000):
            addr = ":".join(f"{b:02X}" for b in rng.randbytes(6))
            ble._on_advert(BLEDevice(addr, None, None), ad)
        await asyncio.sleep(0)
    await until(lambda: ble.stats["connects_unproven"] >= 1, 30, "a claimer to be tried")
    assert ble.snapshot()["nodes"].get(node.node_id) is None  # no address proven yet

    await node.start(world.link)  # it samples its 30 again

    def drained() -> bool:
        return (node.node is not None and len(node.sampled) == 60 and len(node.outbox) == 0
                and senml_seqs(world.upstream).get(node.node_id) == set(node.sampled))

    await until(drained, 120, "the node drained despite the flood")
    assert ble.snapshot()["nodes"][node.node_id]["address"] == node.address
    assert len(ble.book) <= 1 + UNPROVEN_PER_NODE
    assert ble.stats["address_evictions"] >= 20_000 - UNPROVEN_PER_NODE
    assert ble.stats["addresses_proven"] >= 1 and world.upstream.duplicates == 0
    # claimers are tried one at a time, backing off, and not at all once the node is proven
    tried = ble.stats["connects_unproven"]
    await until(lambda: not ble.sessions, 30, "the last session to end")
    heard = ble.stats["adverts"]  # the spoofers keep claiming the node every 20 ms
    await until(lambda: ble.stats["adverts"] >= heard + 50, 30, "the spoofers' next claims")
    assert ble.stats["connects_unproven"] == tried
    for chip in spoofers:
        chip.power_cut()
