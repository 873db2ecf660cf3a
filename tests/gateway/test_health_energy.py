"""Energy from power samples, never across a gap; burning hours, day-burn waste, CO2e; and
the Streetlight entity, validated against the official schema with format checking."""

from __future__ import annotations

import pytest

from lantern.agent import ngsi
from lantern.agent.health.monitor import Health
from lantern.agent.health.settings import Lamp, Settings
from lantern.agent.health.streetlight import entity, status
from tests.helpers import sdm

pytestmark = pytest.mark.alerts

T0 = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC
STEP = 300.0


def health(**kw: object) -> Health:
    lamp = Lamp(rating_w=36.0, dim_levels=(0.6,), interval_s=STEP)
    return Health(Settings(default_lamp=lamp, **kw))  # type: ignore[arg-type]


def test_energy_is_the_trapezoid_of_the_samples() -> None:
    h = health()
    for i, w in enumerate([0.0, 36.0, 36.0, 36.0, 21.6, 21.6, 0.0]):
        h.feed("SL-1", T0 + i * STEP, {"lamp_power": w})
    lamp = h.lamps()[0]
    wh = (18 + 36 + 36 + 28.8 + 21.6 + 10.8) * STEP / 3600
    assert lamp.kwh == pytest.approx(wh / 1000)
    assert lamp.burning_h == pytest.approx(5 * STEP / 3600)  # half of each edge interval
    assert lamp.co2e_kg == pytest.approx(wh / 1000 * 281 / 1000)
    assert lamp.unmeasured_h == 0


def test_a_silent_node_is_not_interpolated_across() -> None:
    h = health()
    h.feed("SL-1", T0, {"lamp_power": 36.0})
    h.feed("SL-1", T0 + STEP, {"lamp_power": 36.0})
    h.feed("SL-1", T0 + STEP + 6 * 3600, {"lamp_power": 36.0})  # six hours of nothing
    h.feed("SL-1", T0 + 2 * STEP + 6 * 3600, {"lamp_power": 36.0})
    lamp = h.lamps()[0]
    assert lamp.kwh == pytest.approx(2 * 36 * STEP / 3600 / 1000)
    assert lamp.unmeasured_h == pytest.approx(6.0)


def test_a_gap_up_to_the_limit_is_integrated() -> None:
    h = health()
    h.feed("SL-1", T0, {"lamp_power": 36.0})
    h.feed("SL-1", T0 + 2.5 * STEP, {"lamp_power": 36.0})  # max_gap_intervals
    assert h.lamps()[0].kwh == pytest.approx(36 * 2.5 * STEP / 3600 / 1000)


def test_a_late_backlog_sample_is_counted_not_integrated_twice() -> None:
    h = health()
    for i in range(4):
        h.feed("SL-1", T0 + i * STEP, {"lamp_power": 36.0})
    before = h.lamps()[0].kwh
    h.feed("SL-1", T0 + STEP, {"lamp_power": 36.0})
    assert h.lamps()[0].kwh == before
    assert h.nodes["SL-1"].energy.m.out_of_order == 1


def test_day_burn_waste_counts_burning_in_daylight_only() -> None:
    h = health()
    samples = [(0.3, 50_000.0)] * 3 + [(36.0, 50_000.0)] * 4 + [(36.0, 0.1)] * 3
    for i, (w, lx) in enumerate(samples):
        h.feed("SL-1", T0 + i * STEP, {"lamp_power": w, "illuminance": lx + i})
    lamp = h.lamps()[0]
    # the standby draw by day is not day-burning; the edges count half
    assert lamp.dayburn_kwh == pytest.approx((18 + 36 * 3 + 18) * STEP / 3600 / 1000)


def test_grid_intensity_is_configurable() -> None:
    h = health(grid_g_per_kwh=56.0)
    for i in range(13):
        h.feed("SL-1", T0 + i * STEP, {"lamp_power": 100.0})
    assert h.lamps()[0].co2e_kg == pytest.approx(0.1 * 56 / 1000)


def test_today_is_the_utc_day_of_the_samples() -> None:
    h = health()
    for i in range(60):  # 20:26 to 01:21 the next day
        h.feed("SL-1", T0 + i * STEP, {"lamp_power": 36.0})
    lamp = h.lamps(T0 + 59 * STEP)[0]
    # midnight falls in interval 42 → 43: an interval counts to the day it ends in
    assert lamp.today_kwh == pytest.approx(36 * (59 - 42) * STEP / 3600 / 1000)
    assert h.lamps(T0 + 2 * 86400)[0].today_kwh == 0.0


def lamp_after(samples: list[tuple[float, float]]) -> Health:
    h = health()
    for i, (w, lx) in enumerate(samples):
        h.feed("SL-0042", T0 + i * STEP, {"lamp_power": w, "illuminance": lx * (1 + i / 1e3)})
    return h


META = ngsi.NodeMeta(pole="42", lat=51.2194, lon=4.4025)


@pytest.mark.parametrize(("samples", "power_state", "state"), [
    ([(0.0, 900.0)] * 2 + [(36.0, 0.1)] * 14 + [(0.0, 300.0)] * 2, "off", "ok"),
    ([(0.0, 900.0)] * 2 + [(21.6, 0.1)] * 3, "low", "ok"),
    ([(36.0, 0.1)] * 14 + [(0.0, 0.1)] * 3, "off", "defectiveLamp"),
    ([(36.0, 20_000.0)] * 3, "on", "columnIssue"),
    ([(15.0, 0.1)] * 3, "low", "defectiveLamp"),
])
def test_streetlight_entity_validates_against_the_official_schema(
        samples: list[tuple[float, float]], power_state: str, state: str) -> None:
    h = lamp_after(samples)
    lamp = h.lamps()[0]
    e = entity(lamp, META, T0 + len(samples) * STEP)
    kv = ngsi.key_values(e)
    assert sdm.errors("Streetlight", kv) == []
    assert kv["powerState"] == power_state and kv["status"] == state
    assert kv["id"] == "urn:ngsi-ld:Streetlight:lantern:pole-42"  # the readings' entity
    assert kv["lifetimePowerConsumption"] == pytest.approx(lamp.kwh, abs=1e-4)
    assert e["lifetimePowerConsumption"]["unitCode"] == "KWH"
    if lamp.last_on is not None:
        assert kv["dateLastSwitchingOn"] == ngsi.iso(lamp.last_on)


def test_switching_dates_validate_as_date_time() -> None:
    h = lamp_after([(0.0, 900.0)] * 2 + [(36.0, 0.1)] * 14 + [(0.0, 300.0)] * 2)
    kv = ngsi.key_values(entity(h.lamps()[0], META, T0 + 18 * STEP))
    assert kv["dateLastSwitchingOn"] == "2026-05-28T20:36:40.000Z"
    assert kv["dateLastSwitchingOff"] == "2026-05-28T21:46:40.000Z"
    assert sdm.errors("Streetlight", kv) == []
    assert sdm.errors("Streetlight", {**kv, "dateLastSwitchingOn": "yesterday"}) != []
    assert sdm.errors("Streetlight", {**kv, "status": "dark"}) != []


def test_status_prefers_the_lamp_over_the_column() -> None:
    assert status(["LampDayBurner", "LampCycling"]) == "defectiveLamp"
    assert status(["SensorStuck"]) == "ok"
