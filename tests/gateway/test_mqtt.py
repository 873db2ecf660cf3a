"""MQTT sink against a real mosquitto: QoS 1, persistent session, reconnects, payload forms."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import cbor2
import pytest

from lantern.agent.sinks.http import DeliveryError
from lantern.agent.sinks.mqtt import MqttSink, MqttSinkConfig
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.ngsi import batch, records

pytestmark = pytest.mark.mqtt


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "mosquitto")
    m.start()
    yield m
    m.stop()


class Subscriber:
    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[aiomqtt.Message] = []
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="test-sub") as c:
            await c.subscribe("lantern/#", qos=1)
            self.ready.set()
            async for m in c.messages:
                self.messages.append(m)

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        # the broker may have died under us: that ends the subscription, not the test
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task

    async def wait_for(self, n: int, timeout: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.messages) < n:
            assert asyncio.get_running_loop().time() < deadline, f"{len(self.messages)} of {n}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def subscriber(broker: Mosquitto) -> AsyncIterator[Subscriber]:
    async with Subscriber(broker.port) as s:
        yield s


async def test_senml_json_per_reading_on_its_topic(broker: Mosquitto,
                                                   subscriber: Subscriber) -> None:
    recs = records()
    async with MqttSink(MqttSinkConfig(host="127.0.0.1", port=broker.port)) as sink:
        await sink.send(batch(recs))
    await subscriber.wait_for(len(recs))
    got = {str(m.topic): json.loads(m.payload) for m in subscriber.messages}  # type: ignore[arg-type]
    assert got["lantern/SL-0042/temperature"] == [recs[0]]
    assert all(m.qos == 1 for m in subscriber.messages)
    assert len(got) == len(recs)


async def test_senml_cbor_payload_and_topic_template(broker: Mosquitto,
                                                     subscriber: Subscriber) -> None:
    recs = records()
    cfg = MqttSinkConfig(host="127.0.0.1", port=broker.port, payload="senml+cbor",
                         topic="lantern/city/{measurement}/{node}")
    async with MqttSink(cfg) as sink:
        await sink.send(batch(recs))
    await subscriber.wait_for(len(recs))
    m = next(m for m in subscriber.messages if str(m.topic) == "lantern/city/humidity/SL-0042")
    pack = cbor2.loads(m.payload)  # type: ignore[arg-type]
    assert pack == [{0: "urn:dev:lantern:SL-0042:humidity", 1: "%RH", 2: 48.25, 6: 1764331200,
                     "id": "SL-0042:0:1"}]


async def test_broker_down_is_a_delivery_error_then_reconnects(tmp_path: Path) -> None:
    m = Mosquitto(tmp_path / "mq")
    cfg = MqttSinkConfig(host="127.0.0.1", port=m.port, timeout_s=2)
    async with MqttSink(cfg) as sink:
        with pytest.raises(DeliveryError, match="MQTT connect"):
            await sink.send(batch(records()))
        m.start()
        try:
            async with Subscriber(m.port) as sub:
                await sink.send(batch(records()))
                await sub.wait_for(len(records()))
                m.stop()  # the broker dies under a connected sink
                with pytest.raises(DeliveryError):
                    await sink.send(batch(records()))
                m.start()
            async with Subscriber(m.port) as sub:
                await sink.send(batch(records(seq=1)))
                await sub.wait_for(len(records()))
            assert sink.connects == 2
        finally:
            m.stop()


async def test_tls_and_credentials(tmp_path: Path) -> None:
    m = Mosquitto(tmp_path / "tls", tls_user=("lantern", "pa55word"))
    m.start()
    try:
        pw = tmp_path / "mqtt.password"
        pw.write_text("pa55word\n")
        pw.chmod(0o600)
        ok = MqttSinkConfig(host="127.0.0.1", port=m.port, tls=True, ca_file=m.ca,
                            username="lantern", password_file=pw, timeout_s=5)
        async with MqttSink(ok) as sink:
            await sink.send(batch(records()))
        wrong = tmp_path / "wrong.password"
        wrong.write_text("nope\n")
        bad = MqttSinkConfig(host="127.0.0.1", port=m.port, tls=True, ca_file=m.ca,
                             username="lantern", password_file=wrong, timeout_s=5)
        async with MqttSink(bad) as sink:
            with pytest.raises(DeliveryError):
                await sink.send(batch(records()))
        no_tls = MqttSinkConfig(host="127.0.0.1", port=m.port, username="lantern",
                                password_file=pw, timeout_s=2)
        async with MqttSink(no_tls) as sink:
            with pytest.raises(DeliveryError):
                await sink.send(batch(records()))
    finally:
        m.stop()
