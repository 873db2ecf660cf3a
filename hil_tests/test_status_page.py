"""The status page in real headless Chromium, on live data from MicroPython nodes.

Three nodes run the firmware on the unix port and feed the real gateway process; Chromium
(Debian's package, driven over the DevTools protocol) loads the page the gateway serves.
One node is frozen (SIGSTOP) for several sampling intervals: the page must flag it while it
is silent and, once it samples again, draw the gap where its readings are missing. Then a
rollout (`lantern gateway rollout start`) of a signed bundle the canary refuses (these
nodes hold no release key, and the bundle names another bytecode version: either refuses
it): the page shows it halted with the node's reason, the other nodes untouched, and every
node's firmware version as its STATUS said it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import lantern
from lantern.agent.configfile import toml_string
from lantern.tools.field import release
from lantern.tools.street.sim import SimNode

from .harness.cdp import Browser
from .harness.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / ".build" / "screenshots" / "status-page.png"
# the street view alone; docs/street-view.png is a copy of one (docs/alerts.md)
STREET_SHOT = ROOT / ".build" / "screenshots" / "street-view.png"
URL_LINE = re.compile(r"status page and API at (http://127\.0\.0\.1:\d+/)")
FROZEN_S = 7.0

pytestmark = pytest.mark.chromium


def js(node: str, selector: str) -> str:
    return f"document.querySelector({json.dumps(selector.replace('NODE', node))})"


async def test_status_page_live_in_chromium(tmp_path: Path, micropython: Path) -> None:
    topo = Topology(tmp_path, n_nodes=3, interval_ms=1000)
    await topo.start(gateway=False)
    assert topo.gw_config is not None
    release_key = Ed25519PrivateKey.generate()
    pub = tmp_path / "release.pub.pem"
    pub.write_bytes(release_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with open(topo.gw_config, "a") as f:
        f.write("\n[api]\nport = 0\n")  # any free port; the gateway logs which
        f.write(f"\n[updates]\nrelease_key = {toml_string(pub)}\nnode_timeout_s = 60\n")
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
            await _rollout_refused_by_the_canary(b, url, ids, release_key, tmp_path)
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
    links = await b.eval("[...document.querySelectorAll('#links dd')]"
                         ".filter(d => d.dataset.field === 'link').map(d => d.textContent)")
    assert len(links) == 3 and all(x.startswith("up") for x in links)
    # the gateway's clock has its own line among the links (docs/time.md)
    clock = await b.eval("document.querySelector('#links dd[data-field=\"clock\"]')"
                         ".textContent")
    assert clock.startswith("synchronised"), clock
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


async def _rollout_refused_by_the_canary(b: Browser, url: str, ids: list[str],
                                         key: Ed25519PrivateKey, tmp: Path) -> None:
    """A signed bundle for this board but another bytecode version, to nodes provisioned
    without a release key: the gateway carries it (signed by the configured key, for a
    gateway this old), the canary's own check refuses it, the rollout halts."""
    bundle = tmp / "other-bytecode.lub"
    bundle.write_bytes(release.bundle(key, "9.9.9", 0, "0.0.1", ["unix-sim"], (6, 99),
                                      [("main.py", b"print('never runs')\n")]))
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lantern", "gateway", "rollout", "start", str(bundle), "--url",
        url, "--canary", ids[1], "--step", "1", "--json", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    assert p.returncode == 0, err.decode()
    assert json.loads(out)["rollout"]["canary"] == [ids[1]]
    state = await b.wait_for(
        "(s => !document.getElementById('rollout').hidden && s.dataset.state === 'halted' "
        "&& s.textContent)(document.getElementById('rollout-state'))", 90,
        "the rollout panel saying halted")
    assert state == "halted"
    rows = await b.eval("""Object.fromEntries([...document.querySelectorAll(
        '#rollout-nodes tbody tr')].map(tr => [tr.dataset.node, [tr.dataset.state,
        tr.querySelector('[data-field=role]').textContent,
        tr.querySelector('[data-field=why]').textContent]]))""")
    assert rows[ids[1]][:2] == ["refused", "canary"], rows
    assert rows[ids[1]][2], rows  # the node's reason, as the transfer gave it
    assert all(rows[n][0] == "pending" for n in (ids[0], ids[2])), rows
    reason = await b.eval("document.getElementById('rollout-reason').textContent")
    assert reason.startswith(f"halted: canary {ids[1]} refused"), reason
    api = await _api(url, "api/rollout")
    assert api["rollout"]["state"] == "halted"
    assert api["rollout"]["reason"] == reason.removeprefix("halted: ")
    # every node's version as its STATUS said (the gateway probes the links for it)
    await b.wait_for(f"[...document.querySelectorAll('#nodes [data-field=firmware]')]"
                     f".every(td => td.textContent === {json.dumps(lantern.__version__)})",
                     60, "every node's firmware version in the node table")


