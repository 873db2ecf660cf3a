"""Signed updates end to end (issue 16, "Must show"), on MicroPython unix-port nodes.

- A staged rollout started with `lantern gateway rollout start` and followed on the local API:
  to 3 pty nodes through the gateway as its own process, and to 5 nodes (3 over UART, 2 over
  BLE on bumble's virtual radio, a BLE node as the canary) in one gateway: every node ends on
  the new version, and no reading is lost or duplicated upstream across transfers and reboots.
- Deliberately broken releases, validly signed (one raises at boot, one never gets a pack
  ACKed): the canary rolls back by itself, the rollout halts, the other nodes never see an
  OFFER of it.
- Forged bundles: the gateway refuses and counts a flipped byte and another key before any
  node sees them; a gateway that skips its own check (a stolen one) still cannot get a node
  to run a flipped, foreign-key, other-board or replayed below-the-floor bundle, and the node
  counts each refusal.

Bundles are real: the firmware tree compiled by mpy-cross and signed with Ed25519
(hil_tests/harness/ota.py). Nodes that reboot into a candidate are started again, as a board
resets itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from lantern.agent import nodecmd
from lantern.agent.config import write_secret
from lantern.agent.ota.transfer import TransferStats, push, split
from tests.helpers.gateway_node import node_line

from .harness.ota import (
    HEAP_KB,
    CommandTap,
    Releases,
    RoomyNode,
    Supervisor,
    api_json,
    api_text,
    boot_record,
    check_no_loss_no_dup,
    flip,
    floor,
    free_port,
    gateway_extra,
    gateway_up,
    metric,
    other_key_bundle,
    rollout_cli,
    rollout_finished,
)
from .harness.topology import Topology

pytestmark = pytest.mark.ota

BOARD = "unix-sim-lite"  # node_line's node: the simple climate model
STREET_BOARD = "unix-sim"  # the Topology's nodes: real drivers on the simulated street
TRIAL_S = 8  # update_trial_s: how long a candidate has to get a pack ACKed
# over BLE the gateway first reconnects to the rebooted node (scan, connect, discover): on
# two loaded cores that alone took more than 8 s once
BLE_TRIAL_S = 60


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return Releases(tmp_path_factory.mktemp("release"), [STREET_BOARD, BOARD])


@asynccontextmanager
async def street(tmp_path: Path, rel: Releases, n: int) -> AsyncIterator[
        tuple[Topology, str, CommandTap]]:
    """n nodes provisioned with the release key, the gateway process with [updates] and its
    API; yields the topology, the API's URL and the tap on every node's downstream."""
    port = free_port()
    topo = Topology(tmp_path, n_nodes=n, interval_ms=400, release_pub=rel.pub,
                    node_class=RoomyNode,
                    node_extra={"update_trial_s": TRIAL_S},
                    gateway_extra=gateway_extra(rel.pub_pem, port, canary=1, step=2,
                                                node_timeout_s=90))
    sup = Supervisor(topo)
    try:
        await topo.start()
        tap = CommandTap({nd.node_id: nd.key for nd in topo.nodes})
        tap.attach(topo)
        sup.start()
        api = f"http://127.0.0.1:{port}/"
        await gateway_up(topo, api)
        await topo.wait_for(lambda: all(len(topo.sampled(nd)) >= 2 and topo.wires[
            nd.node_id].acked for nd in topo.nodes), 60, "every node's first packs ACKed")
        yield topo, api, tap
    finally:
        await sup.stop()
        await topo.stop()


async def _drained(topo: Topology) -> int:
    """Every pack sealed so far reaches upstream exactly once (the check across reboots)."""
    topo.collect_output()
    sealed = {nd.node_id: dict(topo.sampled(nd)) for nd in topo.nodes}
    want = {f"{n}:{s}:{i}" for n, packs in sealed.items() for s, k in packs.items()
            for i in range(k)}
    await topo.wait_for(lambda: want <= set(topo.upstream.readings), 60,
                        "every sealed reading upstream")
    return check_no_loss_no_dup(topo, sealed)


async def test_rollout_through_the_gateway_process_every_node_updated_nothing_lost(
        tmp_path: Path, rel: Releases) -> None:
    """The gateway as its own process (`lantern gateway run`), 3 pty nodes: canary, then a
    step of 2. Five nodes over UART and BLE: test_rollout_over_uart_and_ble_from_one_gateway."""
    v2 = rel.save("2.0.0.lub", rel.build("2.0.0", floor=1))
    async with street(tmp_path, rel, 3) as (topo, api, tap):
        ids = [nd.node_id for nd in topo.nodes]
        # forged bundles: refused by the gateway before any node hears of them, and counted
        head = len(split(v2.read_bytes()).head)
        forged = {"bad_signature": flip(v2.read_bytes(), head - 3),
                  "other_key": other_key_bundle(rel, "2.0.0")}
        for reason, bundle in forged.items():
            code, out, err = await rollout_cli(api, "start", str(rel.save(reason, bundle)))
            assert code == 1 and f"bundle refused: {reason}" in err + out, (code, out, err)
        st = await api_json(api, "api/rollout")
        assert st["bundles_refused"] == {"bad_signature": 1, "other_key": 1}
        scrape = await api_text(api, "metrics")
        assert metric(scrape, "lantern_update_bundles_refused_total", reason="other_key") == 1
        assert sum(tap.offers(n) for n in ids) == 0

        # the real one: canary, then two at a time
        code, out, err = await rollout_cli(api, "start", str(v2))
        assert code == 0, (out, err)
        st = await rollout_finished(topo, api, 150)
        ro = st["rollout"]
        assert ro["state"] == "done", json.dumps(ro, indent=1)
        assert ro["canary"] == ["SL-0001"]
        assert {p["node"]: (p["state"], p["version"]) for p in ro["nodes"]} == {
            n: ("updated", "2.0.0") for n in ids}
        for nd in topo.nodes:
            rec = boot_record(nd)
            assert (rec.get("ver"), rec.get("state"), rec.get("cand")) == (
                "2.0.0", "confirmed", None), (nd.node_id, rec)
            assert floor(nd) == 1  # raised only once the release proved itself
            assert "update: release 2.0.0 confirmed" in topo.output(nd)
        code, out, _ = await rollout_cli(api, "status")
        assert code == 0 and json.loads(out)["rollout"]["state"] == "done"

        # a replayed older release, validly signed, below the floor the nodes now hold: the
        # canary refuses it, the rollout halts, no other node is offered it
        offers = {n: tap.offers(n) for n in ids}
        old = rel.save("1.9.0.lub", rel.build("1.9.0", floor=0))
        code, out, err = await rollout_cli(api, "start", str(old), "--canary", "SL-0003")
        assert code == 0, (out, err)
        ro = (await rollout_finished(topo, api, 60))["rollout"]
        assert ro["state"] == "halted" and "SL-0003" in ro["reason"], ro
        assert {p["node"]: p["state"] for p in ro["nodes"]}["SL-0003"] == "refused"
        assert next(p for p in ro["nodes"] if p["node"] == "SL-0003")["reason"] == \
            "below_floor"
        assert all(tap.offers(n) == offers[n] for n in ids if n != "SL-0003")
        assert boot_record(topo.nodes[2]).get("ver") == "2.0.0"

        total = await _drained(topo)
        assert total > 0


async def test_broken_releases_roll_back_on_the_canary_and_halt_the_rollout(
        tmp_path: Path, rel: Releases) -> None:
    broken = {"2.0.1": (rel.raises_at_boot(), "boot_exception"),
              "2.0.2": (rel.deaf_to_acks(), "no_ack")}
    async with street(tmp_path, rel, 3) as (topo, api, tap):
        canary, others = topo.nodes[0], topo.nodes[1:]
        for version, (files, why) in broken.items():
            path = rel.save(f"{version}.lub", rel.build(version, floor=1, files=files))
            code, out, err = await rollout_cli(api, "start", str(path), "--step", "2")
            assert code == 0, (out, err)
            ro = (await rollout_finished(topo, api, 90))["rollout"]
            assert ro["state"] == "halted", json.dumps(ro, indent=1)
            first = ro["nodes"][0]
            assert first["node"] == canary.node_id and first["state"] == "rolled_back", first
            assert why in (first["detail"] or first["reason"] or ""), first
            assert ro["reason"].startswith(f"canary {canary.node_id} rolled back"), ro
            assert all(p["state"] == "pending" for p in ro["nodes"][1:]), ro
            # the node itself left the candidate and says why; its floor never moved
            rec = boot_record(canary)
            assert rec.get("state") == "rolled_back" and why in (rec.get("reason") or ""), rec
            assert rec.get("cand") is None and rec.get("ver") is None
            assert floor(canary) == 0
            assert f"update: release {version} rolled back: {why}" in topo.output(canary)
            # the others were never offered it
            assert tap.offers(canary.node_id) >= 1
            assert all(tap.offers(nd.node_id) == 0 for nd in others), tap.ops
        # the canary runs the provisioned firmware again and delivers: nothing lost or twice
        total = await _drained(topo)
        assert total > 0


async def _status(ch: nodecmd.Channel, node: str) -> dict[str, Any]:
    code, st = await ch.command(node, 1)  # OP_STATUS
    assert code == 0 and isinstance(st, dict), (code, st)
    return st


async def test_a_stolen_gateway_cannot_get_a_node_to_run_a_forged_bundle(
        tmp_path: Path, rel: Releases) -> None:
    """The gateway's own check skipped: push() straight to the node, which refuses each."""
    good = rel.build("2.0.0", floor=1)
    env_end = len(split(good).head)
    forged = [
        ("bad_signature", flip(good, env_end - 3)),  # one byte of the signature
        ("file", flip(good, env_end + 100)),  # one byte of the first file
        ("other_key", other_key_bundle(rel, "2.0.0")),
        ("other_board", rel.build("2.0.0", floor=1, boards=["unix-sim-pms"])),
    ]
    async with node_line(tmp_path, board=BOARD, release_pub=rel.pub, heap=f"{HEAP_KB}K",
                         extra={"update_trial_s": TRIAL_S}) as line:
        ch = line.link.commander
        assert isinstance(ch, nodecmd.Channel)
        node = line.node.node_id
        await line.until(lambda: line.metrics.frames_received[node] >= 1, 30, "a first pack")
        stats = TransferStats()
        for reason, bundle in forged:
            out = await push(ch, node, bundle, stats=stats, confirm_s=30, give_up_s=30)
            assert (out.status, out.reason) == ("refused", reason), (out, line.output()[-2000:])
            # nothing staged can be made the candidate
            code, res = await ch.command(node, 11)  # OP_UPDATE_APPLY
            assert code == 5 and res[1] in ("incomplete", "no_offer"), (code, res)
        st = await _status(ch, node)
        upd = st["upd"]
        assert upd["state"] in ("idle", "staging") and upd.get("version") in (None, "2.0.0")
        counted = upd["refused"]
        for reason in ("bad_signature", "other_key", "other_board"):
            assert counted.get(reason, 0) >= 1, counted
        assert counted.get("file", 0) >= 2  # the gateway retried the file once, as documented
        assert line.boots == 1, "the node rebooted: it was made to run something"
        assert boot_record(line.node).get("cand") is None

        # the real release (floor 1), then that release's predecessor replayed (floor 0)
        out = await push(ch, node, good, stats=stats, confirm_s=120)
        assert (out.status, out.version) == ("updated", "2.0.0"), (out, line.output()[-3000:])
        assert line.boots == 2 and floor(line.node) == 1
        out = await push(ch, node, rel.build("1.9.0", floor=0), stats=stats, confirm_s=30)
        assert (out.status, out.reason) == ("refused", "below_floor"), out
        st = await _status(ch, node)
        assert st["fw"] == "2.0.0" and st["upd"]["refused"].get("below_floor") == 1, st
        assert line.boots == 2
        assert stats.refusals["below_floor"] == 1 and stats.refusals["other_key"] == 1


