"""Time you can trust, end to end (docs/time.md): a node whose clock starts at the epoch, the
gateway as a process, the readings as the upstream platform receives them.

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
from typing import Any

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
