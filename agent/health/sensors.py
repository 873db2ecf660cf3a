"""A node's sensors and its own health, one pack at a time: stuck values, values the world
does not allow, sensors the drivers report failed, a low battery, a growing outbox."""

from __future__ import annotations

from typing import Any

from .lamp import Verdict
from .settings import Settings

# quality flag bits (docs/measurements.md "Quality flags", node/sampler.py FLAG_NAMES)
Q_STUCK = 8
Q_FAILED = 128
Q_ABSENT = 256
Q_SAVING = 512
NODE_OWN = ("uptime", "heap_free", "heap_peak", "cycle_ms", "energy", "outbox")


class SensorWatch:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._runs: dict[str, tuple[float, int]] = {}  # measurement → (value, times in a row)
        self.saving = False  # the node's last battery.q said it stretches its interval

    def update(self, readings: dict[str, Any]) -> list[Verdict]:
        s = self.s
        out: list[Verdict] = []
        flags = {n[:-2]: int(v) for n, v in readings.items()
                 if n.endswith(".q") and isinstance(v, int | float)}
        for name, v in readings.items():
            if name.endswith(".q") or name in NODE_OWN or not isinstance(v, int | float):
                continue
            q = flags.get(name, 0)
            out.append(("SensorNotAnswering", name, False, "", 1, 1))
            lo_hi = s.physical.get(name)
            if lo_hi is not None:
                bad = not lo_hi[0] <= v <= lo_hi[1]
                out.append(("SensorOutOfRange", name, bad,
                            f"{v!r} outside {lo_hi[0]:g}..{lo_hi[1]:g}", s.confirm, s.clear))
            out.append(("SensorStuck", name, self._stuck(name, float(v), q),
                        f"{v!r} repeated {self._runs.get(name, (0.0, 0))[1]} times", 1, 1))
        for name, q in flags.items():
            if name not in readings and q & (Q_FAILED | Q_ABSENT):
                why = "absent" if q & Q_ABSENT else "failed"
                out.append(("SensorNotAnswering", name, True, f"{why} (flags {q})",
                            1 if q & Q_ABSENT else s.confirm, 1))
        battery = readings.get("battery")
        self.saving = bool(flags.get("battery", 0) & Q_SAVING)
        if isinstance(battery, int | float):
            low: bool | None = None
            if battery < s.battery_low_v or self.saving:
                low = True
            elif battery >= s.battery_clear_v:
                low = False
            out.append(("NodeBatteryLow", "", low, f"{battery:.3f} V", s.confirm, s.clear))
        outbox = readings.get("outbox")
        if isinstance(outbox, int | float):
            growing: bool | None = None
            if outbox >= s.outbox_high:
                growing = True
            elif outbox <= s.outbox_clear:
                growing = False
            out.append(("NodeOutboxGrowing", "", growing, f"{outbox:g} frames waiting",
                        s.confirm, s.clear))
        return out

    def _stuck(self, name: str, v: float, q: int) -> bool | None:
        prev, n = self._runs.get(name, (None, 0))
        n = n + 1 if prev == v else 1
        self._runs[name] = (v, n)
        if q & Q_STUCK:
            return True  # the node saw every output of the chip repeat (6 intervals)
        limit = self.s.stuck_runs.get(name)
        if limit is None:
            return None
        runs, floor = limit
        if abs(v) <= floor or (name == "humidity" and v >= 100):
            return None  # flat for real: a dark sky, a supply off, saturated air
        return n >= runs
