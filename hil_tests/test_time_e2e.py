"""Time you can trust, end to end (docs/time.md): a node whose clock starts at the epoch, the
gateway as a process, the readings as the upstream platform receives them; and a gateway
whose own clock is not synchronised (the kernel's adjtimex state, switched by the test).

The node is the firmware (.mpy) on the unix port with node.json `clock_at_epoch` (its clock
counts from 1970 at every boot, as an ESP32's RTC from 2000 after a power cut). It samples for
a while before the gateway is up, so it holds its samples and waits with a time request in
its outbox; then the gateway starts, its ACK sets the node's clock, and every reading must
reach the platform within seconds of the host's time (boot + the pack's own uptime), or
carry a `time.q` flag.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from lantern.agent.api import Api, GatewayView
from lantern.agent.timesync import TimeSync
from tests.helpers.api import FakeForwarder
from tests.helpers.gateway_node import node_line
from tests.helpers.timecheck import KernelClock, use_clock

from .harness.delivery import check_delivery
from .harness.topology import Topology

SLACK_S = 4  # between the host's stamp and the node's uptime 0: the VM's start
Y2001 = 978_307_200


def packs(topo: Topology, node: str) -> dict[int, list[dict[str, Any]]]:
    """seq → the pack's records as the platform received them."""
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for rid, r in topo.upstream.readings.items():
        nid, seq, _ = rid.rsplit(":", 2)
        if nid == node:
            out[int(seq)].append(r)
    return out


def samples(out: str) -> int:
    """Samples sealed (time requests are sealed packs too, but hold no sample)."""
    return len([ln for ln in out.splitlines()
                if ln.startswith("sample seq=") and "(time request" not in ln])


def value(records: list[dict[str, Any]], name: str) -> Any:
    for r in records:
        if r["n"].endswith(":" + name):
            return r.get("v")
    return None


async def test_a_node_at_the_epoch_gets_every_time_right_or_flagged(topology: Topology) -> None:
    topo = topology
    topo.n_nodes = 1
    topo.interval_ms = 300
    topo.sample_limit = 14
    topo.node_extra = {"clock_at_epoch": True}
    t0 = time.time()
    await topo.start(gateway=False)  # the street's power is back; the gateway still boots
    node = topo.nodes[0]
    await topo.wait_for(lambda: topo.output(node).count("sample held") >= 3, 30,
                        "samples held, a time request waiting")
    topo.start_gateway()
    await topo.wait_for(lambda: "(held)" in topo.output(node), 30, "the held samples sealed")
    await topo.wait_for(lambda: samples(topo.output(node)) >= 14 and not topo.outbox(node), 60,
                        "every sample sealed and acknowledged")
    await topo.wait_for(lambda: len(topo.upstream.readings) >= sum(topo.sampled(node).values()),
                        30, "every reading upstream")
    check_delivery(topo)  # every sealed reading upstream, bit-exact

    got = packs(topo, node.node_id)
    readings = {s: p for s, p in got.items() if value(p, "uptime") is not None}
    assert len(readings) == 14, sorted(got)
    for seq, recs in got.items():
        flag = value(recs, "time.q")
        for r in recs:
            assert r["t"] >= Y2001 or flag, (seq, recs)  # 1970 only with a flag saying so
    for seq, recs in readings.items():
        (t,) = {r["t"] for r in recs}
        true = t0 + value(recs, "uptime")
        assert true - 1 <= t <= true + SLACK_S, (seq, t - true, recs)
        assert value(recs, "time.q") is None, recs  # held, then timed exactly
    requests = [recs for recs in got.values() if value(recs, "uptime") is None]
    assert requests and all(value(r, "time.q") == 1 for r in requests)
    # in the order they were sampled
    ups = [value(readings[s], "uptime") for s in sorted(readings)]
    assert ups == sorted(ups)


async def test_an_unsynchronised_gateway_gives_no_time_and_says_so(tmp_path: Path) -> None:
    """The gateway's ingest, queue and API with its clock's state read from a switchable kernel;
    the node on MicroPython at the epoch. No time handed out while unsynchronised, /healthz and
    /metrics say so; once it syncs, the held readings are timed right and what the gateway
    anchored at receipt is corrected."""
    kernel = KernelClock(synchronized=False)
    ts = TimeSync(probe=kernel, path=tmp_path / "clock.json")
    t0 = time.time()
    async with node_line(tmp_path, "SL-0001", interval_ms=400,
                         extra={"clock_at_epoch": True}) as line:
        use_clock(line.ingest, ts)
        store = line.ingest.store
        store.out.clock = ts
        view = GatewayView(line.metrics, store, ["SL-0001"], [line.link], [FakeForwarder()],
                           clock=ts)
        async with TestClient(TestServer(Api(view).app)) as client:
            await line.until(lambda: line.output().count("clock not set") >= 3, 30,
                             "samples held: the gateway gives no time")
            health = await (await client.get("/healthz")).json()
            assert health["status"] == "degraded" and health["ready"] is True
            assert health["clock"]["synchronized"] is False
            assert health["clock"]["acks_without_time"] >= 1
            metrics = await (await client.get("/metrics")).text()
            assert "lantern_clock_synchronized 0.0" in metrics
            status = await (await client.get("/api/status")).json()
            assert status["clock"]["source"] == "adjtimex"
            assert all("(time request" in ln for ln in line.output().splitlines()
                       if ln.startswith("sample seq="))  # nothing sealed with a time

            kernel.synchronized = True
            await line.until(lambda: line.output().count("(held)") >= 3, 30,
                             "the held samples sealed once the gateway synced")
            health = await (await client.get("/healthz")).json()
            assert health["clock"]["synchronized"] is True and health["status"] == "ok"
            assert "lantern_clock_synchronized 1.0" in await (await client.get("/metrics")).text()
            await line.until(lambda: any(ln.startswith("sample seq=") and "(" not in ln
                                         for ln in line.output().splitlines()), 30,
                             "a sample sealed at once")

        batch = await store.next_batch(10_000)
        assert batch is not None
        got: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in batch.records():  # as a sink would send them
            got[int(r["id"].split(":")[1])].append(r)
    for seq, recs in got.items():
        up = value(recs, "uptime")
        (t,) = {r["t"] for r in recs}
        if up is None:  # a time request: anchored at its receipt, corrected (step 0 here)
            assert value(recs, "time.q") == 1 and t0 - 1 <= t <= time.time() + 1, recs
        else:
            assert t0 + up - 1 <= t <= t0 + up + SLACK_S, (seq, t - t0 - up, recs)
            assert value(recs, "time.q") is None, recs
    assert ts.flagged == 0  # every receipt anchored: the step (0 s, the host's clock was right)
    assert ts.corrected == 0  # is known
