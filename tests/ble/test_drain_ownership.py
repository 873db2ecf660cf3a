"""BLE drain ownership and robustness (review findings 2026-11-29, each failing before its fix).

2. BLE link: an authentic start ACK is not bound to a connection; the gateway hands one to any
   central advertising a node's (public) tag, and replaying it makes the replayer the node's
   puller and keeps it there, so the real gateway can never drain the node.
3. BLE link: an authentic ACK whose seqs are not a list of ints raises out of `_on_ack` and
   ends the `_events` task: the node hears no other write (the UART link checks the shape).
4. BLE link: `lantern diag node --ble` is disconnected after `pull_timeout_ms` (10 s by
   default) because a diagnostic central never sends an ACK.

The fixes: a start ACK carries the nonce the node put in STATE for that connection, and only
an ACK of a frame in flight keeps a puller; ACKs are shape-checked and no exception ends the
event task; an accepted command keeps a diagnostic central, and a dropped one is said plainly.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from bleak import BleakClient
from bleak.exc import BleakError
from bumble.device import Connection

from lantern.agent import protocol
from lantern.agent.links.ble_session import (
    CTRL_UUID,
    DATA_UUID,
    NONCE_LEN,
    STATE_UUID,
    segments,
    start_message,
    state_nonce,
)

ROOT = Path(__file__).resolve().parents[2]

def _ack(key: bytes, node: str, payload: dict[Any, Any]) -> bytes:
    """An authentic ACK message (type | COSE_Mac0) under the node key."""
    return bytes((protocol.ACK,)) + protocol.create_mac0(
        key, node.encode(), 0, cbor2.dumps(payload, canonical=True))


async def _write(client: BleakClient, msg: bytes) -> None:
    size = client.services.get_characteristic(CTRL_UUID).max_write_without_response_size
    for seg in segments(msg, size):
        await client.write_gatt_char(CTRL_UUID, seg, response=True)


async def _connected_with_backlog(world: Any, node: Any, frames: int,
                                  address: str) -> tuple[BleakClient, Any]:
    """Start the node, wait for `frames` in its outbox, connect a central at `address`.

    Returns the client and its adapter (kept by the caller as long as the client lives)."""
    from .bleak_bumble import Adapter
    from .harness import until

    await node.start(world.link)
    await until(lambda: len(node.outbox) == frames, 60, "the backlog")
    adapter = Adapter(world.link, address)
    client = BleakClient(node.address, backend=adapter.backend()[1])
    await client.connect()
    return client, adapter


# --- 2. BLE: a start ACK obtained from the gateway lets anyone hold the node ---------------

@pytest.mark.ble_virtual
@pytest.mark.timeout(240)
async def test_a_replayed_start_ack_does_not_let_a_stranger_hold_the_node(tmp_path: Path) -> None:
    from .harness import World, senml_seqs, until  # noqa: I001 - the harness must come first
    from .spoofer import Spoofer

    from bluetooth import Chip  # tests/ble/upy, on sys.path once the harness is imported

    world = World(tmp_path)
    try:
        (node,) = world.add_nodes(1, sample_limit=20, interval_ms=5, link_cfg={
            "adv_interval_ms": 50, "rotate_ms": 100, "ack_timeout_ms": 1500,
            "pull_timeout_ms": 1500})
        # (a) the attacker advertises the node's tag (SHA-256(id)[:4], public): the gateway
        # connects and writes it an authentic start ACK under the node's key
        captured: list[bytes] = []

        class Recorder(Spoofer):
            def _on_write(self, conn: Connection, value: bytes) -> None:
                captured.append(bytes(value))

        chip = Chip(world.link, "F0:00:00:00:02:01")
        await chip.power_on()
        # it serves a STATE with a nonce of its own, so the gateway binds the ACK to that
        fake_nonce = bytes(range(NONCE_LEN))
        await Recorder(chip, node.node_id, [b""], fake_nonce).advertise()
        await world.start_gateway()
        await until(lambda: captured and not captured[-1][0] & 0x80, 60,
                    "the gateway to write its start ACK to the spoofer")
        await world.stop_gateway()
        chip.power_cut()
        start_ack = b"".join(seg[1:] for seg in captured)
        assert start_ack[0] == protocol.ACK
        m = protocol.parse_mac0(start_ack[1:])
        protocol.verify_mac0(node.key, m)
        assert cbor2.loads(m.payload)[3] == fake_nonce  # the strongest kind of start ACK

        # (b) the real node builds a backlog; the attacker connects and replays the ACK
        client, _attacker = await _connected_with_backlog(world, node, 20, "F0:00:00:00:00:66")
        got: list[bytes] = []
        await client.start_notify(DATA_UUID, lambda _c, d: got.append(bytes(d)))
        await _write(client, start_ack)
        # (c) the attacker replays the same ACK every second (below ack_timeout_ms) for 6 s.
        # Before the fix it became and stayed the puller, the node advertising
        # non-connectable all along (on a real radio no gateway could connect; the virtual
        # link does not enforce that); now the nonce is not its connection's, it never pulls
        # and is dropped after pull_timeout_ms
        link = node.node.link
        connectable = []
        end = time.monotonic() + 6
        while time.monotonic() < end and client.is_connected:
            await asyncio.sleep(1.0)
            connectable.append(not link._p.connections)
            try:
                await _write(client, start_ack)
            except BleakError:
                break  # the node dropped it between our check and the write
        facts = {"DATA segments notified to the attacker": len(got),
                 "attacker still connected after 6 s": client.is_connected,
                 "attacker is the puller": link._pull is not None
                 and link._pull.handle in link._p.connections,
                 "node advertised connectable": any(connectable),
                 "dropped_pullers": link.stats.dropped_pullers,
                 "acked": link.stats.acked, "outbox": len(node.outbox),
                 "delivered upstream": len(senml_seqs(world.upstream))}
        assert not got and not client.is_connected, str(facts)
        assert link.stats.bad_starts >= 1 and link.stats.acked == 0, str(facts)
    finally:
        await world.close()


@pytest.mark.ble_virtual
@pytest.mark.timeout(180)
async def test_a_relayed_start_cannot_keep_the_node_past_ack_timeout(tmp_path: Path) -> None:
    # the residual risk (docs/ble.md): a relay with two radios hands the gateway this
    # connection's nonce and brings back a start ACK bound to it, here made with the key
    # as the gateway would; the relay becomes the puller, but replaying that ACK (which
    # names no frame in flight) does not keep it past ack_timeout_ms
    from .harness import World, until

    world = World(tmp_path)
    try:
        (node,) = world.add_nodes(1, sample_limit=20, interval_ms=5, link_cfg={
            "adv_interval_ms": 50, "rotate_ms": 100, "ack_timeout_ms": 1500,
            "pull_timeout_ms": 60000})
        client, _relay = await _connected_with_backlog(world, node, 20, "F0:00:00:00:00:65")
        got: list[bytes] = []
        await client.start_notify(DATA_UUID, lambda _c, d: got.append(bytes(d)))
        nonce = state_nonce(await client.read_gatt_char(STATE_UUID))
        assert nonce is not None and len(nonce) == NONCE_LEN
        start_ack = start_message(node.key, node.node_id, nonce)
        await _write(client, start_ack)
        await until(lambda: got, 30, "the drain to start for the relay")
        end = time.monotonic() + 30
        while time.monotonic() < end and client.is_connected:
            try:
                await _write(client, start_ack)
            except BleakError:
                break  # dropped between the check and the write
            await asyncio.sleep(0.5)
        link = node.node.link
        assert not client.is_connected, "a replayed start kept the relay as the puller"
        assert link.stats.dropped_pullers == 1 and link.stats.acked == 0
        assert len(node.outbox) == 20  # nothing lost: the next drain has them all
    finally:
        await world.close()


# --- 3. BLE: an authentic but malformed ACK ends the node's event task ---------------------

@pytest.mark.ble_virtual
@pytest.mark.timeout(120)
async def test_a_malformed_authentic_ack_leaves_the_ble_node_listening(tmp_path: Path) -> None:
    from .harness import World

    world = World(tmp_path)
    try:
        (node,) = world.add_nodes(1, sample_limit=5, interval_ms=5)
        client, _central = await _connected_with_backlog(world, node, 5, "F0:00:00:00:00:67")
        link = node.node.link
        # seqs an int instead of a list: the UART link counts this as a bad ACK
        await _write(client, _ack(node.key, node.node_id, {1: 7, 2: 0}))
        # nor a list holding something else than ints
        await _write(client, _ack(node.key, node.node_id, {1: [b"x"], 2: 0}))
        # then a good ACK for seq 0
        await _write(client, _ack(node.key, node.node_id, {1: [0], 2: 1764331200000}))
        deadline = time.monotonic() + 10
        while 0 in node.outbox and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert 0 not in node.outbox, "the node no longer processes writes after a bad ACK"
        assert link.stats.bad_acks == 2 and link.stats.acked == 1
        await client.disconnect()
    finally:
        await world.close()


# --- 4. BLE: a diagnostic session is cut after pull_timeout_ms ------------------------------

@pytest.mark.ble_virtual
@pytest.mark.timeout(120)
async def test_a_diag_session_over_ble_outlives_pull_timeout(tmp_path: Path) -> None:
    from lantern.tools.field import nodelink as nl
    from lantern.tools.field.diag_ble import BleTransport

    from .bleak_bumble import Adapter
    from .harness import World, until

    world = World(tmp_path)
    try:
        (node,) = world.add_nodes(1, interval_ms=200, link_cfg={
            "adv_interval_ms": 50, "rotate_ms": 100, "pull_timeout_ms": 1500})
        await node.start(world.link)
        await until(lambda: len(node.outbox) >= 1, 30, "a pack")
        laptop = Adapter(world.link, "F0:00:00:00:00:77")
        t = BleTransport(node.node_id, backend=laptop.backend())
        await t.open()
        try:
            s = nl.NodeSession(t, {node.node_id: node.key}, timeout=5)
            await s.probe()
            code, _, _ = await s.command(nl.OP_STATUS)
            assert code == 0
            # a technician watching the status view (`diag node --ble live`, a STATUS
            # command every --every s, below pull_timeout_ms) for longer than pull_timeout_ms
            assert t._client is not None
            client = t._client
            deadline = time.monotonic() + 4
            while client.is_connected and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                code, _, _ = await s.command(nl.OP_STATUS)
                assert code == 0
            assert client.is_connected, "the node dropped the diagnostic central"
            # left idle past pull_timeout_ms, the node lets it go: the tool says so plainly
            await until(lambda: not client.is_connected, 30, "the node to drop the idle tool")
            with pytest.raises(nl.DiagError, match="the node dropped the connection"):
                await s.command(nl.OP_STATUS)
        finally:
            await t.close()
    finally:
        await world.close()
