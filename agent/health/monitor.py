"""The street's health: readings in (`feed`, `tick`), alert events and lamp/energy state out.

`Health` is plain synchronous code over plain data: the gateway calls it wherever the
readings are (docs/alerts.md "Wiring"), and `state()`/`restore()` carry everything that must
survive a restart (open conditions and their counts, switching dates, energy) — the store
(store.py) saves it in the transaction that queues the events' notifications.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..units import UNITS
from .alerts import Conditions, Event
from .energy import EnergyMeter
from .lamp import LampTracker, Switching, Verdict
from .sensors import NODE_OWN, SensorWatch
from .settings import Settings

# Nodes set their clocks from the gateway's ACKs. A pack further ahead of the gateway's clock
# than AHEAD_S is refused (counted); a newest sample ahead of it by more than SKEW_S is no
# barrier: the next pack at or behind the clock is the node's clock put right, taken as its
# newest — else one pack from the future would hide every later one from the detectors.
AHEAD_S = 86400.0
SKEW_S = 600.0
# what a lamp on a pole can draw: a meter reading beyond is not integrated (nor judged)
POWER_MAX_W = 100_000.0
POWER_MAX_RATINGS = 10.0


@dataclass(frozen=True)
class LampView:
    """One lamp as the street view, /metrics and the Streetlight entity show it."""

    node: str
    state: str
    power_w: float | None
    rating_w: float
    last_on: float | None
    last_off: float | None
    kwh: float
    burning_h: float
    dayburn_kwh: float
    co2e_kg: float
    today_kwh: float
    unmeasured_h: float
    alerts: tuple[str, ...]
    t: float | None = None  # the sample the state is from


class _Node:
    def __init__(self, node: str, s: Settings) -> None:
        lamp = s.lamp(node)
        self.lamp = LampTracker(lamp, s)
        self.sensors = SensorWatch(s)
        self.energy = EnergyMeter(s, lamp.interval_s, lamp.rating_w)
        self.interval_s = lamp.interval_s
        self.rating_w = lamp.rating_w
        self.off_w = s.off_fraction * lamp.rating_w
        self.last_t: float | None = None  # the newest reading time seen
        self.clock_t: float | None = None  # ... no later than the gateway's clock when it came
        self.since: float | None = None  # the gateway's clock when it first heard the node
        # a pack came since the last silence check / the last check that saw one: silence
        # is measured from the later of this and the newest sample (a backlog of old samples
        # is the node talking; a restart is the gateway listening again)
        self.fresh = False
        self.heard: float | None = None
        self.has_lamp = False

    def clock_put_right(self) -> None:
        """Forget the times of samples from the node's future (its clock ran ahead)."""
        self.last_t = self.clock_t = None
        self.energy.m.last_t = self.energy.m.last_w = None
        self.lamp.forget_times()

    def plausible_w(self, power: float) -> float | None:
        """A power the lamp can draw (meter noise just below 0 read as 0), or None."""
        if not math.isfinite(power):
            return None
        if power < 0:
            return 0.0 if power >= -self.off_w else None
        return power if power <= min(POWER_MAX_W, POWER_MAX_RATINGS * max(self.rating_w, 200.0)
                                     ) else None


