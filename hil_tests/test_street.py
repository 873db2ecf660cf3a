"""A simulated street through a compressed day: five nodes on MicroPython, every sensor type.

Each node is the real firmware (.mpy, as deployed) on the unix port; its chips are register-level
models in a street process of its own, driven by one seeded scenario running a simulated hour
per real second (the chips' own clocks 60x). Faults are injected per node. Upstream must see
plausible diurnal curves, every injected fault flagged where (and only where) it happened,
every reading delivered bit-exact, and no node may crash.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from lantern.tools.street.sim import SimNode

from .harness.delivery import check_delivery
from .harness.topology import Topology

SPEED = 3600  # simulated seconds per real second: a day in 24 s
CHIP_SPEED = 60
INTERVAL_MS = 250
PACKS = 116  # ~29 simulated hours at 4 packs per simulated hour
MIDNIGHT = 1_750_032_000  # 2025-06-16 00:00 UTC: the scenario starts at midnight
SEED = 11

# node → (board, injected faults); hours are scenario hours since the start (midnight)
PLAN: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "SL-0001": ("unix-sim", [{"chip": "bme280", "kind": "nack", "from_h": 9, "to_h": 11}]),
    "SL-0002": ("unix-sim-pms", [{"chip": "pms5003", "kind": "crc", "from_h": 13, "to_h": 16,
                                  "rate": 0.5}]),
    "SL-0003": ("unix-sim", [{"chip": "sps30", "kind": "unplug", "from_h": 18, "to_h": 21}]),
    "SL-0004": ("unix-sim-pms", [{"chip": "bme280", "kind": "stuck", "from_h": 3, "to_h": 7}]),
    "SL-0005": ("unix-sim", [{"chip": "bus", "kind": "slow", "from_h": 14, "to_h": 15,
                              "rate": 0.3},
                             {"chip": "scd4x", "kind": "crc", "from_h": 5, "to_h": 9,
                              "rate": 0.3}]),
}
# flag bits (docs/measurements.md)
WARMUP, RANGE, STALE, STUCK, CRC, NACK, TIMEOUT, FAILED, ABSENT = (1 << i for i in range(9))
FAULT_BITS = STUCK | CRC | NACK | TIMEOUT | FAILED | ABSENT
ANCHOR_MS = 0  # set when the street starts


@dataclass
class StreetNode(SimNode):
    """A SimNode whose board and scenario come from PLAN."""

    def __post_init__(self) -> None:
        self.board, faults = PLAN[self.node_id]
        self.scenario = {"seed": SEED, "speed": SPEED, "chip_speed": CHIP_SPEED,
                         "anchor_ms": ANCHOR_MS, "start_s": MIDNIGHT, "faults": faults}


def hour(t: float) -> float:
    """Scenario hours since midnight for a pack's base time (whole seconds: ±0.5 h)."""
    return (t + 0.5 - ANCHOR_MS / 1000) * SPEED / 3600


