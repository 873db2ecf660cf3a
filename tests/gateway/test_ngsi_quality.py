"""Quality flags upstream: `<name>.q` and `time.q` (docs/measurements.md, docs/protocol.md).

NGSI-LD: a reading's flags are the `qualityFlags` sub-property of its attribute, a pack's
time flags the `timeQuality` sub-property of everything observed at the pack's time (ETSI GS
CIM 009: a Property of a Property). MQTT and SenML over HTTP carry the flag records as sent."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2
import pytest

from lantern.agent import ngsi
from lantern.agent.queue.resolve import PACK, Batch, resolve
from lantern.agent.sinks.http import HttpSink, HttpSinkConfig
from lantern.agent.sinks.mqtt import MqttSink, MqttSinkConfig
from lantern.agent.sinks.ngsi_ld import NgsiLdSink, NgsiLdSinkConfig
from lantern.tools.street.ngsi_broker import NgsiBroker
from lantern.tools.street.upstream import Upstream
from tests.helpers import sdm
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.ngsi import FULL, NODES, T0, records

pytestmark = pytest.mark.ngsi_ld

FLAGS: list[tuple[str, float, str | None]] = [
    ("pm2_5.q", 1, None), ("temperature.q", 8 | 16, None), ("lamp_power.q", 2, None),
    ("uptime.q", 1 << 12, None)]  # bit 12: one this gateway has no name for
# what a Property may hold besides its sub-attributes (ETSI GS CIM 009 4.5.2, 5.2.5)
RESERVED = {"type", "value", "observedAt", "unitCode", "datasetId", "createdAt", "modifiedAt"}


def _by_type(recs: list[dict[str, Any]], skipped: Counter[str] | None = None
             ) -> dict[str, dict[str, Any]]:
    return {e["type"]: e for e in ngsi.entities(recs, NODES, skipped)}


def _sub_attributes_conform(a: dict[str, Any], where: str) -> None:
    """NGSI-LD normalized form, all the way down: every member that is not one of a
    Property's own is a Property (with a value) or a Relationship (with an object)."""
    assert a["type"] in ("Property", "GeoProperty", "Relationship"), where
    assert ("object" if a["type"] == "Relationship" else "value") in a, where
    for k, v in a.items():
        if k not in RESERVED and k != "object":
            assert isinstance(v, dict), f"{where}.{k}"
            _sub_attributes_conform(v, f"{where}.{k}")


def test_a_readings_flags_are_a_sub_property_of_its_attribute() -> None:
    skipped: Counter[str] = Counter()
    ents = _by_type(records(which=FULL + FLAGS), skipped)
    assert not skipped
    aq = ents["AirQualityObserved"]
    flags = aq["pm25"]["qualityFlags"]
    assert flags == {"type": "Property", "value": ["warmup"],
                     "observedAt": aq["pm25"]["observedAt"],
                     "bits": {"type": "Property", "value": 1,
                              "observedAt": aq["pm25"]["observedAt"]}}
    assert aq["pm25"]["value"] == 12.5  # the value as sent, flagged, not changed
    assert "qualityFlags" not in aq["pm10"]  # only the flagged reading
    w = ents["WeatherObserved"]
    assert w["temperature"]["qualityFlags"]["value"] == ["stuck", "crc"]
    assert w["temperature"]["qualityFlags"]["bits"]["value"] == 24
    assert not any("qualityFlags" in w[a] for a in ("relativeHumidity", "atmosphericPressure"))
    lamp = ents["Streetlight"]  # derived from the flagged power reading: flagged with it
    assert lamp["powerConsumption"]["qualityFlags"]["value"] == ["range"]
    assert lamp["powerState"]["qualityFlags"]["value"] == ["range"]
    device = ents["Device"]  # an unnamed bit: no name, kept in the bits
    assert device["uptime"]["qualityFlags"]["value"] == []
    assert device["uptime"]["qualityFlags"]["bits"]["value"] == 4096
    for e in ents.values():
        assert not any(k.endswith(".q") or k in ("qualityFlags", "timeQuality") for k in e)
        for k, a in e.items():
            if k not in ("id", "type", "@context"):
                _sub_attributes_conform(a, f"{e['type']}.{k}")
        assert sdm.errors(e["type"], ngsi.key_values(e)) == [], e["type"]
    assert ngsi.key_values(aq)["pm25"] == 12.5


