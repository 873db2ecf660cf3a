"""The gateway's `[clock] mode` as an operator runs it (docs/time.md): the gateway as a process,
a node on the MicroPython unix port whose clock starts at the epoch at every boot (node.json
`clock_at_epoch`, as an ESP32's RTC after a power cut), on this machine as it is.

"kernel" believes adjtimex: on a machine whose kernel clock no time daemon has synchronised
(this container: state 5, STA_UNSYNC) the node is never given the time — its ACKs carry no key
2, its samples stay held, /healthz says `degraded` with the clock's state. On a synchronised
machine "kernel" gives the time like "trust"; the test reads the kernel's state as the gateway
does and expects what that state means. "trust" gives the time whatever the kernel says (what
`lantern sim`, `lantern demo` and these tests' streets write).
"""

from __future__ import annotations

import re
import time
from typing import Any

import aiohttp
import pytest

from lantern.agent.timesync import GATEWAY_UNSYNCED, RELATIVE, probe

from .harness.delivery import check_delivery
from .harness.topology import Topology

URL_LINE = re.compile(r"status page and API at (http://127\.0\.0\.1:\d+/)")
API = "\n[api]\nport = 0\n"  # any free port; the gateway logs which
SAMPLES = 6


async def _get(url: str) -> tuple[dict[str, Any], str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "healthz") as r:
            health = await r.json()
        async with http.get(url + "metrics") as r:
            metrics = await r.text()
    return health, metrics


def _requests_only(out: str) -> bool:
    """Every pack the node sealed is a time request: no sample was sealed with a time."""
    return all("(time request" in ln for ln in out.splitlines() if ln.startswith("sample seq="))


@pytest.mark.parametrize("mode", ["kernel", "trust"])
async def test_clock_mode_on_this_machine(topology: Topology, mode: str) -> None:
    synced_here = probe().synchronized  # this machine's kernel clock, read as the gateway does
    gives_time = mode == "trust" or synced_here
    topo = topology
    topo.n_nodes = 1
    topo.interval_ms = 300
    topo.sample_limit = SAMPLES if gives_time else 0
    topo.node_extra = {"clock_at_epoch": True}
    topo.gateway_extra = API
    topo.clock = mode
    t0 = time.time()
    await topo.start()
    node = topo.nodes[0]
    wire = topo.wires[node.node_id]
    await topo.wait_for(lambda: URL_LINE.search(topo.gateway_log()) is not None, 60,
                        "the gateway's status page URL in its log")
    m = URL_LINE.search(topo.gateway_log())
    assert m is not None
    url = m.group(1)

    if not gives_time:
        # the node asks (a request each interval: each is acknowledged at once), the gateway
        # acknowledges without its time: the samples stay held
        await topo.wait_for(lambda: len(topo.time_requests(node)) >= 3 and wire.ack_frames >= 3,
                            30, "requests acknowledged, samples held")
        assert re.search(r"clock not set, ([3-9]|\d\d+) held", topo.output(node))
        request = min(topo.time_requests(node))
        await topo.wait_for(lambda: f"{node.node_id}:{request}:0" in topo.upstream.readings, 30,
                            "the time request upstream")
        health, metrics = await _get(url)
        assert health["status"] == "degraded" and health["ready"] is True, health
        clock = health["clock"]
        assert clock["synchronized"] is False and clock["source"] == "adjtimex", clock
        assert clock["mode"] == "kernel" and clock["acks_without_time"] >= 1, clock
        assert "lantern_clock_synchronized 0.0" in metrics
        assert wire.timed_acks == 0 and wire.ack_frames >= 1
        assert _requests_only(topo.output(node))
        assert "clock: NOT synchronised" in topo.gateway_log()
        # its receipt stamped by an unsynchronised clock, no step known: flagged, not vouched for
        up = topo.upstream.readings[f"{node.node_id}:{request}:0"]
        assert up["n"].endswith(":time.q") and up["v"] == RELATIVE | GATEWAY_UNSYNCED, up
        return

    await topo.wait_for(lambda: len(topo.samples(node)) == SAMPLES and not topo.outbox(node),
                        60, f"{SAMPLES} samples sealed and acknowledged")
    await topo.wait_for(lambda: len(topo.upstream.readings)
                        >= sum(topo.sampled(node).values()), 30, "every reading upstream")
    check_delivery(topo)
    t1 = time.time()
    health, metrics = await _get(url)
    clock = health["clock"]
    assert clock["synchronized"] is True and clock["mode"] == mode, clock
    assert clock["source"] == ("assumed" if mode == "trust" else "adjtimex"), clock
    assert health["status"] == "ok", health
    assert "lantern_clock_synchronized 1.0" in metrics
    assert wire.timed_acks >= 1 and topo.time_requests(node)
    assert "(held)" in topo.output(node)
    for rid, r in topo.upstream.readings.items():
        assert t0 - 1 <= r["t"] <= t1 + 1, (rid, r["t"] - t0)
        if r["n"].endswith(":time.q"):
            assert r["v"] == RELATIVE, r  # the requests: anchored at receipt, no other flag