async def test_a_node_at_its_boards_heap_takes_an_offer(tmp_path: Path, rel: Releases) -> None:
    """FAILS today (node side): at the board's own heap the OFFER's check raises MemoryError."""
    async with node_line(tmp_path, board=BOARD, release_pub=rel.pub) as line:
        ch = line.link.commander
        assert isinstance(ch, nodecmd.Channel)
        node = line.node.node_id
        await line.until(lambda: line.metrics.frames_received[node] >= 1, 30, "a first pack")
        head = split(rel.build("2.0.0", floor=1)).head
        code, res = await ch.command(node, 9, {1: head[:512], 2: 0})
        at = 512
        while code == 0 and 4 in res and at < len(head):
            code, res = await ch.command(node, 9, {1: head[at:at + 512], 2: at})
            at += 512
        assert code == 0 and res.get(3) == 768, (code, res, line.output()[-1500:])


@pytest.mark.ble_virtual
async def test_rollout_over_uart_and_ble_from_one_gateway(
        tmp_path: Path, rel: Releases, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 MicroPython nodes on ptys and 2 BLE nodes (the firmware on CPython, bumble's virtual
    radio: tests/ble/harness.py OtaNode) in one gateway; a BLE node is the canary."""
    from lantern.agent import api as api_mod
    from lantern.agent.links import ble as ble_link
    from tests.ble import harness as ble

    topo = Topology(tmp_path / "uart", n_nodes=3, interval_ms=400, release_pub=rel.pub,
                    node_class=RoomyNode, node_extra={"update_trial_s": TRIAL_S})
    (tmp_path / "uart").mkdir()
    (tmp_path / "ble").mkdir()
    urls: list[str] = []
    enter = api_mod.ApiServer.__aenter__

    async def served(self: api_mod.ApiServer) -> api_mod.ApiServer:
        out = await enter(self)
        if self.url:
            urls.append(self.url)
        return out

    monkeypatch.setattr(api_mod.ApiServer, "__aenter__", served)
    world = ble.World(tmp_path / "ble", upstream=topo.upstream, api=True)
    init = ble_link.BleLink.__init__

    def capture(self: Any, *args: Any, **kwargs: Any) -> None:  # as tests/ble/conftest.py
        init(self, *args, **kwargs)
        world.links.append(self)

    monkeypatch.setattr(ble_link.BleLink, "__init__", capture)
    radios = [ble.OtaNode(f"SL-01{i:02d}", f"F0:00:00:00:01:{i:02X}", world.workdir / "nodes",
                          {"adv_interval_ms": 50, "rotate_ms": 100}, interval_ms=400,
                          release_pub=rel.pub, extra={"update_trial_s": BLE_TRIAL_S})
              for i in (1, 2)]
    world.nodes.extend(radios)
    sup = Supervisor(topo)
    tasks: list[Any] = []
    try:
        await topo.start(gateway=False)
        for r in radios:
            await r.start(world.link)
        tasks = [asyncio.create_task(r.supervise(world.link)) for r in radios]
        sup.start()
        tap = CommandTap({nd.node_id: nd.key for nd in topo.nodes})
        tap.attach(topo)
        serial = "".join(f'\n[[links.serial]]\nport = "{r.gateway_port}"\nbaud = 115200\n'
                         for r in topo.relays)
        world.gw_extra = serial + (f'\n[updates]\nrelease_key = "{rel.pub_pem}"\ncanary = 1\n'
                                   "step = 2\nnode_timeout_s = 90\n")
        keys = world.workdir / "keys.toml"
        path = world.gateway_toml()
        # the pty nodes' keys beside the radio nodes' (World writes only its own)
        everyone: list[Any] = [*topo.nodes, *radios]
        write_secret(keys, "[nodes]\n" + "".join(f'"{n.node_id}" = "{n.key.hex()}"\n'
                                                 for n in everyone))
        assert path.exists()
        monkeypatch.setattr(ble.World, "gateway_toml", lambda self: path)
        await world.start_gateway()
        await ble.until(lambda: bool(urls) and all(world.ble.serves(r.node_id) for r in radios),
                        30, "the API and both radio nodes' addresses proven")
        api = urls[-1]
        await topo.wait_for(lambda: all(len(topo.sampled(nd)) >= 2 and topo.wires[
            nd.node_id].acked for nd in topo.nodes), 60, "the pty nodes' first packs ACKed")
        v2 = rel.save("2.0.0-mixed.lub", rel.build("2.0.0", floor=1))
        code, out, err = await rollout_cli(api, "start", str(v2), "--canary", "SL-0101")
        assert code == 0, (out, err)
        st = await rollout_finished(topo, api, 170)
        ro = st["rollout"]
        assert ro["state"] == "done", json.dumps(ro, indent=1)
        assert ro["nodes"][0]["node"] == "SL-0101"
        assert {p["node"]: (p["state"], p["version"]) for p in ro["nodes"]} == {
            n: ("updated", "2.0.0") for n in [*(nd.node_id for nd in topo.nodes),
                                              *(r.node_id for r in radios)]}
        for r in radios:
            # one boot into the candidate; one run saw a radio node boot into it twice (a
            # reset after the APPLY's reboot, cause not traced: reported, not asserted)
            assert r.versions[0] != "2.0.0" and set(r.versions[1:]) == {"2.0.0"}, (
                r.node_id, r.versions)
        for nd in topo.nodes:
            assert boot_record(nd).get("ver") == "2.0.0" and floor(nd) == 1
        # nothing lost or twice, on either kind of link
        await _drained(topo)
        await ble.until(lambda: all(
            r.node is not None and len(r.outbox) == 0 and set(r.sampled)
            <= ble.senml_seqs(topo.upstream).get(r.node_id, set()) for r in radios),
            60, "every radio node's packs upstream")
        assert topo.upstream.duplicates == 0
    finally:
        for t in tasks:
            t.cancel()
        await sup.stop()
        await world.close()
        await topo.stop()
        ble.restore_boot()
