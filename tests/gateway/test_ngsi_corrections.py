"""NGSI-LD: the node's corrections (docs/corrections.md) on the Smart Data Models entities.

Raw stays the model's attribute; `<pm>_corr` is its `humidityCorrected` sub-property with the
method and kappa; `<name>_offset` its `calibrationOffset`. Entities still validate against the
models' schemas (key-values form, tests/helpers/sdm.py) and reach the strict test broker."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from lantern.agent import ngsi
from lantern.agent.sinks.ngsi_ld import NgsiLdSink, NgsiLdSinkConfig
from lantern.tools.street.ngsi_broker import NgsiBroker
from tests.helpers import sdm
from tests.helpers.ngsi import FULL, NODES, T0, batch, records

pytestmark = pytest.mark.ngsi_ld

CORRECTIONS = [("pm1_corr", 2.0, "ug/m3"), ("pm2_5_corr", 9.0, "ug/m3"),
               ("pm4_corr", 10.0, "ug/m3"), ("pm10_corr", 15.0, "ug/m3"),
               ("pm_kappa", 0.25, None), ("temperature_offset", -0.8, "Cel"),
               ("humidity_offset", 3.0, "%RH"), ("LAeq_offset", 1.5, "dB"),
               ("LAmax_offset", 1.5, "dB")]


def _by_type(which: list[tuple[str, float, str | None]]) -> dict[str, dict[str, Any]]:
    return {e["type"]: e for e in ngsi.entities(records(which=which), NODES)}


def test_corrections_are_sub_properties_of_the_raw_attribute() -> None:
    ents = _by_type(FULL + CORRECTIONS)
    aq = ents["AirQualityObserved"]
    assert aq["pm25"]["value"] == 12.5  # raw: the model's attribute, as the node sent it
    corr = aq["pm25"]["humidityCorrected"]
    assert (corr["type"], corr["value"], corr["unitCode"]) == ("Property", 9.0, "GQ")
    assert corr["observedAt"] == aq["pm25"]["observedAt"]
    assert "Crilley et al. 2018" in corr["method"]["value"]
    assert "doi:10.5194/amt-11-709-2018" in corr["method"]["value"]
    assert corr["kappa"]["value"] == 0.25
    assert [aq[n]["humidityCorrected"]["value"] for n in ("pm1", "pm4", "pm10")] == [
        2.0, 10.0, 15.0]
    w = ents["WeatherObserved"]
    assert w["temperature"]["value"] == 21.5  # as sent: the offset is already in it
    assert w["temperature"]["calibrationOffset"] == {
        "type": "Property", "value": -0.8, "observedAt": w["temperature"]["observedAt"],
        "unitCode": "CEL"}
    off = w["relativeHumidity"]["calibrationOffset"]
    assert (off["value"], off["unitCode"]) == (pytest.approx(0.03), "C62")  # 0..1, as the model
    noise = ents["NoiseLevelObserved"]
    assert noise["LAeq"]["calibrationOffset"]["value"] == 1.5
    assert noise["LAmax"]["calibrationOffset"]["unitCode"] == "2N"
    for e in ents.values():  # no attribute the models do not define
        assert not any(k.endswith(("_corr", "_offset", "Corrected", "Offset")) or k == "pm_kappa"
                       for k in e), e["type"]
        assert sdm.errors(e["type"], ngsi.key_values(e)) == [], e["type"]
    assert ngsi.key_values(aq)["pm25"] == 12.5  # a key-values consumer reads the raw value


def test_default_kappa_and_no_corrections() -> None:
    aq = _by_type([*FULL, ("pm2_5_corr", 9.0, "ug/m3")])["AirQualityObserved"]
    assert aq["pm25"]["humidityCorrected"]["kappa"]["value"] == ngsi.KAPPA_DEFAULT
    plain = _by_type(FULL)
    assert not any("humidityCorrected" in a or "calibrationOffset" in a
                   for e in plain.values() for a in e.values() if isinstance(a, dict))


def test_a_correction_without_its_reading_is_counted() -> None:
    skipped: Counter[str] = Counter()
    ents = ngsi.entities(records(which=[("temperature", 21.5, "Cel"),
                                        ("pm2_5_corr", 9.0, "ug/m3")]), NODES, skipped)
    assert skipped == Counter({"unpaired": 1})
    assert [e["type"] for e in ents] == ["WeatherObserved"]  # no AirQualityObserved of its own


async def test_the_strict_broker_takes_them() -> None:
    broker = NgsiBroker()
    url = await broker.start()
    try:
        async with NgsiLdSink(NgsiLdSinkConfig(url=url), NODES) as sink:
            await sink.send(batch(records(t=T0, which=FULL + CORRECTIONS)))
    finally:
        await broker.stop()
    aq = broker.entities["urn:ngsi-ld:AirQualityObserved:lantern:SL-0042"]
    assert aq["pm25"]["humidityCorrected"]["value"] == 9.0
