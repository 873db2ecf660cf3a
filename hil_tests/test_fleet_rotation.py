"""Issue 17's must-show on five nodes of one gateway (docs/fleet.md, "Tests").

Three MicroPython unix-port nodes on pty links (tools/street/sim.py) and two BLE nodes (the
firmware on CPython on bumble's virtual radio, tests/ble/harness.py) feed one gateway, which
forwards to the test SenML receiver (tools/street/upstream.py). On them:

- a live key rotation of all five (`lantern gateway rekey --all`) while they sample: each
  ends on its key version 1, in the registry and in its own STATUS, and upstream holds every
  reading the nodes sealed exactly once;
- a group setting (`lantern gateway group set`) reaching every node of the group, the registry
  (`lantern gateway nodes --csv`) and the status page's data (/api/nodes) showing each on the
  new config version; a node rebooted keeps its rotated key and its settings;
- one node revoked (`lantern gateway nodes revoke`): refused and counted on /metrics;
- one node wiped and provisioned again (new key, sequence above the gateway's high mark,
  `lantern gateway nodes import`): it delivers again, and frames recorded before its wipe,
  played back, are refused.

The gateway is `agent.gateway.run`, what `lantern gateway run` runs, in this process: the BLE
nodes' virtual radio and the bleak backend on it live here, where no other process can reach
them. Every fleet operation is asked as an operator asks it, by the `lantern` CLI in its own
process, through the registry file the running gateway reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lantern.agent import api as api_mod
from lantern.agent import nodecmd, protocol, registry
from lantern.agent.config import write_secret
from lantern.agent.errors import FrameError
from lantern.agent.fleetops import FleetOps
from lantern.agent.links import ble as ble_link
from lantern.agent.queue.layout import QUEUE_FILE
from lantern.tools.field import provision_steps as ps
from lantern.tools.street.sim import SimNode
from tests.ble import harness as ble

from .harness.ota import api_json, api_text, metric
from .harness.scenarios import _canon
from .harness.topology import Topology

pytestmark = [pytest.mark.fleet, pytest.mark.ble_virtual]

INTERVAL_MS = 400
GROUP = "street-7"
NEW_INTERVAL_MS = 1000  # the group's setting (a node takes 1000 ms and up)
REVOKED, WIPED, REBOOTED = "SL-0003", "SL-0002", "SL-0001"


@dataclass
class RadioNode(ble.BleNode):
    """A BLE node that knows its node.json, as node/app.py main() tells a booted node (OP_CONFIG
    writes the settings there: node/netcfg.py)."""

    async def start(self, link: Any) -> None:
        await super().start(link)
        self.node.config_path = str(self.state_dir / "node.json")


@dataclass
class FiveNodes(ble.World):
    """The BLE world's gateway with the pty nodes' serial links and keys beside its radios."""

    uart: list[SimNode] = field(default_factory=list)

    def gateway_toml(self) -> Path:
        path = super().gateway_toml()
        everyone: list[Any] = [*self.uart, *self.nodes]
        write_secret(self.workdir / "keys.toml", "[nodes]\n" + "".join(
            f'"{n.node_id}" = "{n.key.hex()}"\n' for n in everyone))
        return path


@dataclass
class Street:
    topo: Topology
    world: FiveNodes
    radios: list[RadioNode]
    api: str
    ops: FleetOps

    @property
    def config(self) -> Path:
        return self.world.workdir / "gateway.toml"

    @property
    def ids(self) -> list[str]:
        return [*(n.node_id for n in self.topo.nodes), *(r.node_id for r in self.radios)]

    def uart(self, node: str) -> SimNode:
        return next(n for n in self.topo.nodes if n.node_id == node)

    async def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        await self.topo.wait_for(cond, timeout, what)

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """/api/nodes, by node id (what the status page shows)."""
        return {n["id"]: n for n in (await api_json(self.api, "api/nodes"))["nodes"]}

    async def api_until(self, cond: Callable[[dict[str, dict[str, Any]]], bool],
                        timeout: float, what: str) -> dict[str, dict[str, Any]]:
        """/api/nodes once `cond` holds of it (the registry as the running gateway has it)."""
        deadline = time.monotonic() + timeout
        while True:
            self.topo.collect_output()
            nodes = await self.nodes()
            if cond(nodes):
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n"
                                     + json.dumps(nodes, indent=1)[-4000:])
            await asyncio.sleep(0.2)

    async def status(self, node: str) -> dict[str, Any]:
        """The node's own STATUS, asked over whichever link reaches it (asked again, as an
        operator would, when a BLE connect fails: the virtual radio drops some)."""
        for attempt in range(3):
            ch = nodecmd.route(self.ops.links, node)
            try:
                code, st = await ch.command(node, 1)  # OP_STATUS
                break
            except nodecmd.LinkDown:
                if attempt == 2:
                    raise
        assert code == 0 and isinstance(st, dict), (node, code, st)
        return st

    async def scrape(self) -> str:
        return await api_text(self.api, "metrics")

    async def scrape_until(self, cond: Callable[[str], bool], timeout: float,
                           what: str) -> str:
        """/metrics once `cond` holds of it (another task's counters: polled)."""
        deadline = time.monotonic() + timeout
        while not cond(text := await self.scrape()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.topo.collect_output()
            await asyncio.sleep(0.2)
        return text


async def lantern(*args: str) -> str:
    """One `lantern` command in its own process, as an operator runs it; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lantern", *args, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, (args, out.decode(), err.decode())
    return out.decode()


async def registry_csv(street: Street) -> dict[str, dict[str, str]]:
    """`lantern gateway nodes --csv`, by node id."""
    text = await lantern("gateway", "nodes", "--csv", "--config", str(street.config))
    return {row["id"]: row for row in csv.DictReader(io.StringIO(text))}


@contextlib.asynccontextmanager
async def five_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     uart: int = 3) -> AsyncIterator[Street]:
    """`uart` pty nodes, 2 radio nodes, one gateway with its API; every node's first packs
    ACKed."""
    (tmp_path / "uart").mkdir()
    (tmp_path / "ble").mkdir()
    topo = Topology(tmp_path / "uart", n_nodes=uart, interval_ms=INTERVAL_MS)
    world = FiveNodes(tmp_path / "ble", upstream=topo.upstream, api=True)
    urls: list[str] = []
    ops: list[FleetOps] = []
    enter, init, attach = (api_mod.ApiServer.__aenter__, ble_link.BleLink.__init__,
                           registry.Fleet.attach)

    async def served(self: api_mod.ApiServer) -> api_mod.ApiServer:
        out = await enter(self)
        if self.url:
            urls.append(self.url)
        return out

    def built(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        world.links.append(self)

    def attached(self: registry.Fleet, *args: Any) -> FleetOps:
        got = attach(self, *args)
        assert isinstance(got, FleetOps)
        ops.append(got)
        return got

    monkeypatch.setattr(api_mod.ApiServer, "__aenter__", served)
    monkeypatch.setattr(ble_link.BleLink, "__init__", built)
    monkeypatch.setattr(registry.Fleet, "attach", attached)
    radios = [RadioNode(f"SL-01{i:02d}", f"F0:00:00:00:01:{i:02X}", world.workdir / "nodes",
                        {"adv_interval_ms": 50, "rotate_ms": 100}, interval_ms=INTERVAL_MS)
              for i in (1, 2)]
    world.nodes.extend(radios)
    try:
        await topo.start(gateway=False)
        world.uart = topo.nodes
        for r in radios:
            await r.start(world.link)
        # the pty nodes' links; the clock trusted, as Topology's gateway has it (docs/time.md)
        world.gw_extra = '\n[clock]\nmode = "trust"\n' + "".join(
            f'\n[[links.serial]]\nport = "{r.gateway_port}"\nbaud = 115200\n'
            for r in topo.relays)
        await world.start_gateway()
        await ble.until(lambda: bool(urls) and all(world.ble.serves(r.node_id)
                                                   for r in radios), 30,
                        "the API and both radio nodes' addresses proven")
        street = Street(topo, world, radios, urls[-1], ops[-1])
        await street.until(lambda: all(topo.wires[n.node_id].acked for n in topo.nodes)
                           and all(upstream_seqs(topo, r.node_id) for r in radios), 60,
                           "every node's first packs ACKed")
        yield street
    finally:
        await world.close()
        await topo.stop()
        ble.restore_boot()


def upstream_seqs(topo: Topology, node: str) -> set[int]:
    return ble.senml_seqs(topo.upstream).get(node, set())


def wire_keys(topo: Topology, node: SimNode, keys: list[bytes]) -> dict[int, tuple[int, bytes]]:
    """seq → (index in `keys` of the key it verifies under, body) of every DATA frame the node
    put on the wire; a frame no key verifies fails the test."""
    out: dict[int, tuple[int, bytes]] = {}
    for body in topo.wires[node.node_id].data_frames:
        m = protocol.parse_mac0(body)
        for i, k in enumerate(keys):
            with contextlib.suppress(FrameError):
                protocol.verify_mac0(k, m)
                assert out.setdefault(m.seq, (i, body))[1] == body, (node.node_id, m.seq)
                break
        else:
            raise AssertionError(f"{node.node_id}: seq {m.seq} verifies under none of its keys")
    return out


def sealed(street: Street, node: str, keys: dict[str, list[bytes]],
           since: int = 0) -> dict[str, str]:
    """reading id → the record upstream must hold, for every pack `node` made durable from
    sequence `since` on: from the wire (verified under any of its keys; the record exactly),
    else from what the node said it sealed (any record under that id)."""
    topo = street.topo
    want: dict[str, str] = {}
    radio = next((r for r in street.radios if r.node_id == node), None)
    packs = radio.sampled if radio is not None else topo.sampled(street.uart(node))
    if radio is None:
        for seq, (_, body) in wire_keys(topo, street.uart(node), keys[node]).items():
            if seq < since:
                continue
            records = protocol.resolve_pack(protocol.parse_mac0(body).payload, node=node)
            for i, r in enumerate(records):
                want[f"{node}:{seq}:{i}"] = _canon({**r, "id": f"{node}:{seq}:{i}"})
    for seq, n in packs.items():
        for i in range(n if seq >= since else 0):
            want.setdefault(f"{node}:{seq}:{i}", "")
    return want


async def exactly_once(street: Street, nodes: list[str], keys: dict[str, list[bytes]],
                       since: dict[str, int] | None = None) -> int:
    """Every reading the nodes sealed (from `since[node]` on) reaches upstream once, as
    sealed; nothing else of theirs does. The number of readings."""
    since = since or {}
    topo = street.topo
    want: dict[str, str] = {}

    def arrived() -> bool:
        want.clear()
        for n in nodes:
            want.update(sealed(street, n, keys, since.get(n, 0)))
        return want.keys() <= topo.upstream.readings.keys()

    await street.until(arrived, 60, "every sealed reading upstream")
    up = topo.upstream.readings
    ours = {rid for rid in up if rid.split(":", 1)[0] in nodes
            and int(rid.split(":")[1]) >= since.get(rid.split(":", 1)[0], 0)}
    assert ours == want.keys(), sorted(ours ^ want.keys())[:20]
    wrong = [rid for rid, w in want.items() if w and _canon(up[rid]) != w]
    assert wrong == [], wrong[:10]
    assert topo.upstream.duplicates == 0 and topo.upstream.conflicting == 0
    return len(want)


def current_key(street: Street, node: str) -> bytes:
    radio = next((r for r in street.radios if r.node_id == node), None)
    if radio is not None:
        return bytes(radio.node.key)
    return bytes.fromhex((street.uart(node).dir / "node.key").read_text().strip())


async def test_five_nodes_rotated_configured_revoked_and_one_reprovisioned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    async with five_nodes(tmp_path, monkeypatch) as street:
        topo, cfg = street.topo, str(street.config)
        ids = street.ids
        provisioned = {n: current_key(street, n) for n in ids}

        # a) every node's key rotated live, while they sample
        at_request = {n.node_id: max(topo.sampled(n)) for n in topo.nodes}
        out = await lantern("gateway", "rekey", "--all", "--config", cfg)
        assert "rotation asked for 5 node(s)" in out, out
        nodes = await street.api_until(lambda ns: all(
            ns[n]["key_rotation"] == 1 and ns[n]["rekey"] == "done" for n in ids), 90,
            "every node on its key version 1")
        assert all(nodes[n]["key_version"] == 2 for n in ids), nodes  # provisioned + rotated
        rotated = {n: current_key(street, n) for n in ids}
        assert all(rotated[n] != provisioned[n] for n in ids)
        for n in ids:
            assert (await street.status(n))["key_version"] == 1, n
        # sealed under the new key after the switch, and the packs kept coming through it
        await street.until(lambda: all(any(
            i == 1 for i, _ in wire_keys(topo, nd, [provisioned[nd.node_id],
                                                    rotated[nd.node_id]]).values())
            for nd in topo.nodes), 30, "frames under the rotated keys")
        for nd in topo.nodes:
            under = wire_keys(topo, nd, [provisioned[nd.node_id], rotated[nd.node_id]])
            old = [s for s, (i, _) in under.items() if i == 0]
            assert max(old) >= at_request[nd.node_id], nd.node_id  # sampling went on
            assert max(old) < min(s for s, (i, _) in under.items() if i == 1), nd.node_id
        scrape = await street.scrape()
        assert metric(scrape, "lantern_fleet_key_rotations_total", outcome="done") \
            + metric(scrape, "lantern_fleet_key_rotations_total", outcome="promoted") >= 5

        # d) a group setting, changed once at the gateway, reaches every node of the group
        await lantern("gateway", "group", "assign", GROUP, *ids, "--config", cfg)
        out = await lantern("gateway", "group", "set", GROUP, f"interval_ms={NEW_INTERVAL_MS}",
                            "--config", cfg)
        found = re.search(r"config version (\d+)", out)
        assert found, out
        version = int(found.group(1))
        nodes = await street.api_until(lambda ns: all(
            ns[n]["config_version"] == version for n in ids), 60,
            f"every node on config version {version}")
        assert all(not nodes[n]["config_drift"] and nodes[n]["config_want"] == version
                   and nodes[n]["config_refused"] is None for n in ids), nodes
        rows = await registry_csv(street)
        assert {n: (rows[n]["config_version"], rows[n]["key_rotation"], rows[n]["key_version"])
                for n in ids} == {n: (str(version), "1", "2") for n in ids}, rows
        for n in ids:
            st = await street.status(n)
            assert (st["config_version"], st["cfg"]["interval_ms"]) == (
                version, NEW_INTERVAL_MS), (n, st["config_version"], st["cfg"])
        # the gauge follows the registry at the fleet task's next tick
        scrape = await street.scrape_until(
            lambda s: metric(s, "lantern_fleet_config_drift") == 0, 10, "no drift on /metrics")
        applied = metric(scrape, "lantern_fleet_config_pushes_total", outcome="applied")
        assert applied >= 5

        # a node rebooted keeps what the gateway gave it: its rotated key and its settings
        node = street.uart(REBOOTED)
        topo.collect_output()
        node.kill()
        node.boot(stdout=subprocess.PIPE)
        acked = len(topo.wires[REBOOTED].acked)
        await street.until(lambda: len(topo.wires[REBOOTED].acked) > acked, 30,
                           "the rebooted node's packs ACKed")
        st = await street.status(REBOOTED)
        assert (st["key_version"], st["config_version"], st["cfg"]["interval_ms"]) == (
            1, version, NEW_INTERVAL_MS), st
        assert json.loads((node.dir / "node.json").read_text())["config_version"] == version
        assert metric(await street.scrape(), "lantern_fleet_config_pushes_total",
                      outcome="applied") == applied  # nothing to push again

        # no reading lost or duplicated across the rotation, the new settings and the reboot
        keys = {n: [provisioned[n], rotated[n]] for n in ids}
        total = await exactly_once(street, ids, keys)
        assert total > 0

        # b) one node revoked while it sends: refused and counted
        keep = [n for n in ids if n != REVOKED]
        await lantern("gateway", "nodes", "revoke", REVOKED, "--reason", "board stolen",
                      "--config", cfg)
        await street.api_until(lambda ns: ns[REVOKED]["state"] == "revoked", 30,
                               "the node revoked on the status page")
        # the node resends on its own timer: three refusals
        await street.scrape_until(lambda s: metric(s, "lantern_frames_rejected_total",
                                                   reason="revoked") >= 3, 60,
                                  "the revoked node's frames refused, counted")
        gone = {rid for rid in topo.upstream.readings if rid.startswith(REVOKED + ":")}
        before = {n: len(upstream_seqs(topo, n)) for n in keep}
        await street.until(lambda: all(len(upstream_seqs(topo, n)) > before[n] for n in keep),
                           30, "the other nodes still delivering")
        assert {rid for rid in topo.upstream.readings if rid.startswith(REVOKED + ":")} == gone

        # c) one node wiped and provisioned again; what it sent before, played back, refused
        node = street.uart(WIPED)
        on_air = sorted(wire_keys(topo, node, keys[WIPED]).items())
        # its first frame (the provisioned key's) and its last (the rotated key's)
        recorded = [next(body for _, (i, body) in on_air if i == 0),
                    next(body for _, (i, body) in reversed(on_air) if i == 1)]
        topo.collect_output()
        node.close()
        shutil.rmtree(node.dir)  # a flash erase
        queue = street.world.workdir / "gw-state" / QUEUE_FILE
        start = ps.seq_start(time.time(), ps.gateway_mark(queue, WIPED))
        assert "high mark" in start.why, start
        node.key = os.urandom(32)
        node.write_config()
        (node.state_dir).mkdir()
        (node.state_dir / "seq").write_text(str(start.value))
        frag = tmp_path / "replacement.keys.toml"
        write_secret(frag, f'[nodes]\n"{WIPED}" = "{node.key.hex()}"\n')
        await lantern("gateway", "nodes", "import", str(frag), "--node", WIPED,
                      "--config", cfg)
        node.start(stdout=subprocess.PIPE)
        await street.until(lambda: any(s >= start.value for s in upstream_seqs(topo, WIPED)),
                           60, "the re-provisioned node's readings upstream")
        rows = await registry_csv(street)
        assert rows[WIPED]["key_version"] == "3", rows[WIPED]  # provisioned, rotated, new

        scrape = await street.scrape()
        rejected = {r: metric(scrape, "lantern_frames_rejected_total", reason=r)
                    for r in ("mac", "retired", "revoked", "replay")}
        dups = metric(scrape, "lantern_frames_duplicate_total", node=WIPED)
        relay = topo.relays[[n.node_id for n in topo.nodes].index(WIPED)]
        for body in recorded:
            relay.inject("up", protocol.encode_frame(protocol.DATA, body))

        scrape = await street.scrape_until(lambda s: sum(
            metric(s, "lantern_frames_rejected_total", reason=r) - rejected[r]
            for r in ("mac", "retired", "replay")) >= len(recorded), 30,
            "the recorded frames refused")
        # each fails the new key's MAC; the one under the provisioned key is not let through
        # by the rotation's overlap window either (it ended with the new provisioning)
        assert {r: metric(scrape, "lantern_frames_rejected_total", reason=r) - rejected[r]
                for r in ("mac", "retired", "replay")} == {"mac": 2, "retired": 0, "replay": 0}
        assert metric(scrape, "lantern_frames_duplicate_total", node=WIPED) == dups
        # the others go on, and the new board delivers under its new key, nothing twice (what
        # the wiped board still held went with its flash)
        keys[WIPED] = [*keys[WIPED], node.key]
        assert await exactly_once(street, keep, keys, {WIPED: start.value}) > 0
    # the gateway's own faults are logged as errors ("please report this"): none
    assert [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.startswith("lantern")] == []


async def test_a_rotated_radio_nodes_adverts_follow_its_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a live rotation, a gateway restarted (its bindkeys derived from the rotated keys)
    and a node rebooted (its bindkey from its rotated key) still take each other's encrypted
    BTHome adverts: none refused as `bthome_mic`."""
    async with five_nodes(tmp_path, monkeypatch, uart=0) as street:
        topo, world = street.topo, street.world
        await lantern("gateway", "rekey", "--all", "--config", str(street.config))
        await street.api_until(lambda ns: all(
            ns[r.node_id]["key_rotation"] == 1 for r in street.radios), 60,
            "both radio nodes on their key version 1")

        def delivering() -> Callable[[], bool]:
            seqs = {r.node_id: max(upstream_seqs(topo, r.node_id)) for r in street.radios}
            return lambda: all(max(upstream_seqs(topo, n)) > s + 2 for n, s in seqs.items())

        await world.stop_gateway()
        more = delivering()
        await world.start_gateway()
        await street.until(more, 60, "both radio nodes' packs after the gateway's restart")
        radio = street.radios[1]
        await radio.stop()
        more = delivering()
        await radio.start(world.link)
        await street.until(more, 60, "both radio nodes' packs after one rebooted")
        await ble.until(lambda: world.ble.stats["adverts_accepted"] > 0, 30,
                        "an advert taken after the restart")
        assert world.ble.stats["rejected_bthome_mic"] == 0, dict(world.ble.stats)