def series(topo: Topology) -> dict[str, dict[str, list[tuple[float, Any]]]]:
    """node → measurement → [(scenario hour, value)] from what arrived upstream."""
    out: dict[str, dict[str, list[tuple[float, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in topo.upstream.readings.values():
        _, _, _, node, name = r["n"].split(":")
        out[node][name].append((hour(r["t"]), r["v"]))
    for per_node in out.values():
        for s in per_node.values():
            s.sort()
    return out


def window(s: list[tuple[float, Any]], lo: float, hi: float) -> list[Any]:
    """Values between two times of day (hours 0-24, wrapping), on any day of the run."""
    return [v for h, v in s if h >= 1 and lo <= h % 24 < hi]


def during(s: list[tuple[float, Any]], lo: float, hi: float) -> list[Any]:
    return [v for h, v in s if lo <= h < hi]


def bits(flags: list[Any]) -> int:
    out = 0
    for f in flags:
        out |= f
    return out


async def test_a_compressed_day_on_a_simulated_street(tmp_path: Path, micropython: Path) -> None:
    global ANCHOR_MS
    # the scenario's midnight is a little after the nodes boot, on a whole second
    ANCHOR_MS = (int(time.time()) + 3) * 1000
    topo = Topology(tmp_path, n_nodes=len(PLAN), interval_ms=INTERVAL_MS, sample_limit=PACKS,
                    node_class=StreetNode)
    try:
        await topo.start()
        await topo.wait_for(lambda: all(len(topo.sampled(n)) == PACKS and not topo.outbox(n)
                                        for n in topo.nodes), 150, "every pack sampled and acked")
        await topo.wait_for(
            lambda: len(topo.upstream.readings) >= sum(sum(topo.sampled(n).values())
                                                       for n in topo.nodes),
            60, "every reading upstream")
        for n in topo.nodes:  # no node crashed, nor its street
            assert n.proc is not None and n.proc.poll() is None, topo.output(n)[-2000:]
            assert n.street is not None and n.street.poll() is None
            assert "Traceback" not in topo.output(n) and "MemoryError" not in topo.output(n)
        check_delivery(topo)  # bit-exact, once, every frame verified with pycose
        data = series(topo)
        heap = {n.node_id: min(v for _, v in data[n.node_id]["heap_free"]) for n in topo.nodes}
        check_curves(data)
        check_faults(data)
        # the leanest moment of any node still leaves room (a MemoryError would be fatal)
        assert min(heap.values()) > 8000, heap
        print(f"\nstreet: {len(topo.upstream.readings)} readings; min heap_free {heap}")
    finally:
        await topo.stop()


def check_curves(data: dict[str, dict[str, list[tuple[float, Any]]]]) -> None:
    names: set[str] = set()
    for node, m in data.items():
        names |= {n for n in m if not n.endswith(".q")}
        last = max(h for h, _ in m["uptime"])
        assert last >= 26, f"{node}: only {last:.1f} simulated hours"
        temp = m["temperature"]
        # warmest mid-afternoon, coolest before dawn; humidity the other way round
        assert mean(window(temp, 12, 17)) - mean(window(temp, 2, 6)) > 4, node
        hottest = max(temp, key=lambda hv: hv[1])[0] % 24
        assert 11 <= hottest <= 18, f"{node}: hottest at {hottest:.1f} h"
        rh = m["humidity"]
        assert mean(window(rh, 2, 6)) - mean(window(rh, 12, 17)) > 10, node
        assert all(90000 < p < 105000 for _, p in m["pressure"])
        lux = m["illuminance"]
        assert max(window(lux, 11, 15)) > 10000 and mean(window(lux, 0, 4)) < 10, node
        lamp = m["lamp_power"]
        # on from dusk to dawn (dimmed after midnight), off by day
        assert mean(window(lamp, 0, 4)) > 15 and mean(window(lamp, 22, 24)) > 30, node
        assert mean(window(lamp, 9, 17)) < 2, node
        for name, ratio in (("pm2_5", 1.5), ("co2", 1.05)):
            rush, night = mean(window(m[name], 7, 9)), mean(window(m[name], 1, 4))
            assert rush > ratio * night, f"{node} {name}: rush {rush:.1f}, night {night:.1f}"
        assert mean(window(m["LAeq"], 7, 9)) - mean(window(m["LAeq"], 1, 4)) > 5, node
        assert all(a >= 35 for _, a in m["LAmax"])
        batt = m["battery"]
        assert all(3.5 < v < 4.3 for _, v in batt)
        assert mean(window(batt, 14, 16)) > mean(window(batt, 5, 7)), node
        for name in ("lamp_voltage", "lamp_current"):
            assert all(isinstance(v, float) and math.isfinite(v) for _, v in m[name])
    assert {"temperature", "humidity", "pressure", "co2", "pm1", "pm2_5", "pm4", "pm10",
            "illuminance", "LAeq", "LAmax", "lamp_voltage", "lamp_current", "lamp_power",
            "battery"} <= names


def check_faults(data: dict[str, dict[str, list[tuple[float, Any]]]]) -> None:
    q = {node: {n[:-2]: s for n, s in m.items() if n.endswith(".q")} for node, m in data.items()}

    def flags(node: str, name: str, lo: float, hi: float) -> int:
        return bits(during(q[node].get(name, []), lo, hi))

    # SL-0001: BME280 not acknowledging 09-11 h: retried, failed, then absent; back after
    assert flags("SL-0001", "temperature", 9, 11) & (NACK | FAILED | ABSENT) == \
        NACK | FAILED | ABSENT
    assert "temperature" not in {n for n, s in q["SL-0001"].items() if during(s, 12, 40)}
    assert during(data["SL-0001"]["temperature"], 12, 13), "BME280 not found again"
    # SL-0002: PMS5003 frames with bad checksums 13-16 h, retried
    assert flags("SL-0002", "pm2_5", 13, 16) & CRC
    # SL-0003: SPS30 unplugged 18-21 h: absent, then found again and warming up anew
    assert flags("SL-0003", "pm2_5", 18.5, 21) & ABSENT
    assert not during(data["SL-0003"]["pm2_5"], 18.5, 20.5)
    assert flags("SL-0003", "pm2_5", 21, 23) & WARMUP
    assert during(data["SL-0003"]["pm2_5"], 21.5, 24), "SPS30 not found again"
    # SL-0004: BME280 frozen 03-07 h
    assert flags("SL-0004", "temperature", 4, 7.5) & STUCK
    # SL-0005: clock stretching on the whole bus 14-15 h; SCD4x CRC errors 05-09 h
    assert bits(flags("SL-0005", n, 14, 15.5) for n in q["SL-0005"]) & TIMEOUT
    assert flags("SL-0005", "co2", 5, 9.5) & CRC
    # nothing else: outside its window (plus an hour of binning) a fault flag is a false alarm
    allowed = {"SL-0001": [("temperature humidity pressure", 8, 12.5)],
               "SL-0002": [("pm1 pm2_5 pm10", 12, 17)],
               "SL-0003": [("pm1 pm2_5 pm4 pm10", 17, 22)],
               # a stuck BME280 rightly marks the PM it corrects stuck too
               "SL-0004": [("temperature humidity pressure pm1_corr pm2_5_corr pm10_corr", 2,
                            8.5)],
               "SL-0005": [("co2", 4, 10), ("*", 13, 16.5)]}
    for node, per in q.items():
        for name, s in per.items():
            stray = [(round(h, 1), f) for h, f in s if f & FAULT_BITS and h >= 1
                     and not any((names == "*" or name in names.split()) and lo <= h < hi
                                 for names, lo, hi in allowed[node])]
            assert not stray, f"{node} {name}: fault flags outside the injected window {stray}"
