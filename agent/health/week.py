"""A simulated week of the street through the health detectors, with faults injected.

`python -m lantern.agent.health.week` feeds every node's packs (firmware/sim/report.py: the
street's pure functions, as the gateway stores them) through `Health`, once with a fault on
most poles and once healthy, and prints what was raised and cleared, how late, what was
raised that no fault explains, and the street's energy, emissions and day-burn waste.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .alerts import Event, Key
from .monitor import Health
from .settings import Lamp, Settings

START_S = 1780272000.0  # 2026-06-01 00:00 UTC: the week starts at a midnight
DAYS = 7
INTERVAL_S = 300.0
NODES = tuple(f"SL-{i:04d}" for i in range(1, 10))
LAMP = Lamp(rating_w=36.0, dim_levels=(0.6,), interval_s=INTERVAL_S)  # the street's lamps


@dataclass(frozen=True)
class Fault:
    node: str
    chip: str
    kind: str
    from_h: float
    to_h: float
    expect: tuple[str, ...]  # (alertname or alertname:measurement) it must raise, once each

    def spec(self) -> dict[str, Any]:
        return {"chip": self.chip, "kind": self.kind, "from_h": self.from_h, "to_h": self.to_h}


# One fault per pole (SL-0001 stays healthy), each at a time it can be seen.
FAULTS = (
    Fault("SL-0002", "lamp", "dark", 45.0, 60.0, ("LampDarkAtNight",)),
    Fault("SL-0003", "lamp", "dayburn", 57.0, 64.0, ("LampDayBurner",)),
    Fault("SL-0004", "lamp", "flicker", 94.0, 99.0, ("LampCycling",)),
    Fault("SL-0005", "bme280", "stuck", 100.0, 110.0,
          ("SensorStuck:temperature", "SensorStuck:humidity", "SensorStuck:pressure")),
    Fault("SL-0006", "node", "dead", 120.0, 126.0, ("NodeSilent",)),
    Fault("SL-0007", "battery", "drain", 130.0, 150.0, ("NodeBatteryLow",)),
    Fault("SL-0008", "lamp", "degraded", 140.0, 160.0, ("LampPowerOffRating",)),
    Fault("SL-0009", "sps30", "unplug", 30.0, 33.0,
          ("SensorNotAnswering:pm2_5", "SensorNotAnswering:pm10")),
)


def settings() -> Settings:
    return Settings(default_lamp=LAMP)


def _sim(module: str) -> Any:
    """A firmware/sim module (MicroPython code, untyped: not for mypy to check here)."""
    return importlib.import_module(f"lantern.firmware.sim.{module}")


def _scenario(node: str, faults: list[dict[str, Any]]) -> Any:
    cfg = {"seed": 1, "anchor_ms": 1, "start_s": START_S, "faults": faults}
    return _sim("scenario").Scenario(cfg, node)


def _key(node: str, expect: str) -> Key:
    alert, _, subject = expect.partition(":")
    return (alert, node, subject)


@dataclass
class Result:
    events: list[Event] = field(default_factory=list)
    health: Health = field(default_factory=Health)

    def summary(self) -> dict[str, Any]:
        lamps = self.health.lamps()
        kwh = sum(v.kwh for v in lamps)
        return {
            "raised": sum(e.status == "firing" for e in self.events),
            "cleared": sum(e.status == "resolved" for e in self.events),
            "kwh": round(kwh, 3),
            "co2e_kg": round(sum(v.co2e_kg for v in lamps), 3),
            "dayburn_kwh": round(sum(v.dayburn_kwh for v in lamps), 3),
            "burning_h": round(sum(v.burning_h for v in lamps), 2),
            "unmeasured_h": round(sum(v.unmeasured_h for v in lamps), 2),
        }


def run(faults: tuple[Fault, ...], days: int = DAYS) -> Result:
    """Every node's packs, interval by interval, through one Health; tick after each."""
    Reporter = _sim("report").Reporter
    health = Health(settings())
    reporters = {node: Reporter(_scenario(node, [f.spec() for f in faults if f.node == node]),
                                INTERVAL_S) for node in NODES}
    res = Result(health=health)
    for n in range(int(days * 86400 / INTERVAL_S) + 1):
        t = START_S + n * INTERVAL_S
        for node, rep in reporters.items():
            pack = rep.pack(n)
            if pack is not None:
                readings = dict(pack[1])
                readings["outbox"] = 0
                res.events += health.feed(node, pack[0], readings)
        res.events += health.tick(t)
    return res


