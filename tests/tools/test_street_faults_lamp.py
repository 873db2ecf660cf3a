"""The simulated street breaks a lamp, leaves one burning at noon, makes one flicker, degrades
one, kills a node and drains a battery — seen through the real drivers on the chip models —
and without faults stays exactly what it was."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from node.drivers import battery, ina219
from sim.report import Reporter
from sim.scenario import Scenario

from lantern import CHECKOUT, FIRMWARE
from tests.helpers.clock import VirtualClock, clock_fixture, one_chip, street

pytestmark = pytest.mark.alerts
__all__ = ["clock_fixture"]

ROOT = Path(CHECKOUT)
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
HOUR_MS = 3_600_000
START_S = 1_780_272_000.0  # a midnight, UTC


def sc(*faults: dict[str, Any], node: str = "SL-0001") -> Scenario:
    return Scenario({"anchor_ms": 1, "start_s": START_S, "faults": list(faults)}, node)


def test_without_street_faults_the_lamp_and_cell_are_unchanged() -> None:
    plain = sc()
    other = sc({"chip": "bme280", "kind": "nack", "from_h": 0, "to_h": 48})
    for i in range(0, 2 * 86400, 97):
        t = START_S + i
        h = plain.hour(t)
        expect = 0.0 if not plain.lamp_on(t) else 36 * (0.6 if h < 5 else 1.0)
        assert plain.lamp_power(t) == expect == other.lamp_power(t)
        assert plain.lamp_burning(t) is plain.lamp_on(t)
        assert plain.battery(t) == other.battery(t) and plain.node_up(t)


def lamp_meter(clock: VirtualClock, *faults: dict[str, Any]) -> tuple[Any, Any]:
    board = one_chip("ina219", options={"shunt_ohms": 0.01, "max_current": 3.2})
    buses, _, scen = street(board, clock, faults=list(faults))
    return ina219.INA219(buses["i2c"], shunt_ohms=0.01, max_current=3.2), scen


def power_at(clock: VirtualClock, drv: Any, hours: float) -> float:
    clock.advance(hours * HOUR_MS)
    out = drv.read()
    return float(out["lamp_power"])


def test_a_broken_lamp_is_dark_at_night(clock: VirtualClock) -> None:
    drv, _ = lamp_meter(clock, {"chip": "lamp", "kind": "dark", "from_h": 20, "to_h": 30})
    assert power_at(clock, drv, 2) > 20  # 02:00, dimmed but burning
    assert power_at(clock, drv, 20.5) < 1  # 22:30: broken
    assert power_at(clock, drv, 24) > 30  # 22:30 the next day: repaired


def test_a_day_burner_burns_at_noon(clock: VirtualClock) -> None:
    drv, _ = lamp_meter(clock, {"chip": "lamp", "kind": "dayburn", "from_h": 10, "to_h": 14})
    assert power_at(clock, drv, 9) < 1
    assert power_at(clock, drv, 3) == pytest.approx(36, abs=0.5)  # noon
    assert power_at(clock, drv, 3) < 1  # 15:00, over


def test_a_degraded_lamp_draws_half(clock: VirtualClock) -> None:
    drv, _ = lamp_meter(clock, {"chip": "lamp", "kind": "degraded", "from_h": 0, "to_h": 99})
    assert power_at(clock, drv, 23) == pytest.approx(18, abs=0.5)


def test_a_flickering_lamp_goes_out_and_strikes_again(clock: VirtualClock) -> None:
    drv, _ = lamp_meter(clock, {"chip": "lamp", "kind": "flicker", "from_h": 21, "to_h": 23})
    clock.advance(21 * HOUR_MS)
    seen = [power_at(clock, drv, 1 / 60) > 20 for _ in range(120)]
    switches = sum(a != b for a, b in itertools.pairwise(seen))
    assert 10 <= switches <= 60 and any(seen) and not all(seen)
    assert power_at(clock, drv, 1) > 20  # 00:00: steady again (dimmed)


def test_a_draining_battery_falls_and_recovers(clock: VirtualClock) -> None:
    board = one_chip("battery", bus="adc")
    buses, _, scen = street(board, clock, faults=[
        {"chip": "battery", "kind": "drain", "from_h": 2, "to_h": 12}])
    drv = battery.Battery(buses["adc"])
    clock.advance(2 * HOUR_MS)
    start = drv.read()["battery"]
    clock.advance(6 * HOUR_MS)
    assert drv.read()["battery"] == pytest.approx(start - 6 * 0.08, abs=0.02)
    clock.advance(4 * HOUR_MS)
    back = drv.read()["battery"]
    assert back == pytest.approx(scen.battery(scen.t()), abs=0.02) and back > 3.7


def test_a_dead_node_is_down_for_its_window() -> None:
    s = sc({"chip": "node", "kind": "dead", "from_h": 1, "to_h": 2})
    assert [s.node_up(START_S + m * 60) for m in (59, 60, 119, 120)] == [True, False, False, True]


@pytest.mark.parametrize(("fault", "message"), [
    ({"chip": "lamp", "kind": "nack"}, "not a lamp fault (dark, dayburn, flicker, degraded)"),
    ({"chip": "node", "kind": "dark"}, "not a node fault (dead)"),
    ({"chip": "bme280", "kind": "drain"}, "'drain' is not one of nack, crc"),
])
def test_a_street_fault_in_the_wrong_place_is_refused(fault: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sc(fault)


def test_a_lamp_fault_needs_a_lamp_meter(clock: VirtualClock) -> None:
    with pytest.raises(ValueError, match=r"sim.faults\[0\]: a lamp fault needs a lamp meter"):
        street(one_chip("bh1750"), clock, faults=[{"chip": "lamp", "kind": "dark"}])
    street(one_chip("bh1750"), clock, faults=[{"chip": "node", "kind": "dead"}])


def test_the_reporters_packs_follow_the_street() -> None:
    r = Reporter(sc(), 300)
    for n in range(0, 288, 7):
        t, v = r.pack(n)
        assert t == START_S + 300 * n
        assert v["temperature"] == pytest.approx(r.sc.temperature(t), abs=0.1)
        volts, amps = r.sc.lamp_supply(t)  # the driver's standby draw included
        assert v["lamp_power"] == pytest.approx(volts * amps, abs=0.1)
        assert v["illuminance"] == pytest.approx(r.sc.daylight(t), rel=0.05, abs=0.2)
        assert not any(k.endswith(".q") for k in v)
    assert r.pack(5) == r.pack(5)  # a pure function of the interval


def test_the_reporter_freezes_flags_and_drops_as_the_node_would() -> None:
    r = Reporter(sc({"chip": "bme280", "kind": "stuck", "from_h": 1, "to_h": 3},
                    {"chip": "sps30", "kind": "unplug", "from_h": 1, "to_h": 2},
                    {"chip": "node", "kind": "dead", "from_h": 4, "to_h": 5}), 300)
    first = r.pack(12)[1]
    for n in range(12, 36):
        v = r.pack(n)[1]
        assert v["temperature"] == first["temperature"] and v["pressure"] == first["pressure"]
        assert v.get("temperature.q") == (8 if n >= 17 else None)
        if n < 24:
            assert "pm2_5" not in v and v["pm2_5.q"] == (416 if n >= 14 else 160)
    assert "pm2_5" in r.pack(24)[1] and "temperature.q" not in r.pack(36)[1]
    assert r.pack(48) is None and r.pack(59) is None and r.pack(60) is not None
    assert math.isfinite(r.pack(60)[1]["battery"])


MP_SCRIPT = """
from sim.scenario import Scenario
from sim.report import Reporter
s = Scenario({"anchor_ms": 1, "start_s": 1780272000, "faults": [
    {"chip": "lamp", "kind": "flicker", "from_h": 20, "to_h": 23},
    {"chip": "lamp", "kind": "degraded", "from_h": 2, "to_h": 4},
    {"chip": "battery", "kind": "drain", "from_h": 1, "to_h": 5},
    {"chip": "bme280", "kind": "stuck", "from_h": 1, "to_h": 3},
    {"chip": "node", "kind": "dead", "from_h": 6, "to_h": 7}]}, "SL-0001")
r = Reporter(s, 300)
for n in range(0, 288, 5):
    p = r.pack(n)
    print(n, None if p is None else " ".join("%s=%.2f" % kv for kv in sorted(p[1].items())))
"""


@pytest.mark.micropython
def test_the_street_faults_and_reporter_agree_on_micropython(tmp_path: Path) -> None:
    script = tmp_path / "street.py"
    script.write_text(MP_SCRIPT)
    assert MICROPYTHON.exists(), "run `make micropython`"
    mp = subprocess.run([str(MICROPYTHON), str(script)], capture_output=True, text=True,
                        env={"MICROPYPATH": f"{FIRMWARE}:{ROOT / '.build/micropython/extmod'}"},
                        timeout=120, check=True).stdout
    head = f"import sys; sys.path.insert(0, {str(FIRMWARE)!r})\n"
    cp = subprocess.run([sys.executable, "-c", head + MP_SCRIPT], capture_output=True,
                        text=True, timeout=120, check=True).stdout
    assert mp.count("\n") == 58 and "None" in mp
    assert mp == cp
