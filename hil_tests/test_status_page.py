"""The status page in real headless Chromium, on live data from MicroPython nodes.

Three nodes run the firmware on the unix port and feed the real gateway process; Chromium
(Debian's package, driven over the DevTools protocol) loads the page the gateway serves.
One node is frozen (SIGSTOP) for several sampling intervals: the page must flag it while it
is silent and, once it samples again, draw the gap where its readings are missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import lantern

from .harness.cdp import Browser
from .harness.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / ".build" / "screenshots" / "status-page.png"
URL_LINE = re.compile(r"status page and API at (http://127\.0\.0\.1:\d+/)")
FROZEN_S = 7.0

pytestmark = pytest.mark.chromium


def js(node: str, selector: str) -> str:
    return f"document.querySelector({json.dumps(selector.replace('NODE', node))})"


async def test_status_page_live_in_chromium(tmp_path: Path, micropython: Path) -> None:
    topo = Topology(tmp_path, n_nodes=3, interval_ms=1000)
    await topo.start(gateway=False)
    assert topo.gw_config is not None
    with open(topo.gw_config, "a") as f:
        f.write("\n[api]\nport = 0\n")  # any free port; the gateway logs which
    topo.start_gateway()
    try:
        await topo.wait_for(lambda: URL_LINE.search(topo.gateway_log()) is not None, 60,
                            "the gateway's status page URL in its log")
        m = URL_LINE.search(topo.gateway_log())
        assert m
        url = m.group(1)
        ids = [n.node_id for n in topo.nodes]
        await topo.wait_for(lambda: {r["id"].split(":")[0] for r in
                                     topo.upstream.readings.values()} == set(ids), 60,
                            "readings from every node upstream")
        async with Browser(tmp_path / "chrome-profile") as b:
            await b.goto(url)
            await b.wait_for("document.querySelectorAll('#nodes tbody tr').length === 3 && "
                             "document.getElementById('live').dataset.state === 'live'", 60,
                             "three node rows and a live page")
            await _table_matches_the_api(b, url, ids)
            await _page_refreshes_itself(b)
            await _health_cards(b)
            await _values_are_the_nodes_own(b, topo, ids[0])

            frozen = topo.nodes[1]
            assert frozen.proc is not None
            t_stop = time.time()
            os.kill(frozen.proc.pid, signal.SIGSTOP)
            try:
                # silent for > 3 intervals: flagged while it happens
                flags = await b.wait_for(
                    f"(t => t.includes('stale') && t.includes('gap') && t)"
                    f"({js(ids[1], 'tr[data-node=NODE] [data-field=flags]')}.textContent)",
                    30, "'stale' and 'gap' on the frozen node")
                assert "stale" in flags
                # the scenario, not a synchronisation: the node stays frozen this long
                await asyncio.sleep(max(0.0, FROZEN_S - (time.time() - t_stop)))
            finally:
                t_cont = time.time()
                os.kill(frozen.proc.pid, signal.SIGCONT)
            await _gap_drawn_where_readings_are_missing(b, ids, t_stop, t_cont)
            await b.wait_for(f"!{js(ids[1], 'tr[data-node=NODE] [data-field=flags]')}"
                             ".textContent.includes('stale')", 30,
                             "the frozen node no longer stale once it speaks again")
            png = await b.screenshot(SCREENSHOT)
            (tmp_path / "status-page.png").write_bytes(png)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            width, height = struct.unpack(">II", png[16:24])
            assert width == 1280 and height >= 900
            # offline: the page fetched nothing but its own gateway
            assert b.requests and all(u.startswith(url) for u in b.requests), b.requests
            assert b.errors == [], b.errors
    finally:
        await topo.stop()


async def _api(url: str, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url + path) as r:
        assert r.status == 200
        return await r.json()


async def _table_matches_the_api(b: Browser, url: str, ids: list[str]) -> None:
    # a node's first packs may not carry every measurement: wait until each row has them
    await b.wait_for("[...document.querySelectorAll('#nodes tbody tr')].every(tr => "
                     "/^\\d+$/.test(tr.querySelector('[data-field=outbox]').textContent) && "
                     "tr.querySelector('[data-field=battery]').textContent !== '—')", 30,
                     "outbox and battery in every row")
    api = {n["id"]: n for n in (await _api(url, "api/nodes"))["nodes"]}
    rows = await b.eval("""[...document.querySelectorAll('#nodes tbody tr')].map(tr =>
        Object.fromEntries([...tr.querySelectorAll('[data-field]')].map(td =>
            [td.dataset.field, td.dataset.age !== undefined ? td.dataset.age : td.textContent])))
    """)
    assert [r["id"] for r in rows] == ids
    for r in rows:
        a = api[r["id"]]
        assert r["link"] == a["link"] and r["link"].startswith("serial:/dev/pts/")
        assert 0 <= float(r["last-seen"]) < 10
        # the page and this call read the API a moment apart: the same kind of value
        assert r["outbox"].isdigit() and isinstance(a["outbox"], int)
        value, unit = r["battery"].split(" ")  # the simulated board has a battery gauge
        assert unit == a["battery"]["u"] == "V"
        assert abs(float(value) - a["battery"]["v"]) <= 0.1 * abs(a["battery"]["v"])
        assert int(r["frames"]) >= 1


async def _page_refreshes_itself(b: Browser) -> None:
    before = await b.eval("[document.getElementById('live').dataset.refreshes, "
                          "document.querySelector('tr [data-field=frames]').textContent]")
    await b.wait_for(f"(r => +r[0] > {before[0]} + 1 && +r[1] > {before[1]})"
                     "([document.getElementById('live').dataset.refreshes, "
                     "document.querySelector('tr [data-field=frames]').textContent])", 30,
                     "the page to refresh and count new frames without a reload")


async def _health_cards(b: Browser) -> None:
    cards = await b.eval("""Object.fromEntries([...document.querySelectorAll('dd')]
        .map(d => [d.dataset.field, d.textContent]))""")
    assert cards["sink-http"] == "ok"
    assert cards["readings"].isdigit()
    assert cards["intake"] == "open"
    links = await b.eval("[...document.querySelectorAll('#links dd')].map(d => d.textContent)")
    assert len(links) == 3 and all(x.startswith("up") for x in links)
    summary = await b.eval("document.getElementById('summary').textContent")
    assert summary.startswith("3/3 nodes seen, 3/3 links up")
    assert await b.eval("document.getElementById('version').textContent") == \
        f"version {lantern.__version__}"


async def _values_are_the_nodes_own(b: Browser, topo: Topology, node: str) -> None:
    """What the page shows is what the node sampled (as the upstream received it)."""
    spark = await b.wait_for(
        f"(s => s && +s.dataset.points >= 5 && s.dataset.points)"
        f"({js(node, 'svg.spark[data-node=NODE][data-name=temperature]')})", 30,
        "a temperature sparkline with 5 points")
    shown = float(await b.eval(
        f"{js(node, '.node-card[data-node=NODE] .meas[data-name=temperature] .value')}"
        ".dataset.value"))
    sent = {r["v"] for r in topo.upstream.readings.values()
            if r["id"].startswith(node + ":") and r["n"].endswith(":temperature")}
    assert shown in sent, (shown, sorted(sent))
    assert int(spark) <= len(sent) + 5  # no invented points (a few may be in flight)


async def _gap_drawn_where_readings_are_missing(b: Browser, ids: list[str], t_stop: float,
                                               t_cont: float) -> None:
    closed = js(ids[1], "svg.spark[data-node=NODE][data-name=temperature] rect.gap[data-open='0']")
    gap = await b.wait_for(f"(r => r && [+r.dataset.from, +r.dataset.to])({closed})", 30,
                           "a closed gap on the frozen node's sparkline")
    start, end = gap
    # sample times are whole seconds of the node's clock (set from the gateway's ACKs)
    assert start <= t_stop + 2 and end >= t_cont - 2, (gap, t_stop, t_cont)
    assert end - start >= FROZEN_S - 2
    # let the frozen node's line resume visibly before the screenshot
    points = f"+{js(ids[1], 'svg.spark[data-node=NODE][data-name=temperature]')}.dataset.points"
    now_points = await b.eval(points)
    await b.wait_for(f"{points} >= {now_points + 3}", 30, "three new points after the gap")
    for other in (ids[0], ids[2]):
        rects = await b.eval(
            f"[...document.querySelectorAll('svg.spark[data-node={other}] rect.gap')]"
            ".map(r => [+r.dataset.from, +r.dataset.to])")
        overlapping = [g for g in rects if g[0] < t_cont - 2 and g[1] > t_stop + 2]
        assert overlapping == [], (other, rects)
