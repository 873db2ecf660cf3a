"""Alerts published to an MQTT topic through a real mosquitto: the same Alertmanager JSON,
each raise and clear once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from lantern.agent.health.notify import Mqtt
from lantern.agent.health.service import HealthService
from lantern.agent.health.settings import Lamp, Settings
from tests.helpers.mosquitto import Mosquitto

pytestmark = [pytest.mark.alerts, pytest.mark.mqtt]

T0 = 1_780_000_000.0
STEP = 300.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "mosquitto")
    m.start()
    yield m
    m.stop()


def lamp(i: int, w: float) -> tuple[str, float, dict[str, Any]]:
    return ("SL-0017", T0 + i * STEP, {"lamp_power": w, "illuminance": 40_000.0 + i})


async def test_alerts_reach_an_mqtt_topic_once_each(tmp_path: Path, broker: Mosquitto) -> None:
    got: list[dict[str, Any]] = []
    two = asyncio.Event()
    ready = asyncio.Event()

    async def subscribe() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="ops") as c:
            await c.subscribe("city/alerts", qos=1)
            ready.set()
            async for m in c.messages:
                assert isinstance(m.payload, bytes)
                got.append(json.loads(m.payload))
                if len(got) == 2:
                    two.set()

    sub = asyncio.create_task(subscribe())
    await asyncio.wait_for(ready.wait(), 10)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="gw") as client:

        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1)

        settings = Settings(default_lamp=Lamp(interval_s=STEP))
        async with HealthService(settings, tmp_path, [Mqtt(publish, "city/alerts")]) as svc:
            await svc.feed_many([lamp(i, 36.0) for i in range(4)]
                                + [lamp(i, 0.3) for i in range(4, 8)])
            await asyncio.wait_for(two.wait(), 10)
            await asyncio.wait_for(svc.drained("mqtt"), 10)
    sub.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
        await sub
    assert [(n["status"], n["alerts"][0]["labels"]["alertname"]) for n in got] == [
        ("firing", "LampDayBurner"), ("resolved", "LampDayBurner")]
    assert got[0]["version"] == "4"
