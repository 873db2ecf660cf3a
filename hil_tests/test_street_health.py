"""Lamp faults on the simulated street, end to end: MicroPython nodes → the real gateway's
health monitor → alerts to a webhook, once each across a gateway restart.

Four nodes run the firmware on the unix port over the simulated street (firmware/sim), its
day compressed SPEED times (one sample every SPEED seconds of street time): SL-0001 healthy,
SL-0002's lamp broken for the first hours of the night (LampDarkAtNight), SL-0003's photocell
stuck until the afternoon (LampDayBurner), SL-0004 dead from midnight to the early afternoon
(the street cuts its power: NodeSilent). Each alert must be raised once and cleared once,
reach the webhook receiver exactly once per raise and clear although the gateway is
restarted (SIGTERM, then started again) while the broken lamp's alert is open, and show in
/metrics and /api/health. The healthy node raises nothing.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lantern.tools.street.sim import SimNode

from .harness.topology import Topology

pytestmark = pytest.mark.alerts

SPEED = 960.0  # street seconds per wall second: 16 min per 1-s sample, a day in 90 s
URL_LINE = re.compile(r"status page and API at (http://127\.0\.0\.1:\d+/)")
# the street starts at 22:00 UTC; faults in hours from there (firmware/sim/scenario.py)
FAULTS: dict[str, list[dict[str, object]]] = {
    "SL-0002": [{"chip": "lamp", "kind": "dark", "from_h": 0, "to_h": 5}],  # fixed at 03:00
    "SL-0003": [{"chip": "lamp", "kind": "dayburn", "from_h": 0, "to_h": 17}],  # until 15:00
    # no power from 00:00 to 13:00 (7.5 to 56 s): silent for longer than the gateway's 10
    # intervals plus its 30-s silence check, even across its restart
    "SL-0004": [{"chip": "node", "kind": "dead", "from_h": 2, "to_h": 15}],
}
ALERTS = ("LampDarkAtNight", "LampDayBurner", "NodeSilent")


def _start_s() -> float:
    return math.floor(time.time() / 86400) * 86400 + 22 * 3600


@dataclass
class StreetNode(SimNode):
    """A node whose street runs SPEED times faster and carries its own faults."""

    def __post_init__(self) -> None:
        self.scenario = {"speed": SPEED, "start_s": _start_s(),
                         "faults": FAULTS.get(self.node_id, [])}


class Receiver:
    """An Alertmanager-style webhook receiver: every notification, as it came."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def hook(self, request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer hook-secret"
        self.got.append(json.loads(await request.read()))
        return web.Response(status=200)

    def seen(self) -> Counter[tuple[str, str, str]]:
        return Counter((a["labels"]["alertname"], a["labels"]["node"], a["status"])
                       for n in self.got for a in n["alerts"])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _api(topo: Topology, started_after: int) -> str:
    await topo.wait_for(lambda: len(URL_LINE.findall(topo.gateway_log())) > started_after, 60,
                        "the gateway's status page URL in its log")
    return str(URL_LINE.findall(topo.gateway_log())[-1])


async def test_broken_lamp_and_day_burner_raised_once_cleared_once_delivered_once(
        tmp_path: Path, micropython: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    token = tmp_path / "hook.token"
    token.write_text("hook-secret\n")
    token.chmod(0o600)
    topo = Topology(tmp_path, n_nodes=4, interval_ms=1000, node_class=StreetNode)
    # Time compressed: a day in 90 s, so the windows that are an hour in the street are
    # seconds here; lamps 36 W, dimmed to 60 % after midnight, sampled every second.
    topo.gateway_extra = f"""
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

[health.webhook]
url = "{receiver.url}?key=query-secret"
token_file = "{token}"
"""
    try:
        await topo.start()
        url = await _api(topo, 0)
        dark = ("LampDarkAtNight", "SL-0002", "firing")
        await topo.wait_for(lambda: receiver.seen()[dark] == 1, 60, "the broken lamp's alert")
        # a restart while the alert is open: nothing is raised or sent again
        topo.kill_gateway(signal.SIGTERM)
        topo.start_gateway()
        url = await _api(topo, 1)
        want = {dark: 1, ("LampDarkAtNight", "SL-0002", "resolved"): 1,
                ("LampDayBurner", "SL-0003", "firing"): 1,
                ("LampDayBurner", "SL-0003", "resolved"): 1,
                ("NodeSilent", "SL-0004", "firing"): 1, ("NodeSilent", "SL-0004", "resolved"): 1}
        async with aiohttp.ClientSession() as http:
            await topo.wait_for(lambda: receiver.seen() == want, 150,
                                f"each alert raised and cleared once (got {receiver.seen()})")
            async with http.get(url + "metrics") as r:
                metrics = await r.text()
            async with http.get(url + "api/health") as r:
                street = await r.json()
        assert receiver.seen() == want  # nothing more, nothing twice
        for alert in ALERTS:
            assert f'lantern_health_raised_total{{alertname="{alert}"}} 1.0' in metrics
            assert f'lantern_health_cleared_total{{alertname="{alert}"}} 1.0' in metrics
        assert 'lantern_alert_deliveries_total{target="webhook"}' in metrics
        assert street["configured"] is True
        assert street["raised"] == dict.fromkeys(ALERTS, 1), street
        assert street["cleared"] == dict.fromkeys(ALERTS, 1), street
        lamps = {n["id"]: n for n in street["nodes"]}
        assert set(lamps) == {"SL-0001", "SL-0002", "SL-0003", "SL-0004"}
        for n in lamps.values():
            assert n["alerts"] == [] and n["lamp"]["kwh"] > 0, n
        # the day-burner burned in daylight; the others did not
        assert lamps["SL-0003"]["lamp"]["dayburn_kwh"] > 0
        assert lamps["SL-0001"]["lamp"]["dayburn_kwh"] == 0
        # the dead node was off, and measured nothing while it was (no power, no samples)
        dead = topo.nodes[3]
        assert dead.supply_error is None
        [(off, up_a), (on, up_b)] = dead.power_log
        assert (up_a, up_b) == (False, True)
        times = sorted(r["t"] for r in topo.upstream.readings.values()
                       if r["n"].split(":")[3] == "SL-0004")
        assert [t for t in times if off + 1 < t < on - 1] == []
        assert times[0] < off and times[-1] > on  # before it died, and after it came back
        log = topo.gateway_log()
        assert "query-secret" not in log and "hook-secret" not in log
        assert "Traceback" not in log
    finally:
        await topo.stop()
        await receiver.stop()
