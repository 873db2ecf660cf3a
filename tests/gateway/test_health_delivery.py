"""Alert delivery to a webhook in Alertmanager's format: durable, retried, in order, and each
alert received exactly once across gateway restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lantern.agent.health.notify import ZERO_TIME, Webhook
from lantern.agent.health.service import HealthService
from lantern.agent.health.settings import Lamp, Settings
from lantern.agent.health.store import HealthStore

pytestmark = pytest.mark.alerts

T0 = 1_780_000_000.0
STEP = 300.0
SETTINGS = Settings(default_lamp=Lamp(rating_w=36.0, dim_levels=(0.6,), interval_s=STEP))


class Receiver:
    """An HTTP server taking webhook POSTs; answers `status` (settable) and records the 2xx."""

    def __init__(self) -> None:
        self.status = 200
        self.got: list[dict[str, Any]] = []
        self.refused = 0
        self.changed = asyncio.Condition()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        data = await request.json()
        async with self.changed:
            if 200 <= self.status < 300:
                self.got.append(data)
            else:
                self.refused += 1
            self.changed.notify_all()
        if 300 <= self.status < 400:
            return web.Response(status=self.status, headers={"Location": "/elsewhere"})
        return web.Response(status=self.status)

    async def until(self, pred: Callable[[], bool]) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(pred), 20)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/alerts", r.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    r.url = f"http://127.0.0.1:{port}/alerts"
    try:
        yield r
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def service(state: Path, r: Receiver, s: aiohttp.ClientSession) -> HealthService:
    return HealthService(SETTINGS, state, [Webhook(r.url, s)], receiver="city-ops",
                         external_url="http://cabinet-7:8470/", backoff_s=0.01,
                         backoff_max_s=0.05)


def lamp(i: int, w: float) -> tuple[str, float, dict[str, Any]]:
    return ("SL-0042", T0 + i * STEP, {"lamp_power": w, "illuminance": 0.1 + i / 1000})


async def test_each_alert_is_received_exactly_once_across_a_restart(
        tmp_path: Path, receiver: Receiver, session: aiohttp.ClientSession) -> None:
    async with service(tmp_path, receiver, session) as svc:
        events = await svc.feed_many([lamp(i, 36.0) for i in range(14)]
                                     + [lamp(i, 0.0) for i in range(14, 20)])
        assert [(e.alert, e.status) for e in events] == [("LampDarkAtNight", "firing")]
        await receiver.until(lambda: len(receiver.got) == 1)
    async with service(tmp_path, receiver, session) as svc:  # the gateway restarted
        assert svc.health.conditions.is_open("LampDarkAtNight", "SL-0042")
        assert await svc.feed_many([lamp(i, 0.0) for i in range(20, 30)]) == []
        events = await svc.feed_many([lamp(i, 36.0) for i in range(30, 34)])
        assert [(e.alert, e.status) for e in events] == [("LampDarkAtNight", "resolved")]
        await asyncio.wait_for(svc.drained("webhook"), 20)
        assert len(receiver.got) == 2
        assert svc.delivered["webhook"] == 1 and svc.waiting == {}
    async with service(tmp_path, receiver, session) as svc:  # and once more: nothing owed
        assert await svc.feed_many([lamp(i, 36.0) for i in range(34, 40)]) == []
        assert await svc.tick(T0 + 40 * STEP) == []
    assert [n["status"] for n in receiver.got] == ["firing", "resolved"]
    firing, resolved = receiver.got
    assert firing["alerts"][0]["fingerprint"] == resolved["alerts"][0]["fingerprint"]
    assert firing["alerts"][0]["startsAt"] == resolved["alerts"][0]["startsAt"] \
        == "2026-05-28T21:36:40.000Z"
    assert firing["alerts"][0]["endsAt"] == ZERO_TIME
    assert resolved["alerts"][0]["endsAt"] == "2026-05-28T23:06:40.000Z"
    assert receiver.refused == 0


async def test_the_payload_is_alertmanagers_webhook_format(
        tmp_path: Path, receiver: Receiver, session: aiohttp.ClientSession) -> None:
    async with service(tmp_path, receiver, session) as svc:
        await svc.feed_many([lamp(i, 36.0) for i in range(14)]
                            + [lamp(i, 0.0) for i in range(14, 17)])
        await receiver.until(lambda: len(receiver.got) == 1)
    n = receiver.got[0]
    assert n["version"] == "4" and n["status"] == "firing" and n["receiver"] == "city-ops"
    assert n["groupKey"] == '{}:{alertname="LampDarkAtNight", node="SL-0042"}'
    assert n["truncatedAlerts"] == 0 and n["externalURL"] == "http://cabinet-7:8470/"
    assert n["groupLabels"] == {"alertname": "LampDarkAtNight", "node": "SL-0042"}
    alert = n["alerts"][0]
    assert alert["labels"] == n["commonLabels"] == {
        "alertname": "LampDarkAtNight", "node": "SL-0042", "severity": "critical",
        "service": "lantern"}
    assert alert["annotations"]["summary"].startswith("SL-0042: dark at 0.1 lx (0.0 W of 36 W")
    assert alert["annotations"] == n["commonAnnotations"]
    assert set(alert) == {"status", "labels", "annotations", "startsAt", "endsAt",
                          "generatorURL", "fingerprint"}


async def test_a_notification_waits_in_the_outbox_through_failures_and_a_crash(
        tmp_path: Path, receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.status = 503
    svc = service(tmp_path, receiver, session)
    await svc.__aenter__()
    try:
        await svc.feed_many([lamp(i, 36.0) for i in range(14)]
                            + [lamp(i, 0.0) for i in range(14, 17)])
        await receiver.until(lambda: receiver.refused >= 3)  # retried with backoff
        assert svc.failed["webhook"] >= 3 and svc.waiting == {"webhook": 1}
    finally:
        # a crash: the tasks die and the connection is dropped, nothing else runs
        for task in svc._tasks:
            task.cancel()
        await asyncio.gather(*svc._tasks, return_exceptions=True)
        svc._pool.shutdown(wait=True)
    receiver.status = 200
    async with service(tmp_path, receiver, session) as again:
        assert again.waiting == {"webhook": 1}
        await receiver.until(lambda: len(receiver.got) == 1)
        assert await again.feed_many([lamp(i, 0.0) for i in range(17, 25)]) == []
    assert [n["status"] for n in receiver.got] == ["firing"]


async def test_notifications_keep_their_order_while_the_target_fails(
        tmp_path: Path, receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.status = 500
    async with service(tmp_path, receiver, session) as svc:
        await svc.feed_many([lamp(i, 36.0) for i in range(14)]
                            + [lamp(i, 0.0) for i in range(14, 17)]
                            + [lamp(i, 36.0) for i in range(17, 20)])
        assert svc.waiting == {"webhook": 2}
        await receiver.until(lambda: receiver.refused >= 2)
        receiver.status = 200
        await receiver.until(lambda: len(receiver.got) == 2)
    assert [n["status"] for n in receiver.got] == ["firing", "resolved"]


async def test_a_redirect_is_not_a_delivery(
        tmp_path: Path, receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.status = 307
    async with service(tmp_path, receiver, session) as svc:
        await svc.feed_many([lamp(i, 36.0) for i in range(14)]
                            + [lamp(i, 0.0) for i in range(14, 17)])
        await receiver.until(lambda: receiver.refused >= 2)
        assert svc.delivered["webhook"] == 0 and svc.waiting == {"webhook": 1}


async def test_state_and_outbox_are_one_transaction(tmp_path: Path) -> None:
    store = HealthStore(tmp_path)
    store.open()
    store.save({"conditions": {"open": []}}, [("webhook", "a"), ("mqtt", "b")])
    with pytest.raises(Exception, match="NOT NULL"):
        store.save({"x": 1}, [("webhook", None)])  # type: ignore[list-item]
    assert store.load() == {"conditions": {"open": []}}  # the failed one left nothing
    assert store.waiting() == {"webhook": 1, "mqtt": 1}
    store.close()
    again = HealthStore(tmp_path)
    again.open()
    assert [p.body for p in again.due("webhook", 0.0)] == ["a"]
    again.close()
