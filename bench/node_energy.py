"""node_energy: the node's energy budget with the sensors in it, typical schedule against naive.

The real sampler and drivers run on CPython against the simulated street's register-level chip
models, on a virtual clock (tests/helpers/clock.py), for a simulated day per board and
schedule; the charge comes from the board file's current model (docs/sensors.md "Energy") and
what actually ran: which chip was awake, measuring, idle or asleep and for how long, and how
long the microcontroller ran, waited in light sleep or slept deeply.

- typical: climate, light, lamp and noise every 5 min, particulates every 15 min; chips asleep
  between measurements, the MCU in deep sleep between intervals and in light sleep while a
  chip warms up.
- naive: every sensor always on (periodic/continuous modes), no deep sleep, no light sleep.

What the bench cannot see (docs/sensors.md "What only a real board can show"): the boot time
from deep sleep and the node's own work per cycle are the board file's `boot_ms` and AWAKE_MS
below, not measurements.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from lantern import BOARDS, FIRMWARE

if str(FIRMWARE) not in sys.path:
    sys.path.insert(0, str(FIRMWARE))  # the firmware's own package name, as on a board

from tests.helpers.clock import TIMED, VirtualClock

INTERVAL_MS = 5 * 60_000
CADENCE_MS = {"sps30": 15 * 60_000, "pms5003": 15 * 60_000}
CELL_MAH = 3500
# seal + store + send of one pack on the MCU: node_cycle measures ~10-40 ms on the unix port
# (64-bit PC); an ESP32 at 160 MHz is several times slower: 150 ms assumed
AWAKE_MS = 150
BOARDS_RUN = ("esp32-c3-devkitm-1", "esp32-devkitc")


def _board(name: str) -> dict[str, Any]:
    from node import board as boards

    b = json.loads((Path(BOARDS) / f"{name}.json").read_text())
    boards.validate(b, name)
    return dict(b)


def _day(name: str, typical: bool, hours: float, awake_ms: int) -> dict[str, Any]:
    from node.sampler import Sampler
    from sim import street

    board = _board(name)
    clock = VirtualClock()
    saved = {m: importlib.import_module(m).time for m in TIMED}
    for m in TIMED:
        importlib.import_module(m).time = clock  # type: ignore[attr-defined]
    try:
        buses, scale, _ = street.build(board, {}, "SL-0001", wall_ms=int(clock.ms))
        cfg: dict[str, Any] = {"interval_ms": INTERVAL_MS, "cell_mah": CELL_MAH,
                               "link": {"type": "uart"}}
        if typical:
            cfg.update(cadence_ms=CADENCE_MS, power_down=True, deep_sleep=True)
        else:
            cfg.update(power_down=False, deep_sleep=False)
        s = Sampler(board, buses, scale, log=lambda m: None, cfg=cfg,
                    lightsleep=clock.sleep_ms if typical else None)
        cycles = int(hours * 3_600_000 // INTERVAL_MS)
        readings: dict[str, int] = {}
        for _ in range(cycles):
            t0 = clock.ms
            values = s.sample_blocking()
            s.awake(awake_ms)
            for k in values:
                if not k.endswith(".q"):
                    readings[k] = readings.get(k, 0) + 1
            clock.ms = t0 + INTERVAL_MS * s.interval_factor
        e = s.energy()
        assert e is not None
    finally:
        for m, t in saved.items():
            importlib.import_module(m).time = t  # type: ignore[attr-defined]
    return {
        "mah_per_day": round(e["mah_day"], 2),
        "mj_per_interval": round(e["mj_interval"], 1),
        "mj_per_reading": round(e["mj_reading"], 2),
        "days_on_cell": round(e.get("days", 0), 1),
        "intervals": cycles,
        "readings": readings,
        "mj_per_interval_by": {k: round(v, 2) for k, v in sorted(
            e["by"].items(), key=lambda kv: -kv[1])},
    }


def run(hours: float = 24.0, boards: tuple[str, ...] = BOARDS_RUN,
        awake_ms: int = AWAKE_MS) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schedule": {"interval_s": INTERVAL_MS // 1000, "cadence_s": {
            k: v // 1000 for k, v in CADENCE_MS.items()}, "cell_mah": CELL_MAH,
            "awake_ms_per_cycle": awake_ms, "simulated_hours": hours}}
    for name in boards:
        typ = _day(name, True, hours, awake_ms)
        naive = _day(name, False, hours, awake_ms)
        out[name] = {"typical": typ, "naive": naive,
                     "naive_vs_typical": round(naive["mah_per_day"] / typ["mah_per_day"], 1)}
    out["board"] = boards[0]
    return out
