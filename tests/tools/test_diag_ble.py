"""`lantern diag node --ble`: the field tool over the Lantern GATT service on a virtual radio.

The node is the real firmware (node.app.Node with its BLE link, on CPython with the fake
`bluetooth` module of tests/ble); the tool is tools/field/diag_ble.py on bleak with the bumble
backend (tests/ble/bleak_bumble.py), as the gateway's BLE tier runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lantern.tools.field import diag
from lantern.tools.field import nodelink as nl
from lantern.tools.field.diag_ble import BleTransport
from tests.ble.bleak_bumble import Adapter
from tests.ble.harness import BleNode, World, until

pytestmark = pytest.mark.ble_virtual


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[World, BleNode]]:
    world = World(tmp_path)
    (n,) = world.add_nodes(1, interval_ms=200)
    await n.start(world.link)
    await until(lambda: len(n.outbox) >= 2, 30, "two packs in the outbox")
    try:
        yield world, n
    finally:
        await world.close()


async def test_status_and_commands_over_ble(node: tuple[World, BleNode]) -> None:
    world, n = node
    adapter = Adapter(world.link, address="F0:00:00:00:00:77")  # the technician's laptop
    t = BleTransport("SL-0001", backend=adapter.backend())
    await t.open()
    try:
        s = nl.NodeSession(t, {n.node_id: n.key}, timeout=5)
        ident = await s.probe()
        assert (ident.node_id, ident.verified) == ("SL-0001", True)
        rep = await diag.snapshot(s)
        st = rep["status"]
        assert st["id"] == "SL-0001" and st["link"]["rssi"] == t.rssi is not None
        assert rep["latest"]["verified"] and rep["latest"]["node"] == "SL-0001"
        assert st["outbox"] >= 2
        code, res, _ = await s.command(nl.OP_SET_INTERVAL, {1: 5000})
        assert (code, res) == (0, {"interval_ms": 5000})
        assert n.node.interval_ms == 5000
        tests = await diag.self_test(s)
        assert tests and all(x["ok"] for x in tests), tests
        # never a drain: the node kept everything for the gateway
        assert n.node.link.stats.acked == 0 and len(n.outbox) >= st["outbox"]
    finally:
        await t.close()


async def test_unknown_node_over_ble_says_what_to_check(node: tuple[World, BleNode]) -> None:
    world, _ = node
    adapter = Adapter(world.link, address="F0:00:00:00:00:78")
    t = BleTransport("SL-0404", scan_s=1.0, backend=adapter.backend())
    with pytest.raises(nl.DiagError, match="no Lantern node SL-0404 heard over BLE in 1 s"):
        await t.open()
