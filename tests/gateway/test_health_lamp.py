"""Lamp state from power against the rating, switching dates, and the lamp faults: each raised
once after several samples (never on one), cleared once, counted."""

from __future__ import annotations

import pytest

from lantern.agent.health.alerts import Event
from lantern.agent.health.monitor import Health
from lantern.agent.health.settings import Lamp, Settings

pytestmark = pytest.mark.alerts

T0 = 1_780_000_000.0
STEP = 300.0
NIGHT, DAY = 0.1, 40_000.0


def health(**kw: object) -> Health:
    lamp = Lamp(rating_w=36.0, dim_levels=(0.6,), interval_s=STEP)
    return Health(Settings(default_lamp=lamp, **kw))  # type: ignore[arg-type]


def run(h: Health, samples: list[tuple[float, float]], node: str = "SL-0042",
        start: int = 0) -> list[Event]:
    """(power W, lux) per interval from interval `start` (the lux with a sensor's noise)."""
    events: list[Event] = []
    for i, (w, lx) in enumerate(samples, start):
        lux = lx * (1 + 0.001 * (i % 7))
        events += h.feed(node, T0 + i * STEP, {"lamp_power": w, "illuminance": lux})
    return events


def names(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.alert, e.status) for e in events]


@pytest.mark.parametrize(("power", "state"), [(0.0, "off"), (0.29, "off"), (1.7, "off"),
                                              (1.9, "dimmed"), (21.6, "dimmed"),
                                              (30.5, "dimmed"), (30.7, "on"), (36.0, "on"),
                                              (50.0, "on")])
def test_state_from_power_against_the_rating(power: float, state: str) -> None:
    h = health()
    h.feed("SL-1", T0, {"lamp_power": power})
    assert h.lamps()[0].state == state


def test_switching_dates_are_the_first_samples_seen_on_and_off() -> None:
    h = health()
    run(h, [(0.0, 500)] * 2 + [(36.0, NIGHT)] * 4 + [(21.6, NIGHT)] * 2 + [(0.0, 800)] * 2)
    lamp = h.lamps()[0]
    assert lamp.last_on == T0 + 2 * STEP  # dimming (on → dimmed) is no switch
    assert lamp.last_off == T0 + 8 * STEP
    assert lamp.state == "off" and not h.conditions.open


def test_dark_at_night_raised_on_the_third_dark_sample_and_cleared_once_lit() -> None:
    h = health()
    events = run(h, [(36.0, NIGHT)] * 14 + [(0.0, NIGHT)] * 2)
    assert events == []  # two dark samples are not a fault
    events = run(h, [(0.0, NIGHT)] * 6, start=16)
    assert names(events) == [("LampDarkAtNight", "firing")]
    assert events[0].at == T0 + 16 * STEP and events[0].starts_at == T0 + 14 * STEP
    # the day says nothing about a broken lamp: still open
    assert run(h, [(0.0, DAY)] * 20, start=22) == []
    events = run(h, [(36.0, NIGHT)] * 5, start=42)
    assert names(events) == [("LampDarkAtNight", "resolved")]
    assert events[0].at == T0 + 44 * STEP
    assert h.conditions.raised["LampDarkAtNight"] == 1 == h.conditions.cleared["LampDarkAtNight"]


def test_one_dark_sample_among_lit_ones_raises_nothing() -> None:
    h = health(cycling_switches=99)
    samples = [(36.0, NIGHT), (36.0, NIGHT), (0.0, NIGHT)] * 10
    assert run(h, samples) == []


def test_day_burner_raised_and_cleared_by_daylight_samples() -> None:
    h = health()
    events = run(h, [(0.0, DAY)] * 3 + [(36.0, DAY)] * 4)
    assert names(events) == [("LampDayBurner", "firing")]
    # twilight and night tell nothing about a photocell stuck closed
    assert run(h, [(36.0, 500.0)] * 3 + [(36.0, NIGHT)] * 10, start=7) == []
    events = run(h, [(0.0, DAY)] * 4, start=20)
    assert names(events) == [("LampDayBurner", "resolved")]


def test_cycling_lamp_raised_once_and_cleared_after_an_hour_burning_steadily() -> None:
    h = health()
    flicker = [(36.0, NIGHT), (0.0, NIGHT)] * 6
    events = run(h, [(36.0, NIGHT)] * 13 + flicker)
    assert names(events) == [("LampCycling", "firing")]
    assert events[0].at == T0 + (13 + 4) * STEP  # the 4th switch within the hour
    assert not h.conditions.is_open("LampDarkAtNight", "SL-0042")  # flicker is not darkness
    events = run(h, [(36.0, NIGHT)] * 14, start=25)
    assert names(events) == [("LampCycling", "resolved")]
    assert events[0].at == T0 + (25 + 12) * STEP


def test_a_healthy_night_with_dimming_raises_nothing() -> None:
    h = health()
    night = ([(0.0, DAY)] * 10 + [(0.0, 40.0), (36.0, 5.0)] + [(36.0, NIGHT)] * 40
             + [(21.6, NIGHT)] * 60 + [(36.0, NIGHT)] * 12 + [(36.0, 20.0), (0.0, 60.0)]
             + [(0.0, DAY)] * 10)
    assert run(h, night * 3) == []


def test_power_far_off_the_rating_and_its_dim_levels() -> None:
    h = health()
    assert run(h, [(36.0, NIGHT)] * 2 + [(21.6, NIGHT)] * 2) == []
    events = run(h, [(18.0, NIGHT)] * 3, start=4)
    assert names(events) == [("LampPowerOffRating", "firing")]
    assert run(h, [(0.0, DAY)] * 20, start=7) == []  # off: nothing to say
    events = run(h, [(36.5, NIGHT)] * 3, start=27)
    assert names(events) == [("LampPowerOffRating", "resolved")]


def test_a_lamp_without_dim_levels_dimmed_is_off_its_rating() -> None:
    h = Health(Settings(lamps={"SL-9": Lamp(rating_w=70.0)}))
    events = []
    for i in range(3):
        events += h.feed("SL-9", T0 + i * STEP, {"lamp_power": 42.0})
    assert names(events) == [("LampPowerOffRating", "firing")]


def test_without_illuminance_the_light_faults_are_not_judged() -> None:
    h = health()
    events = []
    for i in range(10):
        events += h.feed("SL-1", T0 + i * STEP, {"lamp_power": 0.0})
    assert events == [] and h.lamps()[0].state == "off"


def test_open_lamp_conditions_and_switching_survive_a_restore() -> None:
    h = health()
    run(h, [(0.0, 500.0)] + [(36.0, NIGHT)] * 13 + [(0.0, NIGHT)] * 3)
    assert h.conditions.is_open("LampDarkAtNight", "SL-0042")
    again = health()
    again.restore(h.state())
    assert again.lamps()[0].last_on == T0 + STEP
    assert again.lamps()[0].last_off == T0 + 14 * STEP
    assert run(again, [(0.0, NIGHT)] * 5, start=17) == []  # still open: not raised twice
    events = run(again, [(36.0, NIGHT)] * 3, start=22)
    assert names(events) == [("LampDarkAtNight", "resolved")]
    assert again.conditions.raised["LampDarkAtNight"] == 1