class Health:
    def __init__(self, settings: Settings | None = None) -> None:
        self.s = settings or Settings()
        self.conditions = Conditions()
        self.nodes: dict[str, _Node] = {}
        self.ignored = 0  # packs not taken (no time, not a dict): counted, never raised
        # readings not judged, by reason: "future" (a pack ahead of the gateway's clock),
        # "power" (a lamp power no lamp draws), "name" (a name no sensor has)
        self.refused: Counter[str] = Counter()
        # what a node can measure: the canonical table (a board's measurements are in it)
        # and the node's own; any other name is counted, never remembered
        self.known = frozenset((*UNITS, *NODE_OWN, *self.s.physical, *self.s.stuck_runs))
        self._ticked: float | None = None  # the previous silence check

    def _node(self, node: str) -> _Node:
        n = self.nodes.get(node)
        if n is None:
            n = self.nodes[node] = _Node(node, self.s)
        return n

    def feed(self, node: str, t: float, readings: dict[str, Any],
             now: float | None = None) -> list[Event]:
        """One pack of a node: canonical names (and `<name>.q` flags) → values, at time t;
        now: the gateway's clock (None: sample times are not judged against it)."""
        if (not isinstance(readings, dict) or not isinstance(t, int | float)
                or isinstance(t, bool) or not math.isfinite(t)):
            self.ignored += 1
            return []
        if now is not None and t > now + AHEAD_S:
            self.refused["future"] += 1
            return []
        readings = self._known(readings)
        n = self._node(node)
        n.fresh = True
        if n.since is None and now is not None:
            n.since = float(now)
        if (now is not None and n.last_t is not None and n.last_t > now + SKEW_S
                and t <= now + SKEW_S):
            n.clock_put_right()
        newest = n.last_t is None or t > n.last_t
        verdicts: list[Verdict] = []
        if newest:
            n.last_t = float(t)
            n.clock_t = n.last_t if now is None else min(n.last_t, now)
            verdicts.append(("NodeSilent", "", False, "", 1, 1))
            verdicts += n.sensors.update(readings)
        power = readings.get("lamp_power")
        if isinstance(power, int | float) and not isinstance(power, bool):
            w = n.plausible_w(float(power))
            if w is None:
                self.refused["power"] += 1
            else:
                n.has_lamp = True
                lux = readings.get("illuminance")
                lux = float(lux) if isinstance(lux, int | float) else None
                n.energy.update(t, w, lux, n.since)
                if newest:
                    verdicts += n.lamp.update(t, w, lux)
        return self._decide(node, t, verdicts)

    def _known(self, readings: dict[str, Any]) -> dict[str, Any]:
        """The readings of names a node can measure (and their flags); others counted."""
        known = self.known
        out = {}
        for name, v in readings.items():
            if (name[:-2] if isinstance(name, str) and name.endswith(".q") else name) in known:
                out[name] = v
        if len(out) < len(readings):
            self.refused["name"] += len(readings) - len(out)
        return out

    def listening(self, now: float) -> None:
        """The gateway listens from `now` (it started): silence counts from here at most."""
        for n in self.nodes.values():
            n.heard = now if n.heard is None else max(n.heard, now)
            if n.clock_t is not None:
                n.clock_t = min(n.clock_t, now)

    def tick(self, now: float) -> list[Event]:
        """Nodes silent for more than `silent_intervals` of their interval at time `now`."""
        events = []
        before, self._ticked = self._ticked, now
        for node, n in self.nodes.items():
            if n.fresh and before is not None:
                # it sent after the previous check, whatever the time its samples carry
                n.heard = before if n.heard is None else max(n.heard, before)
            n.fresh = False
            if n.clock_t is None:
                continue
            allowed = self.s.silent_intervals * n.interval_s
            if n.sensors.saving:
                allowed *= self.s.saving_factor
            since = n.clock_t if n.heard is None else max(n.clock_t, n.heard)
            if now - since > allowed:
                gone = (now - since) / 60
                e = self.conditions.observe(("NodeSilent", node, ""), True, now,
                                            f"no pack for {gone:.0f} min", 1, 1)
                if e is not None:
                    events.append(e)
        return events

    def _decide(self, node: str, t: float, verdicts: list[Verdict]) -> list[Event]:
        events = []
        for alert, subject, bad, summary, confirm, clear in verdicts:
            e = self.conditions.observe((alert, node, subject), bad, t, summary, confirm, clear)
            if e is not None:
                events.append(e)
        return events

    def lamps(self, now: float | None = None) -> list[LampView]:
        out = []
        for node, n in sorted(self.nodes.items()):
            if not n.has_lamp:
                continue
            sw: Switching = n.lamp.sw
            m = n.energy.m
            out.append(LampView(
                node=node, state=sw.state, power_w=sw.power_w, rating_w=n.lamp.lamp.rating_w,
                last_on=sw.last_on, last_off=sw.last_off, kwh=m.wh / 1000,
                burning_h=m.burning_s / 3600, dayburn_kwh=m.dayburn_wh / 1000,
                co2e_kg=n.energy.co2e_kg(), unmeasured_h=m.gap_s / 3600,
                today_kwh=n.energy.today_wh(now if now is not None else sw.t or 0) / 1000,
                alerts=tuple(self.conditions.of_node(node)), t=sw.t))
        return out

    def state(self) -> dict[str, Any]:
        return {"conditions": self.conditions.state(),
                "nodes": {node: {"last_t": n.last_t, "since": n.since, "lamp": n.lamp.state(),
                                 "energy": n.energy.state(), "has_lamp": n.has_lamp,
                                 "saving": n.sensors.saving}
                          for node, n in self.nodes.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.conditions.restore(state.get("conditions", {}))
        self.nodes = {}
        for node, d in state.get("nodes", {}).items():
            n = self._node(node)
            n.last_t = n.clock_t = d.get("last_t")
            n.since = d.get("since")
            n.lamp.restore(d.get("lamp", {}))
            n.energy.restore(d.get("energy", {}))
            n.has_lamp = bool(d.get("has_lamp"))
            n.sensors.saving = bool(d.get("saving"))