def test_battery_saving_flag_on_the_device() -> None:
    recs = records(which=[("battery", 3.31, "V"), ("battery.q", 512, None)])
    battery = _by_type(recs)["Device"]["batteryVoltage"]
    assert battery["qualityFlags"]["value"] == ["saving"]


@pytest.mark.parametrize(("bits", "names"), [(1, ["relative"]), (2, ["before"]),
                                             (3, ["relative", "before"]),
                                             (1 | 4, ["relative", "gateway"])])
def test_a_flagged_packs_time_is_said_on_every_attribute(bits: int, names: list[str]) -> None:
    recs = records(which=[("time.q", bits, None), *FULL])
    ents = ngsi.entities(recs, NODES, firmware={"SL-0042": "1.4.0"}, now=T0 + 3600)
    assert {e["type"] for e in ents} == {"AirQualityObserved", "WeatherObserved",
                                         "NoiseLevelObserved", "Streetlight", "Device"}
    stamp = ngsi.iso(T0)
    for e in ents:
        timed = {k for k, a in e.items() if isinstance(a, dict) and "observedAt" in a}
        assert {k for k, a in e.items() if isinstance(a, dict) and "timeQuality" in a} == {
            k for k in timed if e[k]["observedAt"] == stamp}, e["type"]
        for k in timed - {"firmwareVersion"}:
            assert e[k]["timeQuality"]["value"] == names, (e["type"], k)
            assert e[k]["timeQuality"]["bits"]["value"] == bits
        assert "timeQuality" not in e.get("firmwareVersion", {})  # the gateway's, at `now`
        assert not any("timeQuality" in e.get(k, {}) for k in ("refDevice", "location"))
        assert sdm.errors(e["type"], ngsi.key_values(e)) == [], e["type"]
    dates = [e["dateObserved"] for e in ents if "dateObserved" in e]
    assert dates and all(d["timeQuality"]["value"] == names for d in dates)


def test_flags_belong_to_their_own_pack() -> None:
    """Two packs sealed in the same second share a time, never a frame: one's flags stay its
    own, and a pack with flagged time never merges into an entity with an exact one."""
    exact = records(seq=1, which=[("pm2_5", 12.5, "ug/m3"), ("pm10", 20.0, "ug/m3")])
    flagged = records(seq=2, which=[("time.q", 2, None), ("pm2_5", 14.0, "ug/m3"),
                                    ("pm2_5.q", 1, None)])
    ents = ngsi.entities(exact + flagged, NODES)
    aq = [e for e in ents if e["type"] == "AirQualityObserved"]
    assert len(aq) == 2
    plain, held = sorted(aq, key=lambda e: "timeQuality" in e["pm25"])
    assert (plain["pm25"]["value"], held["pm25"]["value"]) == (12.5, 14.0)
    assert "qualityFlags" not in plain["pm25"] and "timeQuality" not in plain["dateObserved"]
    assert held["pm25"]["qualityFlags"]["value"] == ["warmup"]
    assert held["dateObserved"]["timeQuality"]["value"] == ["before"]
    assert "pm10" not in held
    assert [len(r) for r in ngsi.rounds(ents)] == [1, 1]  # one entity id once per request


def test_flags_without_their_reading_are_counted() -> None:
    skipped: Counter[str] = Counter()
    recs = records(which=[("temperature", 21.5, "Cel"),
                          ("pm2_5.q", 128 | 32, None),  # failed + nack: no value sent
                          ("co2.q", 256 | 128 | 64, None),  # absent
                          ("no2.q", 1, None),  # a measurement no model has: silent, as no2
                          ("humidity.q", -1, None), ("pressure.q", 1.5, None)])
    ents = ngsi.entities(recs, NODES, skipped)
    assert skipped == Counter({"unpaired": 2, "flag": 2})
    assert [e["type"] for e in ents] == ["WeatherObserved"]
    assert "qualityFlags" not in ents[0]["temperature"]
    time_request = records(which=[("time.q", 1, None)])  # a pack with no reading
    counted: Counter[str] = Counter()
    assert ngsi.entities(time_request, NODES, counted) == [] and not counted


