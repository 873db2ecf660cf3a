"""Live key rotation and group settings at the gateway (agent/fleetops.py, docs/fleet.md):
the real registry, ingest, queue and command channel, against a node model that follows the
issue-17 wire contract (REKEY 14, COMMIT 15, CONFIG 16) at the link boundary."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import cbor2
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from lantern.agent import cli, fleetops, nodecmd, protocol
from lantern.agent.api import Api, GatewayView
from lantern.agent.config import write_secret
from lantern.agent.errors import ConfigError
from lantern.agent.fleetops import check_settings, derive, parse_assignments
from lantern.agent.registry import REGISTRY_FILE, Registry, key_id
from lantern.tools.street.sim import gateway_toml
from tests.helpers.api import FakeForwarder, FakeLink
from tests.helpers.fleet import Link, frame, gateway, send

pytestmark = pytest.mark.fleet

A, B = "SL-0001", "SL-0002"
KA, KB = bytes(range(32)), bytes(range(1, 33))


def hkdf(ikm: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    """RFC 5869 written out, to check `derive` against."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + t, i + 1
    return out[:n]


def acked_under(data: bytes, key: bytes) -> bool:
    chunk = protocol.Deframer().feed(data)[0]
    assert chunk is not None
    m = protocol.parse_mac0(protocol.decode_frame(chunk)[1])
    protocol.NodeKey(key, m.kid).verify(m)  # AuthError if not
    return True


def queued(path: Path, node: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [s for (s,) in db.execute("SELECT seq FROM frames WHERE node = ? ORDER BY seq",
                                         (node,))]


class NodeModel:
    """A node's command handling by the contract: keys, pending and committed versions,
    settings; `lose` drops the next REPLYs to an op (the radio losing them)."""

    def __init__(self, node: str, key: bytes, refuse: set[str] | None = None) -> None:
        self.node, self.key = node, key
        self.prev: bytes | None = None
        self.version, self.seq = 0, 0
        self.first_new: int | None = None
        self.pending: tuple[bytes, int, bytes, bytes] | None = None
        self.config_version = 0
        self.settings: dict[str, Any] = {}
        self.refuse = refuse or set()
        self.lose: dict[int, int] = {}
        self.channel: nodecmd.Channel | None = None

    def data(self) -> bytes:
        self.seq += 1
        return frame(self.key, self.node, self.seq)

    def on_command(self, ftype: int, body: bytes) -> None:
        m = protocol.parse_mac0(body)
        p = cbor2.loads(m.payload)
        op, args = p[1], p[2]
        try:
            nodecmd.unseal(self.key, body, protocol.COMMAND)
        except Exception:
            # the previous key: only a COMMIT of the version already committed
            assert self.prev is not None and op == 15 and args[2] == self.version
            nodecmd.unseal(self.prev, body, protocol.COMMAND)
        code, res = self.run(op, args)
        if self.lose.get(op, 0) > 0:
            self.lose[op] -= 1
            return
        payload = cbor2.dumps({1: op, 2: code, 3: res}, canonical=True)
        reply = nodecmd.seal(self.key, self.node.encode(), m.seq, payload, protocol.REPLY)
        assert self.channel is not None
        asyncio.get_running_loop().call_soon(self.channel.on_frame, protocol.REPLY, reply)

    def run(self, op: int, args: dict[int, Any]) -> tuple[int, Any]:
        if op == 14:
            if self.pending and self.pending[:2] == (args[1], args[2]):
                return 0, {1: self.pending[2], 2: args[2]}
            priv = X25519PrivateKey.generate()
            pub = priv.public_key().public_bytes_raw()
            shared = priv.exchange(X25519PublicKey.from_public_bytes(args[1]))
            new = derive(shared, self.key, self.node, args[2])
            self.pending = (args[1], args[2], pub, new)
            return 0, {1: pub, 2: args[2]}
        if op == 15:
            if args[2] == self.version and self.first_new is not None:
                return 0, {2: self.version, 3: self.first_new}
            if self.pending is None or self.pending[1] != args[2]:
                return nodecmd.E_ARG, {"error": "no pending key"}
            self.prev, self.key = self.key, self.pending[3]
            self.version, self.first_new, self.pending = args[2], self.seq + 1, None
            return 0, {2: self.version, 3: self.first_new}
        if op == 16:
            bad = sorted(set(args[2]) & self.refuse)
            if bad:
                return nodecmd.E_ARG, {"error": f"{bad[0]}: out of range"}
            if args[1] > self.config_version:
                self.config_version, self.settings = args[1], dict(args[2])
            return 0, {1: self.config_version}
        return nodecmd.E_OP, None


class CommandLink(Link):
    """A serial line as a link: ACKs recorded, COMMAND bodies handed to the nodes."""

    def __init__(self, keys: dict[bytes, bytes], state: Path, nodes: list[NodeModel]) -> None:
        super().__init__()
        self.nodes = {n.node: n for n in nodes}
        self.commander = nodecmd.Channel(self.name, None, keys,
                                         nodecmd.Counters(state / "cmd.json"),
                                         send_to=self._to)
        for n in nodes:
            n.channel = self.commander

    def _to(self, node: str | None, ftype: int, body: bytes) -> None:
        assert node is not None
        self.nodes[node].on_command(ftype, body)


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleetops, "COMMAND_TIMEOUT_S", 0.3)


