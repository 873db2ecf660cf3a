"""Finding 2 over BLE: allocation bombs written to a node's GATT write characteristic.

The firmware's BLE link (node.link_ble, the real code) runs under CPython on the bumble
virtual radio (tests/ble/harness.py). A stranger connects and writes every bomb of
test_node_bombs as an ACK and as a COMMAND, in rounds, each round followed by a genuine
command that the node must answer; then a genuine ACK must empty the node's outbox.

CPython has no board-sized heap to run out of, so what a bomb costs is measured instead:
tracemalloc's peak while the node handles one written message. Before the fix the link
decoded a forged ACK before checking its MAC, and one message cost tens of KB; now it costs
little more than the message itself, which is what MicroPython on a board can afford.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from bleak import BleakClient

from lantern.agent import protocol
from lantern.agent.links.ble_session import CTRL_UUID, DATA_UUID, segments
from lantern.tools.field import nodelink as nl
from tests.helpers.bombs import bombs

pytestmark = pytest.mark.ble_virtual

# Peak heap while the node handles one message from a peer: the message and a few copies of
# it (reassembly, the payload slice, the MAC_structure), nowhere near what its decoding cost.
PEAK_LIMIT = 8 * 1024


class Messages:
    """Messages the node notified on DATA, reassembled; REPLYs verified under the node key."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.buf = bytearray()
        self.replies: dict[int, Any] = {}  # counter -> REPLY payload
        self.statuses = 0

    def answered(self, counter: int) -> Callable[[], bool]:
        return lambda: counter in self.replies

    def on_notify(self, _char: Any, seg: bytearray) -> None:
        self.buf += seg[1:]
        if seg[0] & 0x80:
            return
        msg, self.buf = bytes(self.buf), bytearray()
        if msg and msg[0] == protocol.REPLY:
            _, counter, payload = nl.unseal(self.key, msg[1:], protocol.REPLY)
            self.replies[counter] = payload
        elif msg and msg[0] == protocol.STATUS:
            self.statuses += 1


@pytest.mark.timeout(300)
async def test_ble_node_survives_allocation_bombs_and_hears_the_next_ack(
        tmp_path: Path) -> None:
    from tests.ble.bleak_bumble import Adapter
    from tests.ble.harness import World, until

    world = World(tmp_path)
    peaks: list[tuple[str, int]] = []  # (message type, peak bytes while a bomb was handled)
    tracemalloc.start()
    try:
        (node,) = world.add_nodes(1, sample_limit=6, interval_ms=5, link_cfg={
            "adv_interval_ms": 50, "rotate_ms": 100, "pull_timeout_ms": 120_000})
        await node.start(world.link)
        await until(lambda: len(node.outbox) == 6, 60, "the backlog")
        link = node.node.link
        hostile = set(bombs())

        def measured(kind: str, handle: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any) -> Any:
                # synchronous: what is allocated until it returns is this message's doing
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                out = handle(*args)
                if bytes(args[-1]) in hostile:
                    peaks.append((kind, tracemalloc.get_traced_memory()[1] - base))
                return out
            return run

        link._on_ack = measured("ACK", link._on_ack)
        node.node.handle = measured("COMMAND", node.node.handle)  # link.commands is the node
        adapter = Adapter(world.link, "F0:00:00:00:00:66")  # a stranger, not a gateway
        client = BleakClient(node.address, backend=adapter.backend()[1])
        await client.connect()
        got = Messages(node.key)
        await client.start_notify(DATA_UUID, got.on_notify)
        ctrl = client.services.get_characteristic(CTRL_UUID)
        assert ctrl is not None
        size = ctrl.max_write_without_response_size

        async def write(msg: bytes) -> None:
            for seg in segments(msg, size):
                await client.write_gatt_char(CTRL_UUID, seg, response=True)

        # a probe and a command first: the node loads its diagnostics on the first real
        # COMMAND (once per boot, whoever sends it; a probe is answered by node/probe.py
        # without them), which is not what a bomb costs
        await write(bytes((protocol.COMMAND,)))
        await until(lambda: got.statuses == 1, 30, "the STATUS answering a probe")
        counter = int(time.time() * 1000)
        await write(bytes((protocol.COMMAND,)) + nl.seal(
            node.key, node.node_id.encode(), counter,
            cbor2.dumps({1: nl.OP_STATUS, 2: {}}), protocol.COMMAND))
        await until(got.answered(counter), 30, "the REPLY that loaded the diagnostics")
        sent = 0
        for rnd in range(3):
            for body in bombs():
                await write(bytes((protocol.ACK,)) + body)
                await write(bytes((protocol.COMMAND,)) + body)
                sent += 1
            counter += 1
            await write(bytes((protocol.COMMAND,)) + nl.seal(
                node.key, node.node_id.encode(), counter,
                cbor2.dumps({1: nl.OP_STATUS, 2: {}}), protocol.COMMAND))
            await until(got.answered(counter), 30,
                        f"the REPLY to a genuine command in round {rnd + 1}")
            status = got.replies[counter][3]
            assert status["link"]["bad_acks"] == sent, status["link"]
            assert status["cmd"]["refused"] == sent, status["cmd"]
            assert link.stats.rx_errors == 0  # no segment broken, no handler failed
        seqs = sorted(node.outbox.seqs())
        assert seqs
        payload = cbor2.dumps({1: seqs, 2: int(time.time() * 1000)}, canonical=True)
        await write(bytes((protocol.ACK,)) + protocol.create_mac0(
            node.key, node.node_id.encode(), max(seqs), payload))
        await until(lambda: len(node.outbox) == 0, 30, "the genuine ACK to empty the outbox")
        assert link.stats.acked == len(seqs)
        await client.disconnect()
    finally:
        tracemalloc.stop()
        await world.close()
    assert len(peaks) == 2 * sent
    for kind in ("ACK", "COMMAND"):
        worst = max(p for k, p in peaks if k == kind)
        print(f"peak heap while the node handled one bomb as {kind}: {worst} bytes")
        assert worst < PEAK_LIMIT, (kind, sorted(peaks, key=lambda p: -p[1])[:5])
