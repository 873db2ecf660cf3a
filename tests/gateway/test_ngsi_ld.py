"""NGSI-LD: Smart Data Models entities, validated offline, upserted to a strict test broker."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from lantern.agent import ngsi
from lantern.agent.sinks.http import DeliveryError
from lantern.agent.sinks.ngsi_ld import NgsiLdSink, NgsiLdSinkConfig
from lantern.tools.street.ngsi_broker import NgsiBroker
from tests.helpers import sdm
from tests.helpers.ngsi import NODES, T0, batch, records

pytestmark = pytest.mark.ngsi_ld







def test_every_model_validates_against_its_schema() -> None:
    ents = ngsi.entities(records(), NODES)
    assert sorted(e["type"] for e in ents) == [
        "AirQualityObserved", "Device", "NoiseLevelObserved", "Streetlight", "WeatherObserved"]
    for e in ents:
        assert sdm.errors(e["type"], ngsi.key_values(e)) == [], e["type"]
        assert "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld" in e["@context"]
        for name, attr in e.items():
            if isinstance(attr, dict) and attr.get("type") == "Property":
                assert attr["observedAt"] == "2025-11-28T12:00:00.000Z", name
        assert e["location"]["value"] == {"type": "Point", "coordinates": [4.8952, 52.3702]}


def test_model_conventions_and_units() -> None:
    by_type = {e["type"]: e for e in ngsi.entities(records(), NODES)}
    w = by_type["WeatherObserved"]
    assert w["relativeHumidity"]["value"] == pytest.approx(0.4825)  # 0..1, not %
    assert w["relativeHumidity"]["unitCode"] == "C62"
    assert w["atmosphericPressure"]["value"] == pytest.approx(1013.25)  # hPa
    assert w["atmosphericPressure"]["unitCode"] == "A97"
    assert w["temperature"]["unitCode"] == "CEL"
    aq = by_type["AirQualityObserved"]
    assert aq["pm25"]["value"] == 12.5 and aq["pm25"]["unitCode"] == "GQ"
    assert aq["co2"]["unitCode"] == "59"
    noise = by_type["NoiseLevelObserved"]
    assert noise["LAeq"]["unitCode"] == "2N"
    assert noise["dateObservedFrom"]["value"]["@value"] == "2025-11-28T11:59:00.000Z"
    assert noise["dateObservedTo"]["value"]["@value"] == "2025-11-28T12:00:00.000Z"
    light = by_type["Streetlight"]
    assert light["id"] == "urn:ngsi-ld:Streetlight:lantern:pole-42"
    assert light["powerState"]["value"] == "on"
    assert light["powerConsumption"]["unitCode"] == "WTT"
    dev = by_type["Device"]
    assert dev["id"] == "urn:ngsi-ld:Device:lantern:SL-0042"
    assert "noiseLevel" in dev["controlledProperty"]["value"]
    assert w["refDevice"]["object"] == dev["id"]


def test_backfilled_readings_keep_their_own_time_and_order() -> None:
    old = records(seq=0, t=T0, which=[("temperature", 10.0, "Cel")])
    new = records(seq=1, t=T0 + 60, which=[("temperature", 11.0, "Cel")])
    ents = ngsi.entities(new + old, NODES)  # arrival order does not matter
    assert [e["temperature"]["observedAt"] for e in ents] == [
        "2025-11-28T12:00:00.000Z", "2025-11-28T12:01:00.000Z"]
    rounds = ngsi.rounds(ents)
    assert len(rounds) == 2  # one id twice never shares a request


def test_rounds_respect_the_batch_limit() -> None:
    recs = []
    for n in range(1200):
        recs += records(node=f"N{n:04d}", which=[("temperature", 1.0, "Cel")])
    rounds = ngsi.rounds(ngsi.entities(recs, {}))
    assert [len(r) for r in rounds] == [500, 500, 200]


@pytest.fixture
async def broker() -> NgsiBroker:
    b = NgsiBroker()
    await b.start()
    yield b  # type: ignore[misc]
    await b.stop()


async def test_upsert_reaches_the_broker_with_tenant_and_token(broker: NgsiBroker,
                                                               tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    cfg = NgsiLdSinkConfig(url=broker.url, tenant="amsterdam", token_file=token)
    async with NgsiLdSink(cfg, NODES) as sink:
        await sink.send(batch(records()))
    assert broker.rejected == []
    assert broker.tenants == {"amsterdam"}
    assert len(broker.entities) == 5
    assert broker.entities["urn:ngsi-ld:WeatherObserved:lantern:SL-0042"]["temperature"][
        "value"] == 21.5


async def test_broker_is_strict(broker: NgsiBroker) -> None:
    """The test broker really refuses what a spec-following broker refuses."""
    url = broker.url + "/ngsi-ld/v1/entityOperations/upsert?options=update"
    good = ngsi.entities(records(), NODES)[0]
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=[good]) as r:  # application/json without a Link header
            assert r.status == 415
        too_many = [dict(good, id=f"urn:ngsi-ld:WeatherObserved:x{i}") for i in range(501)]
        async with s.post(url, data=json.dumps(too_many),
                          headers={"Content-Type": "application/ld+json"}) as r:
            assert r.status == 413
        no_ctx = {k: v for k, v in good.items() if k != "@context"}
        async with s.post(url, data=json.dumps([no_ctx]),
                          headers={"Content-Type": "application/ld+json"}) as r:
            assert r.status == 400
    assert len(broker.rejected) == 3 and broker.entities == {}


async def test_207_retries_only_the_failed_entities(broker: NgsiBroker) -> None:
    failing = "urn:ngsi-ld:AirQualityObserved:lantern:SL-0042"
    broker.fail_ids[failing] = 2
    async with NgsiLdSink(NgsiLdSinkConfig(url=broker.url), NODES) as sink:
        await sink.send(batch(records()))
        assert sink.partial_failures == 2
    assert broker.fail_ids[failing] == 0
    assert {i: len(h) for i, h in broker.history.items()} == {
        e["id"]: 1 for e in ngsi.entities(records(), NODES)}
    assert broker.requests == 3  # the full batch, then the failed entity twice


async def test_persistent_207_becomes_a_delivery_error(broker: NgsiBroker) -> None:
    broker.fail_ids["urn:ngsi-ld:Device:lantern:SL-0042"] = 100
    cfg = NgsiLdSinkConfig(url=broker.url, partial_retries=2)
    async with NgsiLdSink(cfg, NODES) as sink:
        with pytest.raises(DeliveryError, match="keeps refusing 1 entities"):
            await sink.send(batch(records()))


async def test_unavailable_broker_says_retry_after(broker: NgsiBroker) -> None:
    broker.down = True
    async with NgsiLdSink(NgsiLdSinkConfig(url=broker.url), NODES) as sink:
        with pytest.raises(DeliveryError) as e:
            await sink.send(batch(records()))
    assert e.value.retry_after == 1.0