def test_the_derivation_is_the_contracts() -> None:
    shared = bytes(range(100, 132))
    info = b"lantern rekey v1" + A.encode() + (7).to_bytes(4, "big")
    assert derive(shared, KA, A, 7) == hkdf(shared, KA, info, 32)
    # both sides agree on X25519
    g, n = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    assert derive(g.exchange(n.public_key()), KA, A, 1) == derive(
        n.exchange(g.public_key()), KA, A, 1)
    with pytest.raises(ValueError, match="all-zero"):
        derive(bytes(32), KA, A, 1)


async def test_a_rotation_with_a_lost_commit_answer_loses_and_repeats_nothing(
        tmp_path: Path) -> None:
    node = NodeModel(A, KA)
    async with gateway(tmp_path, {A: KA, B: KB}) as (ingest, fleet, metrics, _store):
        link = CommandLink(fleet.link_keys, tmp_path / "state", [node])
        ops = fleet.attach(ingest, [link], metrics)
        outbox = [node.data() for _ in range(3)]  # sealed before the switch, not sent yet
        await send(ingest, link, outbox[0])
        await asyncio.to_thread(fleet.registry.request_rekey, [A])
        node.lose[15] = 1  # the node commits; its answer is lost; asked again
        ops.heard({A: 1.0})
        await ops.idle()
        rot = fleet.registry.rotation(A)
        assert rot is not None and (rot.version, rot.first_new, rot.outcome) == (1, 4, "done")
        assert rot.key == node.key != KA and rot.prev == KA and rot.next is None
        assert fleet.link_keys[A.encode()] == node.key
        for f in (*outbox[1:], node.data(), node.data()):
            await send(ingest, link, f)
        ingest.on_data(link, outbox[2])  # again: its ACK was lost (acknowledged at once)
        assert metrics.frames_received[A] == 6 and metrics.duplicates[A] == 1
        assert metrics.rekeys == {"done": 1}
        # ACKs now go out under the new key, the node's frames 1-5 each once in the queue
        assert acked_under(link.sent[-1], node.key)
        assert await asyncio.to_thread(queued, tmp_path / "state" / "queue.sqlite", A) == [
            1, 2, 3, 4, 5]
        # an old-key frame at or above the first new sequence: refused
        await send(ingest, link, frame(KA, A, 6))
        assert metrics.frames_rejected["mac"] == 1
        r = fleet.registry.get(A)
        assert r is not None and (r.key_rotation, r.key_version, r.rekey) == (1, 2, "done")
        assert r.key_id == key_id(node.key) and key_id(KA) in r.retired
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / REGISTRY_FILE).st_mode)
    assert mode == 0o600
    # a restart keeps the rotated key though the key file still holds the first
    async with gateway(tmp_path, {A: KA, B: KB}) as (ingest, fleet, metrics, _):
        assert fleet.link_keys[A.encode()] == node.key
        await send(ingest, link, node.data())
        assert metrics.frames_received[A] == 1


