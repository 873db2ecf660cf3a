"""Each lamp's energy, burning hours, day-burn waste and emissions, integrated from its power
samples — never across a gap: a silent node's time is counted as unmeasured, not guessed."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass
from typing import Any

from .settings import Settings


@dataclass
class Meter:
    wh: float = 0.0  # energy over the lamp's measured time
    burning_s: float = 0.0
    dayburn_wh: float = 0.0  # energy burnt while the sky was brighter than day_lx
    measured_s: float = 0.0  # time covered by consecutive samples
    gap_s: float = 0.0  # time between samples further apart than the gap limit: not counted
    out_of_order: int = 0  # samples older than the latest one (a backlog): not integrated
    day: str = ""  # the UTC date `day_wh` is of
    day_wh: float = 0.0
    last_t: float | None = None
    last_w: float | None = None
    last_day: bool = False  # the last sample was in full daylight


def utc_day(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d")


class EnergyMeter:
    def __init__(self, settings: Settings, interval_s: float, rating_w: float) -> None:
        self.s = settings
        self.max_gap_s = settings.max_gap_intervals * interval_s
        self.off_w = settings.off_fraction * rating_w
        self.m = Meter()

    def update(self, t: float, power: float, lux: float | None,
               since: float | None = None) -> None:
        """One sample: the trapezoid between it and the previous one, if they are close.

        `power` must be plausible (monitor.py `plausible_w`: finite, not below 0, bounded), so
        every total stays finite and only grows. since: when the gateway first heard the node;
        a gap is unmeasured only from there (a first pack stamped in year 1, or a node's
        backlog from before the gateway ran, is time nobody could have measured)."""
        m = self.m
        daylight = lux is not None and lux >= self.s.day_lx
        if m.last_t is not None and t <= m.last_t:
            m.out_of_order += 1
            return
        if m.last_t is not None and m.last_w is not None:
            span = t - m.last_t
            if span > self.max_gap_s:
                m.gap_s += max(0.0, t - max(m.last_t, since if since is not None else m.last_t))
            else:
                wh = (m.last_w + power) / 2 * span / 3600
                m.wh += wh
                m.measured_s += span
                was_on, on = m.last_w >= self.off_w, power >= self.off_w
                m.burning_s += span * (was_on + on) / 2
                # burning in daylight; a driver's standby draw by day is not day-burning
                m.dayburn_wh += (m.last_w * (was_on and m.last_day)
                                 + power * (on and daylight)) / 2 * span / 3600
                day = utc_day(t)
                if day != m.day:
                    m.day, m.day_wh = day, 0.0
                m.day_wh += wh
        m.last_t, m.last_w, m.last_day = t, power, daylight

    def kwh(self) -> float:
        return self.m.wh / 1000

    def co2e_kg(self, wh: float | None = None) -> float:
        return (self.m.wh if wh is None else wh) / 1000 * self.s.grid_g_per_kwh / 1000

    def today_wh(self, now: float) -> float:
        return self.m.day_wh if self.m.day == utc_day(now) else 0.0

    def state(self) -> dict[str, Any]:
        return asdict(self.m)

    def restore(self, d: dict[str, Any]) -> None:
        """A meter as state() saved it; a value no meter can hold (not finite, below 0: an
        older gateway integrated absurd powers) starts again from 0."""
        kept: dict[str, Any] = {}
        for k, v in d.items():
            if k not in Meter.__dataclass_fields__:
                continue
            if isinstance(v, float) and not (math.isfinite(v) and (v >= 0 or k == "last_t")):
                continue
            kept[k] = v
        self.m = Meter(**kept)
