"""A lamp's state from its power against its rating, its switching, and its faults.

Everything here works on the samples a node sends (power and daylight measured together in
one pack), one sample at a time; a verdict is per sample, and `Conditions` turns verdicts
into conditions only after several in a row (alerts.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from .settings import Lamp, Settings

# alert, subject, bad (None: no evidence), summary, confirm, clear
Verdict = tuple[str, str, bool | None, str, int, int]


@dataclass
class Switching:
    """What the lamp did last: its state and when it was first seen on and off."""

    state: str = "unknown"  # on, dimmed, off (unknown before a lamp_power reading)
    power_w: float | None = None
    # dateLastSwitchingOn/Off: the first sample seen burning after one seen off, and back
    # (the switch happened within the interval before it)
    last_on: float | None = None
    last_off: float | None = None
    t: float | None = None  # the sample the state is from


class LampTracker:
    def __init__(self, lamp: Lamp, settings: Settings) -> None:
        self.lamp = lamp
        self.s = settings
        self.sw = Switching()
        self._switches: deque[float] = deque()  # times of on/off switches in the window
        self._steady_since: float | None = None  # burning, no switch since then

    def classify(self, power: float) -> str:
        frac = power / self.lamp.rating_w
        if frac < self.s.off_fraction:
            return "off"
        return "on" if frac >= self.s.on_fraction else "dimmed"

    def update(self, t: float, power: float, lux: float | None) -> list[Verdict]:
        s, sw = self.s, self.sw
        state = self.classify(power)
        burning = state != "off"
        was = sw.state
        if was != "unknown" and (was == "off") == burning:
            self._switches.append(t)
            self._steady_since = t if burning else None
        elif burning and self._steady_since is None:
            self._steady_since = t
        if burning and was == "off":
            sw.last_on = t
        elif not burning and was in ("on", "dimmed"):
            sw.last_off = t
        sw.state, sw.power_w, sw.t = state, power, t
        while self._switches and self._switches[0] <= t - s.cycling_window_s:
            self._switches.popleft()
        switches = len(self._switches)
        verdicts: list[Verdict] = []
        w = f"{power:.1f} W of {self.lamp.rating_w:g} W"
        if lux is not None:
            dark: bool | None = None
            if burning:
                dark = False
            elif lux < s.dark_lx and switches < 2:  # two switches: cycling, not dark
                dark = True
            verdicts.append(("LampDarkAtNight", "", dark, f"dark at {lux:.1f} lx ({w})",
                             s.confirm, s.clear))
            day = None if lux < s.day_lx else burning
            verdicts.append(("LampDayBurner", "", day, f"burning at {lux:.0f} lx ({w})",
                             s.confirm, s.clear))
        cycling: bool | None = None
        if switches >= s.cycling_switches:
            cycling = True
        elif (burning and self._steady_since is not None
              and t - self._steady_since >= s.cycling_clear_s):
            cycling = False
        verdicts.append(("LampCycling", "", cycling, f"{switches} switches within "
                         f"{s.cycling_window_s / 60:g} min", 1, 1))
        rating: bool | None = None
        if burning:
            frac = power / self.lamp.rating_w
            rating = not any(abs(frac / level - 1) <= s.rating_tolerance
                             for level in (1.0, *self.lamp.dim_levels))
        verdicts.append(("LampPowerOffRating", "", rating, f"burning at {w}", s.confirm, s.clear))
        return verdicts

    def forget_times(self) -> None:
        """The node's clock was put right: switch times from its future mean nothing."""
        self._switches.clear()
        self._steady_since = None

    def state(self) -> dict[str, Any]:
        sw = self.sw
        return {"state": sw.state, "power_w": sw.power_w, "last_on": sw.last_on,
                "last_off": sw.last_off, "t": sw.t}

    def restore(self, d: dict[str, Any]) -> None:
        power = d.get("power_w")
        if not isinstance(power, int | float) or not 0 <= power < float("inf"):
            power = None  # (an older gateway kept any power it was sent)
        self.sw = Switching(d.get("state", "unknown"), power, d.get("last_on"),
                            d.get("last_off"), d.get("t"))