async def test_frames_under_the_next_key_promote_it(tmp_path: Path) -> None:
    node = NodeModel(A, KA)
    async with gateway(tmp_path, {A: KA}) as (ingest, fleet, metrics, _):
        link = CommandLink(fleet.link_keys, tmp_path / "state", [node])
        ops = fleet.attach(ingest, [link], metrics)
        await send(ingest, link, node.data())
        await asyncio.to_thread(fleet.registry.request_rekey, [A])
        node.lose[15] = 99  # every COMMIT answer lost
        ops.heard({A: 1.0})
        await ops.idle()
        assert metrics.rekeys["failed"] == 1 and node.version == 1
        assert fleet.registry.rotation(A).outcome == "v1: no COMMIT answer"  # type: ignore[union-attr]
        await send(ingest, link, node.data())  # seq 2, under the new key
        assert metrics.frames_received[A] == 2 and metrics.rekeys["promoted"] == 1
        rot = fleet.registry.rotation(A)
        assert rot is not None and (rot.version, rot.first_new, rot.requested) == (1, 2, None)
        assert fleet.link_keys[A.encode()] == node.key


async def test_a_group_setting_reaches_every_node_and_drift_shows(tmp_path: Path) -> None:
    a, b = NodeModel(A, KA), NodeModel(B, KB, refuse={"kappa"})
    async with gateway(tmp_path, {A: KA, B: KB}) as (ingest, fleet, metrics, store):
        link = CommandLink(fleet.link_keys, tmp_path / "state", [a, b])
        ops = fleet.attach(ingest, [link], metrics)
        reg = fleet.registry
        await asyncio.to_thread(reg.assign, "street-1", [A, B])
        g = await asyncio.to_thread(reg.set_group, "street-1", {"interval_ms": 30000})
        for n in (a, b):
            await send(ingest, link, n.data())
        await fleet.tick({A: 1.0, B: 1.0}, {}, None, [])
        await ops.idle()
        assert a.settings == b.settings == {"interval_ms": 30000}
        assert [(r.config_version, r.config_drift) for r in reg.records()] == [
            (g.version, False), (g.version, False)]
        g2 = await asyncio.to_thread(reg.set_group, "street-1", {"interval_ms": 30000,
                                                                 "kappa": 0.5})
        assert g2.version == g.version + 1
        ops.retry_s = 0.0
        await fleet.tick({A: 2.0, B: 2.0}, {}, None, [])
        await ops.idle()
        await fleet.tick({A: 2.0, B: 2.0}, {}, None, [])
        ra, rb = reg.get(A), reg.get(B)
        assert ra is not None and rb is not None
        assert (ra.config_version, ra.config_drift) == (g2.version, False)
        assert (rb.config_version, rb.config_drift) == (g.version, True)
        assert rb.config_refused == f"v{g2.version}: bad argument: kappa: out of range"
        assert metrics.config_pushes == {"applied": 3, "refused": 1}
        view = GatewayView(metrics, store, [A, B], [FakeLink("serial")], [FakeForwarder()],
                           registry=reg)
        async with TestClient(TestServer(Api(view).app)) as client:
            text = await (await client.get("/metrics")).text()
        assert "lantern_fleet_config_drift 1.0" in text
        assert 'lantern_fleet_config_pushes_total{outcome="refused"} 1.0' in text
        assert 'lantern_fleet_key_rotations_total{outcome="done"} 0.0' in text
        assert rb.row(0)["config_want"] == g2.version


