"""The street's health: readings in (`feed`, `tick`), alert events and lamp/energy state out.

`Health` is plain synchronous code over plain data: the gateway calls it wherever the
readings are (docs/alerts.md "Wiring"), and `state()`/`restore()` carry everything that must
survive a restart (open conditions and their counts, switching dates, energy) — the store
(store.py) saves it in the transaction that queues the events' notifications.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .alerts import Conditions, Event
from .energy import EnergyMeter
from .lamp import LampTracker, Switching, Verdict
from .sensors import SensorWatch
from .settings import Settings


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
        self.last_t: float | None = None  # the newest reading time seen
        self.has_lamp = False


class Health:
    def __init__(self, settings: Settings | None = None) -> None:
        self.s = settings or Settings()
        self.conditions = Conditions()
        self.nodes: dict[str, _Node] = {}
        self.ignored = 0  # packs not taken (no time, not a dict): counted, never raised

    def _node(self, node: str) -> _Node:
        n = self.nodes.get(node)
        if n is None:
            n = self.nodes[node] = _Node(node, self.s)
        return n

    def feed(self, node: str, t: float, readings: dict[str, Any]) -> list[Event]:
        """One pack of a node: canonical names (and `<name>.q` flags) → values, at time t."""
        if not isinstance(readings, dict) or not isinstance(t, int | float) or t != t:
            self.ignored += 1
            return []
        n = self._node(node)
        newest = n.last_t is None or t > n.last_t
        verdicts: list[Verdict] = []
        if newest:
            n.last_t = float(t)
            verdicts.append(("NodeSilent", "", False, "", 1, 1))
            verdicts += n.sensors.update(readings)
        power = readings.get("lamp_power")
        if isinstance(power, int | float):
            n.has_lamp = True
            lux = readings.get("illuminance")
            lux = float(lux) if isinstance(lux, int | float) else None
            n.energy.update(t, float(power), lux)
            if newest:
                verdicts += n.lamp.update(t, float(power), lux)
        return self._decide(node, t, verdicts)

    def tick(self, now: float) -> list[Event]:
        """Nodes silent for more than `silent_intervals` of their interval at time `now`."""
        events = []
        for node, n in self.nodes.items():
            if n.last_t is None:
                continue
            allowed = self.s.silent_intervals * n.interval_s
            if n.sensors.saving:
                allowed *= self.s.saving_factor
            if now - n.last_t > allowed:
                gone = (now - n.last_t) / 60
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
                "nodes": {node: {"last_t": n.last_t, "lamp": n.lamp.state(),
                                 "energy": n.energy.state(), "has_lamp": n.has_lamp,
                                 "saving": n.sensors.saving}
                          for node, n in self.nodes.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.conditions.restore(state.get("conditions", {}))
        self.nodes = {}
        for node, d in state.get("nodes", {}).items():
            n = self._node(node)
            n.last_t = d.get("last_t")
            n.lamp.restore(d.get("lamp", {}))
            n.energy.restore(d.get("energy", {}))
            n.has_lamp = bool(d.get("has_lamp"))
            n.sensors.saving = bool(d.get("saving"))
