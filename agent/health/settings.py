"""The health detectors' thresholds and each lamp's rating, with the defaults docs/alerts.md
justifies, and their [health] config table (parsed with the config file's own Doc)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ..configfile import positive

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..configfile import Doc

# measurement → (identical values in a row that its noise does not allow, floor): a run only
# counts while |value| > floor (a dark sky, a lamp supply switched off are flat for real)
STUCK_RUNS: dict[str, tuple[int, float]] = {
    "temperature": (12, 0.0), "humidity": (12, 0.0), "pressure": (12, 0.0), "co2": (12, 0.0),
    "illuminance": (12, 100.0), "LAeq": (12, 0.0), "lamp_voltage": (12, 1.0),
    "battery": (12, 0.0),
}
# measurement → what the physical world allows (not the chip's range: the node flags that)
PHYSICAL: dict[str, tuple[float, float]] = {
    "temperature": (-50.0, 60.0), "humidity": (0.0, 100.0), "pressure": (80000.0, 110000.0),
    "co2": (300.0, 10000.0), "pm1": (0.0, 2000.0), "pm2_5": (0.0, 2000.0),
    "pm4": (0.0, 2000.0), "pm10": (0.0, 2000.0), "illuminance": (0.0, 150000.0),
    "LAeq": (20.0, 140.0), "LAmax": (20.0, 150.0), "lamp_voltage": (0.0, 300.0),
    "battery": (2.5, 4.5),
}


@dataclass(frozen=True)
class Lamp:
    """One pole's luminaire, from provisioning: its rated power and the dim levels its
    controller uses (fractions of the rating; none: the lamp is never dimmed)."""

    rating_w: float = 36.0
    dim_levels: tuple[float, ...] = ()
    interval_s: float = 300.0  # the node's sampling interval: the span a pack covers


@dataclass(frozen=True)
class Settings:
    """Thresholds (times in seconds, light in lx, power as a fraction of the lamp's rating)."""

    confirm: int = 3  # samples in a row before a condition is raised: never on one sample
    clear: int = 3  # samples in a row before it is cleared
    off_fraction: float = 0.05  # below this share of the rating the lamp is off
    on_fraction: float = 0.85  # at or above it, on at full power (between: dimmed)
    rating_tolerance: float = 0.15  # a burning lamp further than this off every level
    dark_lx: float = 10.0  # darker than this, the lamp must burn (photocells switch at ~30)
    day_lx: float = 1000.0  # brighter than this, a burning lamp is a day-burner
    cycling_switches: int = 4  # switch-ons and -offs within cycling_window_s: a failing lamp
    cycling_window_s: float = 3600.0
    cycling_clear_s: float = 3600.0  # burning without a switch this long clears it
    silent_intervals: float = 3.0  # no pack for this many of the node's intervals
    saving_factor: float = 6.0  # ... times this while the node says it saves its battery
    battery_low_v: float = 3.5  # the node's own battery_low.low_v default
    battery_clear_v: float = 3.55  # its hysteresis_v above
    outbox_high: int = 12  # frames waiting for the gateway's ACK: an hour at 5-min packs
    outbox_clear: int = 2
    grid_g_per_kwh: float = 281.0  # EEA, EU-27 (docs/alerts.md "Energy and emissions")
    max_gap_intervals: float = 2.5  # energy is not integrated across a longer gap
    stuck_runs: dict[str, tuple[int, float]] = field(default_factory=lambda: dict(STUCK_RUNS))
    physical: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(PHYSICAL))
    lamps: dict[str, Lamp] = field(default_factory=dict)  # node → its lamp
    default_lamp: Lamp = Lamp()

    def lamp(self, node: str) -> Lamp:
        return self.lamps.get(node, self.default_lamp)


_SCALARS = {f.name: f for f in fields(Settings)
            if f.name not in ("stuck_runs", "physical", "lamps", "default_lamp")}
_INTS = ("confirm", "clear", "cycling_switches", "outbox_high", "outbox_clear")
_ZERO_OK = ("grid_g_per_kwh",)