def _first(t0: float, pred: Callable[[float], bool], limit_s: float = 2 * 86400) -> float:
    """The first interval at or after t0 at which pred holds (when a fault can be seen)."""
    t = START_S + -(-(t0 - START_S) // INTERVAL_S) * INTERVAL_S
    while t < t0 + limit_s and not pred(t):
        t += INTERVAL_S
    return t


def _visible(f: Fault, t0: float, ending: bool) -> float:
    """When a fault (or its end) shows in what the node measures."""
    sc = _scenario(f.node, [f.spec()])
    s = settings()
    if f.kind == "dark":
        return _first(t0, lambda t: sc.lamp_on(t) and sc.daylight(t) < s.dark_lx)
    if f.kind in ("degraded", "flicker"):
        return _first(t0, sc.lamp_on)
    if f.kind == "dayburn":
        return _first(t0, lambda t: sc.daylight(t) >= s.day_lx)
    if f.kind == "drain" and not ending:
        return _first(t0, lambda t: sc.battery(t) < s.battery_low_v)
    return _first(t0, lambda t: True)


def judge(res: Result, faults: tuple[Fault, ...]) -> dict[str, Any]:
    """Each expected condition: raised once, cleared once, and how long after it could be
    seen; every other event is a false alarm."""
    expected = {_key(f.node, e): f for f in faults for e in f.expect}
    by_key: dict[Key, list[Event]] = {}
    for e in res.events:
        by_key.setdefault(e.key, []).append(e)
    rows, false = [], []
    for key, f in expected.items():
        evs = by_key.get(key, [])
        up = [e for e in evs if e.status == "firing"]
        down = [e for e in evs if e.status == "resolved"]
        start = START_S + f.from_h * 3600
        end = START_S + f.to_h * 3600
        rows.append({
            "node": f.node, "fault": f"{f.chip}:{f.kind}", "alert": ":".join(key[0::2]).strip(":"),
            "raised": len(up), "cleared": len(down),
            "raise_after_min": (up[0].at - _visible(f, start, False)) / 60 if up else None,
            "clear_after_min": (down[0].at - _visible(f, end, True)) / 60 if down else None,
            "raised_in_fault": bool(up) and start <= up[0].at <= end + 3600,
        })
    for key, evs in by_key.items():
        if key not in expected:
            false += [e for e in evs if e.status == "firing"]
    return {"faults": rows, "false": len(false),
            "false_alarms": [f"{e.alert} {e.node} {e.subject} at {e.at}" for e in false]}


def _minutes(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lantern.agent.health.week",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    faulty = run(FAULTS)
    healthy = run(())
    report = {"faulty_week": {**faulty.summary(), **judge(faulty, FAULTS)},
              "healthy_week": {**healthy.summary(), "false": len(healthy.events)}}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    fw, hw = report["faulty_week"], report["healthy_week"]
    print(f"{len(NODES)} lamps, {DAYS} days at {INTERVAL_S:g} s; raise/clear delays in minutes "
          "after the fault (or its end) shows in what the node measures")
    print(f"{'node':8} {'fault':16} {'alert':32} raised cleared raise+  clear+")
    for r in fw["faults"]:
        print(f"{r['node']:8} {r['fault']:16} {r['alert']:32} {r['raised']:6} {r['cleared']:7} "
              f"{_minutes(r['raise_after_min']):>6} {_minutes(r['clear_after_min']):>6}")
    print(f"faulty week: raised {fw['raised']}, cleared {fw['cleared']}, false {fw['false']}")
    print(f"healthy week: raised {hw['raised']}, cleared {hw['cleared']}, false {hw['false']}")
    for name, w in (("healthy", hw), ("faulty", fw)):
        print(f"{name} week energy: {w['kwh']:.2f} kWh, {w['co2e_kg']:.2f} kg CO2e, "
              f"day-burner waste {w['dayburn_kwh']:.2f} kWh, {w['burning_h']:.1f} burning "
              f"lamp-hours, {w['unmeasured_h']:.1f} h unmeasured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