def test_settings_are_checked_before_anything_is_sent() -> None:
    s = parse_assignments(["interval_ms=60000", "offsets.temperature=-0.4", "kappa=0.8"])
    assert check_settings(s) == {"interval_ms": 60000, "offsets": {"temperature": -0.4},
                                 "kappa": 0.8}
    for bad, msg in ((["interval_ms=10"], "interval_ms: expected a whole number from 1000"),
                     (["window=2.5"], "window: expected a whole number"),
                     (["offsets.pm25=1"], "offsets.pm25: expected a number for one of"),
                     (["colour=3"], "colour: not a setting nodes take")):
        with pytest.raises(ConfigError, match=msg):
            check_settings(parse_assignments(bad))
    with pytest.raises(ConfigError, match="not a number"):
        parse_assignments(["kappa=high"])


def test_versions_stay_above_every_node_in_any_group(tmp_path: Path) -> None:
    with Registry(tmp_path / REGISTRY_FILE) as reg:
        reg.sync_keys({A.encode(): KA, B.encode(): KB})
        reg.config_reported(A, 9)
        assert reg.set_group("north", {"window": 2}).version == 10
        assert reg.set_group("south", {"window": 3}).version == 11
        reg.assign("south", [A])
        assert reg.get(A).config_drift  # type: ignore[union-attr]


def test_the_cli_writes_the_registry_and_refuses_bad_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "gw"
    state.mkdir(mode=0o700)
    keys = tmp_path / "keys.toml"
    write_secret(keys, f'[nodes]\n"{A}" = "{KA.hex()}"\n"{B}" = "{KB.hex()}"\n')
    toml = tmp_path / "gateway.toml"
    toml.write_text(gateway_toml(state, keys, ["/dev/ttyAMA0"], "http://127.0.0.1:9/"))
    with Registry(state / REGISTRY_FILE) as reg:
        reg.sync_keys({A.encode(): KA, B.encode(): KB})
    c = ["--config", str(toml)]
    assert cli.main(["gateway", "group", "assign", "north", A, B, *c]) == 0
    assert cli.main(["gateway", "group", "set", "north", "interval_ms=30000",
                     "offsets.temperature=-0.5", *c]) == 0
    assert cli.main(["gateway", "group", "set", "north", "offsets.humidity=2", *c]) == 0
    assert cli.main(["gateway", "group", "set", "north", "window=9", *c]) == 1
    assert "window: expected a whole number from 1 to 8, got 9" in capsys.readouterr().err
    assert cli.main(["gateway", "rekey", "--node", A, *c]) == 0
    assert cli.main(["gateway", "group", "list", *c]) == 0
    assert "north: v2" in capsys.readouterr().out
    with Registry(state / REGISTRY_FILE) as reg:
        g = reg.group("north")
        assert g is not None and (g.version, g.settings) == (2, {
            "interval_ms": 30000, "offsets": {"humidity": 2, "temperature": -0.5}})
        rot = reg.rotation(A)
        assert rot is not None and rot.outcome == "requested" and reg.rotation(B) is None
        assert [r.group for r in reg.records()] == ["north", "north"]


def test_a_rotation_switched_twice_keeps_its_new_key(tmp_path: Path) -> None:
    """The COMMIT answer (a worker thread) and a frame under the next key (the event loop) may
    both switch one rotation: the second must find it done, not clear the key (a rotated node
    then had no key and every frame after the next key-file reload was refused "retired")."""
    import threading

    kn = bytes(range(100, 132))
    with Registry(tmp_path / REGISTRY_FILE) as reg:
        reg.sync_keys({A.encode(): KA})
        reg.request_rekey([A])
        reg.rekey_next(A, 1, kn, key_id(KA))
        threads = [threading.Thread(target=reg.rekey_done, args=(A, 1, KA, first))
                   for first in (12, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rot = reg.rotation(A)
        assert rot is not None and rot.key == kn and rot.prev == KA and rot.version == 1
        assert rot.next is None and rot.first_new == 9  # the exact (lower) bound kept
        assert reg.overlay({A.encode(): KA}) == {A.encode(): kn}
        assert reg.refusal(A, kn) is None and reg.refusal(A, KA) == "retired"
