"""Sensor and node health: stuck values, values the world does not allow, sensors the drivers
report failed, battery low, outbox growing, silence; each raised once, cleared once."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lantern.agent.health.alerts import Event
from lantern.agent.health.monitor import Health
from lantern.agent.health.settings import Lamp, Settings

pytestmark = pytest.mark.alerts

T0 = 1_780_000_000.0
STEP = 300.0


def health(**kw: Any) -> Health:
    return Health(Settings(default_lamp=Lamp(interval_s=STEP), **kw))


def feed(h: Health, packs: list[dict[str, Any]], start: int = 0,
         node: str = "SL-7") -> list[Event]:
    events: list[Event] = []
    for i, p in enumerate(packs, start):
        events += h.feed(node, T0 + i * STEP, p)
    return events


def noisy(i: int) -> dict[str, Any]:
    """A healthy pack: every value moves a little, as a live sensor's does."""
    return {"temperature": round(14 + 0.03 * math.sin(i), 2),
            "humidity": round(70 + 0.2 * math.cos(i), 2), "pressure": 101000 + i % 3,
            "illuminance": 0.1, "battery": round(3.9 + 0.002 * (i % 4), 3), "outbox": 0}


def keys(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.alert, e.subject, e.status) for e in events]


def test_a_healthy_day_of_noisy_values_raises_nothing() -> None:
    h = health()
    assert feed(h, [noisy(i) for i in range(288)]) == []


def test_a_flat_line_is_stuck_after_the_run_its_noise_allows() -> None:
    h = health()
    packs = [noisy(i) for i in range(5)] + [{**noisy(4), "illuminance": 0.1}] * 14
    events = feed(h, packs)
    assert keys(events) == [("SensorStuck", n, "firing")
                            for n in ("temperature", "humidity", "pressure", "battery")]
    assert events[0].at == T0 + (4 + 11) * STEP  # the 12th identical value
    # a dark sky is flat for real: illuminance under its floor is never stuck
    events = feed(h, [noisy(i) for i in range(20, 23)], start=19)
    assert sorted(keys(events)) == sorted(
        ("SensorStuck", n, "resolved") for n in ("temperature", "humidity", "pressure",
                                                 "battery"))


def test_the_nodes_stuck_flag_raises_at_once_and_a_new_value_clears() -> None:
    h = health()
    events = feed(h, [{**noisy(1), "co2": 512, "co2.q": 8}])
    assert keys(events) == [("SensorStuck", "co2", "firing")]
    assert keys(feed(h, [{**noisy(2), "co2": 515}], start=1)) == [
        ("SensorStuck", "co2", "resolved")]


def test_saturated_air_is_not_a_stuck_humidity_sensor() -> None:
    h = health()
    assert feed(h, [{**noisy(i), "humidity": 100.0} for i in range(30)]) == []


def test_out_of_physical_range_needs_three_samples() -> None:
    h = health()
    assert feed(h, [{**noisy(0), "temperature": 85.0}, noisy(1),
                    {**noisy(2), "temperature": 85.0}, noisy(3)]) == []
    events = feed(h, [{**noisy(i), "co2": 120 + i} for i in range(4, 8)], start=4)
    assert keys(events) == [("SensorOutOfRange", "co2", "firing")]
    events = feed(h, [{**noisy(i), "co2": 420 + i} for i in range(8, 12)], start=8)
    assert keys(events) == [("SensorOutOfRange", "co2", "resolved")]


def test_a_sensor_not_answering_from_the_drivers_flags() -> None:
    h = health()
    failed = {k: v for k, v in noisy(0).items() if k not in ("pressure",)}
    events = feed(h, [{**failed, "pressure.q": 160}] * 2)  # failed + nack, twice
    assert events == []
    events = feed(h, [{**failed, "pressure.q": 416}], start=2)  # absent: at once
    assert keys(events) == [("SensorNotAnswering", "pressure", "firing")]
    assert feed(h, [{**failed, "pressure.q": 416}] * 5, start=3) == []
    events = feed(h, [{**noisy(9), "pressure.q": 1}], start=9)  # back, warming up
    assert keys(events) == [("SensorNotAnswering", "pressure", "resolved")]


def test_a_sensor_not_due_this_interval_says_nothing() -> None:
    h = health()
    events = feed(h, [{**noisy(0), "pm2_5.q": 416}] + [noisy(i) for i in range(1, 10)])
    assert keys(events) == [("SensorNotAnswering", "pm2_5", "firing")]  # (and stays open)
    assert h.conditions.is_open("SensorNotAnswering", "SL-7", "pm2_5")


def test_battery_low_with_hysteresis_and_from_the_saving_flag() -> None:
    h = health()
    low = [{**noisy(i), "battery": 3.49 - 0.001 * i} for i in range(3)]
    events = feed(h, low)
    assert keys(events) == [("NodeBatteryLow", "", "firing")]
    assert feed(h, [{**noisy(i), "battery": 3.52 + 0.001 * i} for i in range(3, 9)],
                start=3) == []  # within the hysteresis: still low
    events = feed(h, [{**noisy(i), "battery": 3.6 + 0.001 * i} for i in range(9, 12)], start=9)
    assert keys(events) == [("NodeBatteryLow", "", "resolved")]
    events = feed(h, [{**noisy(i), "battery.q": 512} for i in range(12, 15)], start=12)
    assert keys(events) == [("NodeBatteryLow", "", "firing")]


def test_outbox_growing() -> None:
    h = health()
    events = feed(h, [{**noisy(i), "outbox": 4 * i} for i in range(6)])
    assert keys(events) == [("NodeOutboxGrowing", "", "firing")]
    assert events[0].at == T0 + 5 * STEP  # 12, 16, 20: three at or above outbox_high
    events = feed(h, [{**noisy(i), "outbox": 1} for i in range(6, 9)], start=6)
    assert keys(events) == [("NodeOutboxGrowing", "", "resolved")]


def test_silence_after_n_intervals_cleared_by_the_next_pack() -> None:
    h = health()
    feed(h, [noisy(0)])
    assert h.tick(T0 + 3 * STEP) == []
    events = h.tick(T0 + 3 * STEP + 1)
    assert keys(events) == [("NodeSilent", "", "firing")]
    assert h.tick(T0 + 10 * STEP) == []  # raised once
    events = feed(h, [noisy(11)], start=11)
    assert keys(events) == [("NodeSilent", "", "resolved")]
    assert h.conditions.raised["NodeSilent"] == 1 == h.conditions.cleared["NodeSilent"]


def test_a_saving_node_may_be_quiet_for_longer() -> None:
    h = health()
    feed(h, [{**noisy(0), "battery.q": 512}])
    assert h.tick(T0 + 6 * 3 * STEP) == [], "a node saving its cell stretches its interval"
    assert keys(h.tick(T0 + 6 * 3 * STEP + 1)) == [("NodeSilent", "", "firing")]


def test_a_backlog_arriving_late_is_integrated_but_judges_nothing_twice() -> None:
    h = health()
    feed(h, [noisy(i) for i in range(5)])
    assert feed(h, [{**noisy(2), "temperature": 99.0}] * 5, start=2) == []  # older than seen


@pytest.mark.parametrize("bad", [None, "x", [], 3])
def test_bad_input_is_counted_and_survived(bad: Any) -> None:
    h = health()
    assert h.feed("SL-1", T0, bad) == []
    assert h.feed("SL-1", float("nan"), {"temperature": 1.0}) == []
    assert h.ignored == 2
    assert h.feed("SL-1", T0, {"temperature": "warm", "lamp_power": None, "x.q": "y"}) == []
