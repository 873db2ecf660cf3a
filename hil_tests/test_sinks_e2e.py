"""Nodes on MicroPython → gateway → HTTP, NGSI-LD and MQTT at once; a dead sink blocks none."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path

import aiomqtt
import pytest

from lantern.agent import ngsi
from lantern.tools.street.ngsi_broker import NgsiBroker
from tests.helpers import sdm
from tests.helpers.mosquitto import Mosquitto

from .harness.delivery import check_delivery
from .harness.topology import Topology

pytestmark = [pytest.mark.ngsi_ld, pytest.mark.mqtt]


async def test_three_sinks_one_down_for_a_while(topology: Topology, tmp_path: Path) -> None:
    mq = Mosquitto(tmp_path / "mosquitto")
    mq.start()
    broker = NgsiBroker(down=True)
    await broker.start()
    received: list[aiomqtt.Message] = []

    async def subscribe() -> None:
        async with aiomqtt.Client("127.0.0.1", mq.port, identifier="city") as c:
            await c.subscribe("lantern/#", qos=1)
            async for m in c.messages:
                received.append(m)

    sub = asyncio.create_task(subscribe())
    try:
        topology.sample_limit = 8
        topology.gateway_extra = f'''
[sinks.ngsi_ld]
url = "{broker.url}"
tenant = "lantern-test"

[sinks.mqtt]
host = "127.0.0.1"
port = {mq.port}
client_id = "gw-under-test"

[nodes."SL-0001"]
pole = "1"
location = [52.3702, 4.8952]
interval_s = 0.2

[nodes."SL-0002"]
pole = "2"
location = [52.3710, 4.8960]
interval_s = 0.2
'''
        await topology.start()
        total = lambda: sum(sum(topology.sampled(n).values()) for n in topology.nodes)  # noqa: E731
        await topology.wait_for(
            lambda: all(len(topology.sampled(n)) == 8 and not topology.outbox(n)
                        for n in topology.nodes) and len(topology.upstream.readings) == total(),
            40, "HTTP and MQTT deliver while the NGSI-LD broker is down")
        await topology.wait_for(lambda: len(received) >= total(), 20, "every reading on MQTT")
        check_delivery(topology)
        assert broker.entities == {}
        ids = {json.loads(m.payload)[0]["id"] for m in received}  # type: ignore[arg-type]
        assert ids == set(topology.upstream.readings)

        broker.down = False
        await topology.wait_for(lambda: len(broker.entities) >= 2 * 2, 30,
                                "NGSI-LD catches up once the broker is back")
        assert broker.rejected == [] and broker.tenants == {"lantern-test"}
        for e in broker.entities.values():
            assert sdm.errors(e["type"], ngsi.key_values(e)) == [], e["id"]
        w = broker.entities["urn:ngsi-ld:WeatherObserved:lantern:SL-0001"]
        assert w["location"]["value"]["coordinates"] == [4.8952, 52.3702]
        assert 0 < w["relativeHumidity"]["value"] < 1
        topology.kill_gateway(signal.SIGTERM)
        assert topology.gateway and topology.gateway.returncode == 0
    finally:
        sub.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await sub
        await broker.stop()
        mq.stop()
