"""Revocation through the real service: two MicroPython nodes on pty links, `lantern gateway
run` with an NGSI-LD sink to the test broker; one node revoked with `lantern gateway nodes
revoke`, the gateway restarted. Its frames are refused and counted on /metrics, it is flagged
on /api/nodes, its Device entity upstream says so (validated against the Device schema), and
the other node goes on delivering."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from lantern.agent import cli, ngsi
from lantern.agent.configfile import toml_string
from lantern.tools.street.ngsi_broker import NgsiBroker
from tests.helpers import sdm

from .harness.topology import Topology

pytestmark = pytest.mark.fleet

URL_LINE = re.compile(r"status page and API at (http://127\.0\.0\.1:\d+/)")
REVOKED = re.compile(r'lantern_frames_rejected_total\{reason="revoked"\} (\d+)\.0')


def readings_of(topo: Topology, node: str) -> int:
    return sum(1 for rid in topo.upstream.readings if rid.startswith(node + ":"))


async def test_a_revoked_node_is_refused_counted_and_flagged(tmp_path: Path,
                                                             micropython: Path) -> None:
    broker = NgsiBroker()
    await broker.start()
    topo = Topology(tmp_path, n_nodes=2, interval_ms=300)
    try:
        await topo.start(gateway=False)
        assert topo.gw_config is not None
        with open(topo.gw_config, "a") as f:
            f.write(f"\n[api]\nport = 0\n\n[sinks.ngsi_ld]\nurl = {toml_string(broker.url)}\n")
        topo.start_gateway()
        keep, gone = (n.node_id for n in topo.nodes)
        await topo.wait_for(lambda: readings_of(topo, keep) and readings_of(topo, gone), 60,
                            "readings of both nodes upstream")

        topo.kill_gateway(signal.SIGTERM)
        assert cli.main(["gateway", "nodes", "revoke", gone, "--reason", "test",
                         "--config", str(topo.gw_config)]) == 0
        log_from = len(topo.gateway_log())
        at_revoke = {n: readings_of(topo, n) for n in (keep, gone)}
        topo.start_gateway()
        await topo.wait_for(lambda: URL_LINE.search(topo.gateway_log()[log_from:]) is not None,
                            60, "the restarted gateway's API URL in its log")
        m = URL_LINE.search(topo.gateway_log()[log_from:])
        assert m
        url = m.group(1)

        async with aiohttp.ClientSession() as s:
            async def revoked_count() -> int:
                async with s.get(url + "metrics") as r:
                    found = REVOKED.search(await r.text())
                return int(found.group(1)) if found else 0

            # another process's counter: polled (the node resends on its own timer)
            for _ in range(600):
                if await revoked_count() >= 3 and readings_of(topo, keep) > at_revoke[keep]:
                    break
                await asyncio.sleep(0.1)
            assert await revoked_count() >= 3
            async with s.get(url + "api/nodes") as r:
                nodes = {n["id"]: n for n in (await r.json())["nodes"]}
        assert nodes[gone]["state"] == "revoked" and "revoked" in nodes[gone]["flags"]
        assert nodes[keep]["state"] == "active"
        assert readings_of(topo, keep) > at_revoke[keep]
        assert readings_of(topo, gone) == at_revoke[gone]  # nothing more of it taken
        await topo.wait_for(lambda: broker.entities.get(
            f"urn:ngsi-ld:Device:lantern:{gone}", {}).get("deviceState", {}).get("value")
            == "revoked", 30, "the revoked node's Device entity upstream")
        for node in (keep, gone):
            e = broker.entities[f"urn:ngsi-ld:Device:lantern:{node}"]
            kv = ngsi.key_values({**e, "@context": ngsi.CONTEXTS})
            assert sdm.errors("Device", kv) == [], kv
        assert broker.rejected == []
    finally:
        await topo.stop()
        await broker.stop()


async def test_a_revocation_applies_without_a_restart(tmp_path: Path, micropython: Path) -> None:
    """`lantern gateway nodes revoke` while the gateway runs: from then on the node's frames
    are refused and counted as revoked (ingest asks the registry on every frame), and the
    other node keeps delivering."""
    topo = Topology(tmp_path, n_nodes=2, interval_ms=300)
    try:
        await topo.start(gateway=False)
        assert topo.gw_config is not None
        with open(topo.gw_config, "a") as f:
            f.write("\n[api]\nport = 0\n")
        topo.start_gateway()
        keep, gone = (n.node_id for n in topo.nodes)
        await topo.wait_for(lambda: readings_of(topo, keep) and readings_of(topo, gone), 60,
                            "readings of both nodes upstream")
        await topo.wait_for(lambda: URL_LINE.search(topo.gateway_log()) is not None, 60,
                            "the gateway's API URL in its log")
        m = URL_LINE.search(topo.gateway_log())
        assert m
        url = m.group(1)
        assert cli.main(["gateway", "nodes", "revoke", gone, "--reason", "test",
                         "--config", str(topo.gw_config)]) == 0
        async with aiohttp.ClientSession() as s:
            async def revoked_count() -> int:
                async with s.get(url + "metrics") as r:
                    found = REVOKED.search(await r.text())
                return int(found.group(1)) if found else 0

            # another process's counter: polled (the node resends on its own timer)
            for _ in range(600):
                if await revoked_count() >= 3:
                    break
                await asyncio.sleep(0.1)
            assert await revoked_count() >= 3
            at_refusal = {n: readings_of(topo, n) for n in (keep, gone)}
            await topo.wait_for(lambda: readings_of(topo, keep) > at_refusal[keep], 30,
                                "the other node's readings keep coming")
        assert readings_of(topo, gone) == at_refusal[gone]  # nothing more of it taken
    finally:
        await topo.stop()