# ---------------------------------------------------------------- the street view

STREET_SPEED = 600.0  # street seconds per wall second: a 1-s sample every 10 street minutes
# poles along a gently bending street (lat, lon); SL-0005 has no location in [nodes]
POLES = {"SL-0001": (52.37020, 4.89520), "SL-0002": (52.37035, 4.89580),
         "SL-0003": (52.37055, 4.89640), "SL-0004": (52.37080, 4.89695)}
STREET_FAULTS: dict[str, list[dict[str, object]]] = {
    "SL-0002": [{"chip": "lamp", "kind": "dark"}],  # broken from the start (before dawn)
    "SL-0003": [{"chip": "lamp", "kind": "dayburn"}],  # its photocell stuck: burns all day
}


@dataclass
class DawnNode(SimNode):
    """A node whose street starts at 05:00 UTC, STREET_SPEED times faster, with its faults."""

    def __post_init__(self) -> None:
        self.scenario = {"speed": STREET_SPEED,
                         "start_s": math.floor(time.time() / 86400) * 86400 + 5 * 3600,
                         "faults": STREET_FAULTS.get(self.node_id, [])}


def _street_config() -> str:
    nodes = "".join(f'\n[nodes."{n}"]\npole = "{n[-2:].lstrip("0")}"\n'
                    f"location = [{lat}, {lon}]\ninterval_s = 1\n"
                    for n, (lat, lon) in POLES.items())
    return f"""
[api]
port = 0

[health]
silent_intervals = 10
cycling_window_s = 20
cycling_clear_s = 20

[health.lamp]
rating_w = 36
dim_levels = [0.6]
interval_s = 1
{nodes}"""


