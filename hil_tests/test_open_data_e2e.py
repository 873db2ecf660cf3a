"""MicroPython nodes → gateway process → open-data upstreams (SensorThings, Sensor.Community)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from lantern.agent.ngsi import split_name
from lantern.agent.sinks.sensor_community import UNFIT, VALUES
from lantern.agent.sinks.session import frame, quality_flags
from lantern.tools.street.sc_receiver import ScReceiver
from lantern.tools.street.sta_server import StaServer

from .harness.topology import Topology

NODES = '''
[nodes."SL-0001"]
pole = "1"
location = [52.3702, 4.8952]
interval_s = 0.2

[nodes."SL-0002"]
pole = "2"
location = [52.3710, 4.8960]
interval_s = 0.2
'''


def _observable(topology: Topology) -> set[str]:
    """Reading ids of every number a node sent (flags ride along in parameters)."""
    return {rid for rid, r in topology.upstream.readings.items()
            if isinstance(r.get("v"), int | float) and not isinstance(r["v"], bool)
            and not r["n"].endswith(".q")}


@pytest.mark.sensorthings
async def test_sensorthings_down_then_up_and_a_killed_gateway(topology: Topology,
                                                              tmp_path: Path) -> None:
    server = StaServer(down=True)
    await server.start()
    try:
        topology.sample_limit = 8
        topology.gateway_extra = f'[sinks.sensorthings]\nurl = "{server.url}/v1.1"\n' + NODES
        await topology.start()
        await topology.wait_for(lambda: len(topology.upstream.readings) >= 20, 40,
                                "HTTP delivers while the SensorThings server is down")
        assert server.sets["Observations"] == {}
        server.down = False
        await topology.wait_for(lambda: len(server.sets["Observations"]) > 0, 30,
                                "Observations once the server is back")
        topology.kill_gateway(signal.SIGKILL)  # mid-stream: its id cache dies with it
        topology.start_gateway()
        done = lambda: all(  # noqa: E731
            len(topology.sampled(n)) == 8 and not topology.outbox(n) for n in topology.nodes)
        await topology.wait_for(done, 60, "every pack sampled and acknowledged")
        total = sum(sum(topology.sampled(n).values()) for n in topology.nodes)
        await topology.wait_for(lambda: len(topology.upstream.readings) == total, 20,
                                "every reading on HTTP")
        want = _observable(topology)
        got = lambda: [o["props"]["parameters"]["lantern_id"]  # noqa: E731
                       for o in server.sets["Observations"].values()]
        await topology.wait_for(lambda: set(got()) == want, 40,
                                "every number as an Observation")
        assert server.rejected == []
        streams = {(d["Thing@iot.id"], d["name"]) for d in server.all("Datastreams")}
        measured = {split_name(topology.upstream.readings[rid]["n"]) for rid in want}
        # one Datastream per node and measurement: none duplicated by the restart
        assert len(server.all("Datastreams")) == len(streams) == len(measured)
        assert {d["name"] for d in server.all("Datastreams")} == {f"{n} {m}" for n, m in measured}
        assert len(server.all("Things")) == 2 and len(server.all("Sensors")) == len(
            {s["name"] for s in server.all("Sensors")})
        topology.kill_gateway(signal.SIGTERM)
        assert topology.gateway and topology.gateway.returncode == 0
    finally:
        await server.stop()


@pytest.mark.sensor_community
async def test_sensor_community_gets_their_documented_requests(topology: Topology) -> None:
    receiver = ScReceiver(registered={"esp32-1001": {1, 11, 15}, "esp32-1002": {1, 11, 15}})
    await receiver.start()
    try:
        topology.sample_limit = 4
        topology.gateway_extra = (
            f'[sinks.sensor_community]\nurl = "{receiver.url}"\n'
            'measurements = ["pm10", "pm2_5", "temperature", "humidity", "pressure", "LAeq"]\n'
            'sensors = { "SL-0001" = "esp32-1001", "SL-0002" = "esp32-1002" }\n' + NODES)
        await topology.start()
        done = lambda: all(  # noqa: E731
            len(topology.sampled(n)) == 4 and not topology.outbox(n) for n in topology.nodes)
        await topology.wait_for(done, 40, "every pack sampled and acknowledged")
        total = sum(sum(topology.sampled(n).values()) for n in topology.nodes)
        await topology.wait_for(lambda: len(topology.upstream.readings) == total, 20,
                                "every reading on HTTP")
        chosen = {"pm10", "pm2_5", "temperature", "humidity", "pressure", "LAeq"}
        readings = topology.upstream.readings.values()
        flags = quality_flags(list(readings))  # e.g. a fan still warming up
        sent = {split_name(r["n"]) for r in readings
                if not flags.get((r["n"], frame(r["id"])), 0) & UNFIT}
        want = {(f"esp32-100{n[-1]}", VALUES[m][0]) for n, m in sent if m in chosen}
        assert want, "no unflagged reading to publish"
        await topology.wait_for(lambda: {(s, p) for s, p, _ in receiver.accepted} == want, 20,
                                "one push per sensor and pin")
        assert receiver.rejected == []  # documented form, and never inside their interval
        assert len(receiver.accepted) == len(want)  # the rate limit: once per 145 s
        for _, pin, values in receiver.accepted:
            assert set(values) <= {VALUES[m][1] for m in chosen if VALUES[m][0] == pin}
            if "pressure" in values:
                assert 80_000 < float(values["pressure"]) < 110_000  # Pa, not hPa
    finally:
        await receiver.stop()
