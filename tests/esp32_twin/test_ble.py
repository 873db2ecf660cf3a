"""A compressed day of deep-sleep cycles on the ESP32 twin over BLE: the port's `bluetooth` model
on the bumble radio, drained by the real gateway's BLE link (bleak on the BLE tier's bumble
backend), with a power cut and a watchdog reset in it."""

from __future__ import annotations

import os
from pathlib import Path

from tests.ble.harness import World, senml_seqs, until

from .ble_bridge import BleBridge
from .twin import DEEPSLEEP_RESET, PWRON_RESET, WDT_RESET, TwinNode

HALF_HOUR = 1_800_000
DAY_CYCLES = 48
# board time runs 50x the host's: BLE timeouts are in board ms, the radio runs in host time
LINK = {"type": "ble", "adv_interval_ms": 50, "rotate_ms": 5000, "bthome": "plain",
        "pull_timeout_ms": 500_000, "ack_timeout_ms": 3_000_000, "rto_ms": 500_000}


async def test_a_day_of_deep_sleep_cycles_over_ble(tmp_path: Path, micropython: Path) -> None:
    world = World(tmp_path)
    node = TwinNode("SL-0001", tmp_path / "nodes", interval_ms=HALF_HOUR,
                    extra={"deep_sleep": True, "awake_max_ms": 400_000,
                           "watchdog_ms": 300_000, "link": LINK})
    bridge = BleBridge(world.link, "F0:00:00:00:01:01",
                       f"lantern-twin-ble-{os.getpid()}-{abs(hash(str(tmp_path))):x}")
    world.nodes = [node]  # type: ignore[list-item] - the gateway's keys; World stops them
    try:
        await bridge.start()
        node.ble_name = bridge.name
        await world.start_gateway()
        node.start()
        await node.wait_boots(16, 120)
        node.power_cut()
        await node.wait_boots(30, 120)
        node.hang_bus()  # the sensor bus stops answering: the watchdog resets the node
        await node.wait_boots(DAY_CYCLES + 2, 240)
        sealed = node.sampled()
        await until(lambda: senml_seqs(world.upstream).get(node.node_id, set()) >= set(sealed),
                    60, "every sealed pack upstream")
    finally:
        await world.close()
        await bridge.close()
    assert world.upstream.duplicates == 0
    assert senml_seqs(world.upstream)[node.node_id] == set(sealed)
    assert len(sealed) >= DAY_CYCLES - 2  # the cut and the hang cost a cycle each
    ends = [b.end for b in node.boots if b.end]
    assert ends.count("power_cut") == 1 and ends.count("watchdog") == 1, ends
    resets = [b.reset for b in node.boots]
    assert resets.count(PWRON_RESET) == 2 and resets.count(WDT_RESET) == 1
    assert resets.count(DEEPSLEEP_RESET) == ends.count("deepsleep")
    assert bridge.boots >= DAY_CYCLES  # a fresh radio each wake-up
    # each sleeping cycle's pack was acknowledged over BLE before the node slept again
    out = node.output()
    assert out.count("deep sleep:") == out.count("outbox 0") == ends.count("deepsleep")