async def test_the_strict_broker_takes_flagged_entities() -> None:
    broker = NgsiBroker()
    url = await broker.start()
    try:
        async with NgsiLdSink(NgsiLdSinkConfig(url=url), NODES) as sink:
            await sink.send(_batch(records(which=[("time.q", 1 | 4, None), *FULL, *FLAGS])))
    finally:
        await broker.stop()
    assert broker.rejected == []
    aq = broker.entities["urn:ngsi-ld:AirQualityObserved:lantern:SL-0042"]
    assert aq["pm25"]["qualityFlags"]["value"] == ["warmup"]
    assert aq["pm25"]["timeQuality"]["value"] == ["relative", "gateway"]


def _batch(recs: list[dict[str, Any]]) -> Batch:
    return Batch(1, 1, T0, [str(r["id"]) for r in recs], [json.dumps(r) for r in recs])


# a pack as a node seals it (no base name, no units: the gateway adds both), with a time
# flag and a reading's flag, resolved by the gateway's own code
PACKED = cbor2.dumps([{0: "time.q", 2: 2, -3: T0}, {0: "pm2_5", 2: 15},
                      {0: "pm2_5.q", 2: 1}, {0: "temperature", 2: 21.5},
                      {0: "temperature.q", 2: 8}])


@pytest.mark.mqtt
async def test_mqtt_and_senml_http_carry_the_flag_records_as_sent(tmp_path: Path) -> None:
    recs, text = resolve("SL-0042", 7, PACK, PACKED)
    assert [r["n"].rpartition(":")[2] for r in recs] == [
        "time.q", "pm2_5", "pm2_5.q", "temperature", "temperature.q"]
    batch = Batch(1, 1, T0, [r["id"] for r in recs], [text])
    upstream = Upstream()
    await upstream.start()
    try:
        async with HttpSink(HttpSinkConfig(url=upstream.url, timeout_s=5)) as sink:
            await sink.send(batch)
    finally:
        await upstream.stop()
    sent = [upstream.readings[r["id"]] for r in recs]
    assert [r for r in sent if r["n"].endswith(".q")] == [recs[0], recs[2], recs[4]]
    assert [{k: v for k, v in r.items() if k != "bver"} for r in sent] == recs  # (RFC 8798)
    assert upstream.readings["SL-0042:7:2"] == {"n": "urn:dev:lantern:SL-0042:pm2_5.q",
                                                "t": T0, "v": 1, "id": "SL-0042:7:2"}

    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        got: dict[str, Any] = {}
        done = asyncio.Event()
        subscribed = asyncio.Event()

        async def subscribe() -> None:
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="q-sub") as c:
                await c.subscribe("lantern/#", qos=1)
                subscribed.set()
                async for m in c.messages:
                    assert isinstance(m.payload, bytes)
                    got[str(m.topic)] = json.loads(m.payload)
                    if len(got) == len(recs):
                        done.set()
                        return

        task = asyncio.create_task(subscribe())
        await asyncio.wait_for(subscribed.wait(), 10)
        async with MqttSink(MqttSinkConfig(host="127.0.0.1", port=broker.port)) as mqtt:
            await mqtt.send(batch)
        await asyncio.wait_for(done.wait(), 10)
        await task
    finally:
        broker.stop()
    assert got["lantern/SL-0042/pm2_5.q"] == [recs[2]]
    assert got["lantern/SL-0042/time.q"] == [recs[0]]
    assert got["lantern/SL-0042/temperature.q"] == [recs[4]]

    ents = ngsi.entities(batch.records(), NODES)  # the same batch in NGSI-LD
    aq = next(e for e in ents if e["type"] == "AirQualityObserved")
    assert aq["pm25"]["qualityFlags"]["value"] == ["warmup"]
    assert aq["pm25"]["timeQuality"]["value"] == ["before"]