def parse(doc: Doc, table: dict[str, Any], dotted: str = "health",
          extra: Iterable[str] = ()) -> Settings:
    """[health] (thresholds), [health.lamp] (the default lamp) and [health.lamps."<node>"];
    `extra`: the other keys the caller reads from the same table."""
    from ..config import NODE_ID

    doc.only(table, dotted, (*_SCALARS, "lamp", "lamps", *extra))
    values: dict[str, Any] = {}
    for name in _SCALARS:
        kind: type | tuple[type, ...] = int if name in _INTS else (int, float)
        if name in table:
            v = doc.get(table, name, f"{dotted}.{name}", kind,
                        check=not_negative if name in _ZERO_OK else positive)
            values[name] = v if name in _INTS else float(v)
    s = Settings(**values)
    for name, why in _order(s):
        raise doc.error(f"{dotted}.{name}", why)
    default = _lamp(doc, table.get("lamp", {}), f"{dotted}.lamp", Lamp())
    lamps = {}
    for node, t in doc.get(table, "lamps", f"{dotted}.lamps", dict, {}).items():
        if not NODE_ID.match(node):
            raise doc.error(f'{dotted}.lamps."{node}"', "not a node id (1-32 letters, digits, "
                            "'.', '_' or '-', as in the key file): this lamp would never apply")
        lamps[node] = _lamp(doc, t, f'{dotted}.lamps."{node}"', default)
    return replace(s, default_lamp=default, lamps=lamps)


def not_negative(v: float) -> str | None:
    """An intensity that may be 0 (a 100 % renewable contract): at or above 0 and finite."""
    return None if positive(v) is None or v == 0 else f"must be a finite number >= 0, got {v!r}"


def _order(s: Settings) -> Iterable[tuple[str, str]]:
    """Thresholds out of order with their partner, or outside what they can mean."""
    if s.on_fraction <= s.off_fraction:
        yield "on_fraction", "must be above off_fraction"
    if s.on_fraction > 1:
        yield "on_fraction", "is a fraction of the rating: at most 1"
    if s.rating_tolerance >= 1:
        yield "rating_tolerance", "is a fraction of the rating below 1 (at 1 any lamp is fine)"
    if s.day_lx <= s.dark_lx:
        yield "day_lx", "must be above dark_lx"
    if s.battery_clear_v < s.battery_low_v:
        yield "battery_clear_v", "must be at or above battery_low_v (it clears the alert)"
    if s.outbox_clear >= s.outbox_high:
        yield "outbox_clear", "must be below outbox_high (it clears the alert)"
    if s.cycling_switches < 3:
        yield "cycling_switches", "must be at least 3 (a healthy lamp switches twice a day)"
    if s.max_gap_intervals < 1:
        yield "max_gap_intervals", "must be at least 1 (samples are one interval apart)"
    if s.silent_intervals < 1:
        yield "silent_intervals", "must be at least 1 (a pack comes once an interval)"
    if s.saving_factor < 1:
        yield "saving_factor", "must be at least 1 (a saving node stretches its interval)"


def _lamp(doc: Doc, t: Any, key: str, base: Lamp) -> Lamp:
    if not isinstance(t, dict):
        raise doc.error(key, "expected a table: rating_w = 36, dim_levels = [0.6]")
    doc.only(t, key, ("rating_w", "dim_levels", "interval_s"))
    levels = doc.get(t, "dim_levels", f"{key}.dim_levels", list, list(base.dim_levels),
                     lambda v: None if all(isinstance(x, int | float) and not isinstance(x, bool)
                                           and 0 < x < 1 for x in v)
                     else "expected fractions of the rating between 0 and 1, e.g. [0.6]")
    return Lamp(
        rating_w=float(doc.get(t, "rating_w", f"{key}.rating_w", (int, float), base.rating_w,
                               positive)),
        dim_levels=tuple(float(x) for x in levels),
        interval_s=float(doc.get(t, "interval_s", f"{key}.interval_s", (int, float),
                                 base.interval_s, positive)))