@pytest.mark.alerts
async def test_street_view_in_chromium(tmp_path: Path, micropython: Path) -> None:
    """Five poles at dawn: a broken lamp (dark, critical), a day-burner (burning in daylight,
    warning), three healthy lamps that switched off at sunrise. Each pole is drawn where
    [nodes] says it stands, coloured by its lamp and its health; the open alerts are listed;
    each lamp's energy today is shown; and small values read at their scale."""
    topo = Topology(tmp_path, n_nodes=5, interval_ms=1000, node_class=DawnNode,
                    gateway_extra=_street_config())
    await topo.start()
    try:
        await topo.wait_for(lambda: URL_LINE.search(topo.gateway_log()) is not None, 60,
                            "the gateway's status page URL in its log")
        m = URL_LINE.search(topo.gateway_log())
        assert m
        url = m.group(1)
        async with Browser(tmp_path / "chrome-profile") as b:
            await b.goto(url)
            await b.wait_for("!document.getElementById('street').hidden && "
                             "document.querySelectorAll('#street-map g.pole').length === 5", 60,
                             "the street view with five poles")
            pole = "document.querySelector('#street-map g.pole[data-node=NODE]').dataset"
            def dataset(node: str) -> str:
                return f"(d => [d.state, d.health, d.alerts])({pole.replace('NODE', node)})"

            want = {"SL-0001": ["off", "ok", ""], "SL-0002": ["off", "critical",
                                                              "LampDarkAtNight"],
                    "SL-0003": ["on", "warning", "LampDayBurner"], "SL-0004": ["off", "ok", ""],
                    "SL-0005": ["off", "ok", ""]}
            expr = "[" + ", ".join(dataset(n) for n in want) + "]"
            got = None
            for _ in range(300):  # every 0.3 s for 90 s: the states settle after dawn
                got = await b.eval(expr)
                if got == list(want.values()):
                    break
                await asyncio.sleep(0.3)
            page = await b.eval("[document.getElementById('live').dataset.refreshes, "
                                "document.getElementById('problem').textContent]")
            assert got == list(want.values()), ("the broken lamp and the day-burner in "
                                                f"daylight; page {page}, errors {b.errors}")
            await _poles_where_they_stand(b)
            await _alerts_and_energy_listed(b, url)
            await _energy_reads_at_its_scale(b)
            rect = await b.eval("(r => [r.x, r.y + scrollY, r.width, r.height])("
                                "document.getElementById('street').getBoundingClientRect())")
            shot = await b.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                clip={"x": rect[0], "y": rect[1], "width": rect[2],
                                      "height": rect[3], "scale": 1})
            png = base64.b64decode(shot["data"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            STREET_SHOT.parent.mkdir(parents=True, exist_ok=True)
            STREET_SHOT.write_bytes(png)
            assert b.requests and all(u.startswith(url) for u in b.requests), b.requests
            assert b.errors == [], b.errors
    finally:
        await topo.stop()


async def _poles_where_they_stand(b: Browser) -> None:
    """East is right and north is up, at one scale: the drawn offsets between poles are
    proportional to their offsets on the ground."""
    xy = await b.eval("""Object.fromEntries([...document.querySelectorAll('#street-map g.pole')]
        .map(g => [g.dataset.node, g.getAttribute('transform').match(/[-\\d.]+/g).map(Number)]))""")
    k = math.cos(math.radians(52.3705))
    ids = list(POLES)
    ground = [((POLES[n][1] - POLES[ids[0]][1]) * k, POLES[n][0] - POLES[ids[0]][0]) for n in ids]
    drawn = [(xy[n][0] - xy[ids[0]][0], xy[ids[0]][1] - xy[n][1]) for n in ids]
    scale = drawn[-1][0] / ground[-1][0]
    for (gx, gy), (dx, dy) in zip(ground, drawn, strict=True):
        assert abs(dx - gx * scale) < 1.5 and abs(dy - gy * scale) < 1.5, (ground, drawn)
    # the pole without a location stands apart, below the street, not on it
    assert xy["SL-0005"][1] > max(xy[n][1] for n in ids)


async def _alerts_and_energy_listed(b: Browser, url: str) -> None:
    alerts = await b.eval("[...document.querySelectorAll('#street-alerts li')]"
                          ".map(li => [li.dataset.node, li.dataset.alert, li.className])")
    assert sorted(alerts) == [["SL-0002", "LampDarkAtNight", "critical"],
                              ["SL-0003", "LampDayBurner", "warning"]], alerts
    # energy grows while we look: the page's refresh falls between two reads of the API
    before = {n["id"]: n["lamp"] for n in (await _api(url, "api/health"))["nodes"]}
    refreshes = await b.eval("+document.getElementById('live').dataset.refreshes")
    await b.wait_for(f"+document.getElementById('live').dataset.refreshes > {refreshes + 1}",
                     30, "a refresh of the page after the first read")
    shown = await b.eval("""Object.fromEntries([...document.querySelectorAll('#lamps tbody tr')]
        .map(tr => [tr.dataset.node, tr.querySelector('[data-field=today]').textContent]))""")
    lamps = {n["id"]: n["lamp"] for n in (await _api(url, "api/health"))["nodes"]}
    assert lamps["SL-0003"]["today_kwh"] > lamps["SL-0001"]["today_kwh"] > 0
    # the broken lamp's driver draws its standby power only
    assert lamps["SL-0002"]["today_kwh"] < lamps["SL-0003"]["today_kwh"] / 50
    for node, lamp in lamps.items():
        value, unit = shown[node].split()
        wh = float(value) * {"Wh": 1, "mWh": 1e-3, "kWh": 1e3, "µWh": 1e-6}[unit]
        lo, hi = before[node]["today_kwh"] * 1000, lamp["today_kwh"] * 1000
        assert lo * 0.995 <= wh <= hi * 1.005, (node, shown[node], lo, hi)
    today = await b.eval("document.querySelector('#street-map g.pole[data-node=SL-0003] "
                         "text.kwh').textContent")
    assert today == shown["SL-0003"] + " today"


async def _energy_reads_at_its_scale(b: Browser) -> None:
    """The node's energy per interval (a few J or less): never "0.00 J"."""
    text = await b.wait_for("(v => v && v.firstChild.textContent)(document.querySelector("
                            "'.node-card[data-node=SL-0001] .meas[data-name=energy] .value'))",
                            30, "the node's energy reading")
    raw = float(await b.eval("document.querySelector('.node-card[data-node=SL-0001] "
                             ".meas[data-name=energy] .value').dataset.value"))
    value, unit = text.split()
    scale = {"J": 1, "mJ": 1e-3, "µJ": 1e-6, "kJ": 1e3}[unit]
    assert raw > 0 and float(value) > 0, text
    assert float(value) * scale == pytest.approx(raw, rel=0.06), (text, raw)
