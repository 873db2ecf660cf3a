"""The status page behind a bearer token, in real headless Chromium (no MicroPython needed).

The page shell loads without the token; without it the page says how to give one, with
`#token=` in the URL it goes live and shows the nodes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from hil_tests.harness.cdp import Browser
from lantern.agent.api import Api, GatewayView
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import Store
from tests.helpers.api import FakeForwarder, FakeLink, commit, pack

pytestmark = pytest.mark.chromium
TOKEN = "t0ken-with-some-length"


async def test_page_needs_and_uses_the_token(tmp_path: Path) -> None:
    async with Store(tmp_path / "queue.sqlite") as store:
        now = int(time.time())
        await commit(store, [pack("SL-0007", i, now - 30 + i, {"temperature": 20.0 + i})
                             for i in range(20)])
        metrics = Metrics()
        metrics.seen("SL-0007", "serial:/dev/ttyUSB0", 19)
        view = GatewayView(metrics, store, ["SL-0007"], [FakeLink("serial:/dev/ttyUSB0")],
                           [FakeForwarder()])
        server = TestServer(Api(view, TOKEN).app, host="127.0.0.1")
        await server.start_server()
        url = str(server.make_url("/"))
        try:
            async with Browser(tmp_path / "chrome-profile") as b:
                await b.goto(url)
                msg = await b.wait_for(
                    "(p => !p.hidden && p.textContent)(document.getElementById('problem'))",
                    30, "the page asking for a token")
                assert "#token=" in msg
                assert await b.eval("document.getElementById('live').dataset.state") == \
                    "offline"
                await b.goto("about:blank")  # a hash change alone would not reload the page
                await b.goto(url + "#token=" + TOKEN)
                await b.wait_for("document.getElementById('live').dataset.state === 'live'",
                                 30, "the page live with the token")
                row = await b.wait_for(
                    "(r => r && r.textContent)"
                    "(document.querySelector('tr[data-node=\"SL-0007\"]'))", 30, "the node row")
                assert "serial:/dev/ttyUSB0" in row
                points = await b.wait_for(
                    "(s => s && +s.dataset.points)(document.querySelector("
                    "'svg.spark[data-node=\"SL-0007\"][data-name=\"temperature\"]'))",
                    30, "the sparkline")
                assert points == 20
                # the token is kept for the tab, never sent anywhere but the gateway
                assert all(u.startswith(url) for u in b.requests), b.requests
                errors = [e for e in b.errors if "401" not in e]
                assert errors == [], errors
        finally:
            await server.close()
