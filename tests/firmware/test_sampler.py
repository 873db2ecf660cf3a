"""The sampler on the simulated street: warm-up, median oversampling, every quality flag, one
sensor's failure isolated from the others, and a sensor found again when plugged back in."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from node import drivers, sampler
from node.sampler import (
    ABSENT,
    CRC,
    FAILED,
    NACK,
    RANGE,
    STALE,
    STUCK,
    TIMEOUT,
    WARMUP,
    Sampler,
    flag_names,
)

from tests.helpers.clock import VirtualClock, street

BOARDS = Path(__file__).resolve().parents[2] / "boards"
MINUTE = 60_000


def board(name: str = "unix-sim") -> dict[str, Any]:
    from node import board as boards

    b = json.loads((BOARDS / f"{name}.json").read_text())
    boards.validate(b)
    return b


def run(s: Sampler, clock: VirtualClock, every_ms: int = MINUTE) -> dict[str, Any]:
    clock.advance(every_ms)
    return s.sample_blocking()


def test_flag_bits_are_distinct_and_named() -> None:
    bits = [WARMUP, RANGE, STALE, STUCK, CRC, NACK, TIMEOUT, FAILED, ABSENT]
    assert bits == [1 << i for i in range(9)]
    assert flag_names(CRC | FAILED) == ["crc", "failed"]


def test_full_board_steady_state(clock: VirtualClock) -> None:
    buses, scale, sc = street(board(), clock)
    s = Sampler(board(), buses, scale, log=lambda m: None)
    for _ in range(3):
        v = run(s, clock)
    measured = {k for k in v if not k.endswith(".q")}
    assert measured == {"temperature", "humidity", "pressure", "co2", "pm1", "pm2_5", "pm4",
                        "pm10", "pm1_corr", "pm2_5_corr", "pm4_corr", "pm10_corr",
                        "illuminance", "lamp_voltage", "lamp_current", "lamp_power",
                        "LAeq", "LAmax", "battery"}
    # three minutes in, nothing is warming up, stale or failing
    assert {k: v for k, v in v.items() if k.endswith(".q")} == {}
    t = sc.t()
    assert v["temperature"] == pytest.approx(sc.temperature(t), abs=0.2)
    assert v["co2"] == pytest.approx(sc.co2(t), abs=40)


def test_warm_up_is_flagged_until_the_datasheet_time(clock: VirtualClock) -> None:
    buses, scale, _ = street(board(), clock)
    s = Sampler(board(), buses, scale, log=lambda m: None)
    v = run(s, clock, 1500)
    assert v["pm2_5.q"] == WARMUP and "pm2_5" in v  # SPS30: values, flagged, for 30 s
    assert v["co2.q"] == WARMUP | STALE and "co2" not in v  # SCD4x: nothing before 5 s
    assert "temperature.q" not in v
    v = run(s, clock, 10_000)
    assert "co2" in v and "co2.q" not in v
    assert v["pm2_5.q"] == WARMUP
    v = run(s, clock, 20_000)
    assert "pm2_5.q" not in v


def test_warm_up_runs_on_chip_time(clock: VirtualClock) -> None:
    """A compressed simulated day runs the chips faster too: warm-ups shrink with them."""
    buses, scale, _ = street(board(), clock, chip_speed=60)
    assert scale == 60
    s = Sampler(board(), buses, scale, log=lambda m: None)
    v = run(s, clock, 600)  # 0.6 s real = 36 s of chip time
    assert "pm2_5.q" not in v and "co2" in v


class Scripted:
    """A driver whose readings come from a list (to pin down the sampler's own arithmetic)."""

    WARMUP_MS = 0
    PERIOD_MS = 10
    OVERSAMPLE = 3
    RANGES = {"temperature": (-40, 85)}
    STUCK = ("temperature",)
    PLACES = {"temperature": 1}

    def __init__(self, script: list[Any]) -> None:
        self.script = script

    def read(self) -> Any:
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def scripted(monkeypatch: pytest.MonkeyPatch, script: list[Any]) -> Sampler:
    monkeypatch.setattr(drivers, "open", lambda *a, **k: Scripted(script))
    b = {"name": "t", "hal": "unix", "i2c": {"i2c0": {}},
         "sensors": [{"chip": "bme280", "bus": "i2c0", "measurements": ["temperature"]}]}
    return Sampler(b, {"i2c0": object()}, log=lambda m: None)


def t(v: float) -> dict[str, float]:
    return {"temperature": v}


def f32(v: float) -> float:
    """What a value of one decimal place becomes on the wire (docs/protocol.md §1)."""
    return float(struct.unpack(">f", struct.pack(">f", v))[0])


def test_median_of_the_oversampled_readings(clock: VirtualClock,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    s = scripted(monkeypatch, [t(20.0), t(95.5), t(20.2), t(20.4), t(20.1), t(-3.0)])
    assert s.sample_blocking() == {"temperature": f32(20.2)}  # the spike is out
    assert clock.slept == 2 * Scripted.PERIOD_MS  # readings a conversion apart
    assert s.sample_blocking() == {"temperature": f32(20.1)}


def test_values_are_rounded_to_the_drivers_places(clock: VirtualClock,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    s = scripted(monkeypatch, [t(20.26), t(20.24), t(20.25), t(20.96), t(21.04), t(20.98)])
    v = s.sample_blocking()["temperature"]
    assert v == f32(20.2) and v != 20.2  # 20.25 to one place, half to even; then float32
    v = s.sample_blocking()["temperature"]
    assert v == 21 and type(v) is int  # integral: an int on the wire
    monkeypatch.setattr(Scripted, "PLACES", {})
    s = scripted(monkeypatch, [t(20.26)] * 3)
    assert s.sample_blocking()["temperature"] == f32(20.26)  # no places: float32 only


def test_a_retried_crc_or_nack_is_flagged_with_the_value(
        clock: VirtualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    s = scripted(monkeypatch, [drivers.CRCError("x"), t(20.0), t(20.1), drivers.NackError("x"),
                               t(20.2), t(20.3)])
    assert s.sample_blocking() == {"temperature": f32(20.1), "temperature.q": CRC | NACK}


def test_failing_intervals_then_absent_then_found_again(
        clock: VirtualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    timeout = drivers.SensorTimeout("x")
    s = scripted(monkeypatch, [timeout] * 6 + [t(21.0)] * 3)
    logged: list[str] = []
    s.log = logged.append
    assert s.sample_blocking() == {"temperature.q": TIMEOUT | FAILED}
    assert s.sample_blocking() == {"temperature.q": TIMEOUT | FAILED}
    assert s.sample_blocking() == {"temperature.q": TIMEOUT | FAILED | ABSENT}
    assert s.slots[0].driver is None and len(logged) == 1 and "not answering" in logged[0]
    assert s.sample_blocking() == {"temperature": 21.0}  # re-opened: answering again
    assert "answering again" in logged[1]
    assert s.errors() >= 6


def test_stuck_value_and_range(clock: VirtualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    s = scripted(monkeypatch, [t(20.5)] * 24 + [t(99.0)] * 3 + [{"temperature": None}] * 3)
    flags = [s.sample_blocking().get("temperature.q", 0) for _ in range(8)]
    assert flags == [0, 0, 0, 0, 0, STUCK, STUCK, STUCK]
    assert s.sample_blocking() == {"temperature": 99.0, "temperature.q": RANGE}
    assert s.sample_blocking() == {"temperature.q": RANGE}  # the chip flagged an overflow


def test_stuck_needs_every_watched_output_frozen(
        clock: VirtualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live chip whose temperature holds still but whose pressure moves is not stuck."""
    monkeypatch.setattr(Scripted, "STUCK", ("temperature", "pressure"))
    script = [{"temperature": 20.5, "pressure": 100000.0 + i // 3} for i in range(30)]
    s = scripted(monkeypatch, script)
    assert all("temperature.q" not in s.sample_blocking() for _ in range(10))


def test_a_driver_bug_is_isolated(clock: VirtualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    s = scripted(monkeypatch, [ZeroDivisionError("driver bug")] * 2 + [t(20.0)] * 3)
    assert s.sample_blocking() == {"temperature.q": FAILED}
    assert s.sample_blocking() == {"temperature": 20.0}


def sim_sampler(clock: VirtualClock, faults: list[dict[str, Any]],
                name: str = "unix-sim") -> tuple[Sampler, list[str]]:
    buses, scale, _ = street(board(name), clock, faults=faults)
    logged: list[str] = []
    s = Sampler(board(name), buses, scale, log=logged.append)
    for _ in range(2):
        run(s, clock)
    return s, logged


def hours(h: float) -> int:
    return int(h * 3600 * 1000)


def test_unplugged_sensor_is_isolated_and_found_again(clock: VirtualClock) -> None:
    s, logged = sim_sampler(clock, [{"chip": "sps30", "kind": "unplug", "from_h": 1, "to_h": 2}])
    clock.advance(hours(1) - 2 * MINUTE)
    seen = []
    for _ in range(6):
        v = run(s, clock)
        seen.append(v.get("pm2_5.q", 0))
        assert "temperature" in v and "co2" in v and "lamp_power" in v  # the others go on
        assert "pm2_5" not in v
    assert seen[:2] == [NACK | FAILED, NACK | FAILED]
    assert all(f & (FAILED | ABSENT) == FAILED | ABSENT for f in seen[2:])
    assert sum("not answering" in m for m in logged) == 1  # logged once per outage
    clock.advance(hours(1))
    v = run(s, clock)
    assert any("answering again" in m for m in logged)
    assert v["pm2_5.q"] == WARMUP | STALE  # powered up again: the fan spins up anew
    v = run(s, clock, 1000)
    assert "pm2_5" in v and v["pm2_5.q"] == WARMUP


def test_crc_errors_are_retried_and_flagged(clock: VirtualClock) -> None:
    s, _ = sim_sampler(clock, [{"chip": "scd4x", "kind": "crc", "from_h": 0, "to_h": 5,
                                "rate": 0.3}])
    flags = []
    for _ in range(60):
        v = run(s, clock, 5000)
        flags.append(v.get("co2.q", 0))
    assert any(f == CRC for f in flags), flags  # a corrupted read, retried, value delivered
    # a corrupted read_measurement still empties the chip's buffer, so a retry may find no
    # data (stale) and a run of them a timeout; never a NACK, a range or a stuck flag
    assert not any(f & (NACK | RANGE | STUCK) for f in flags), flags


def test_stuck_chip_is_detected(clock: VirtualClock) -> None:
    s, _ = sim_sampler(clock, [{"chip": "bme280", "kind": "stuck", "from_h": 0.5, "to_h": 9}])
    clock.advance(hours(0.5))
    flags = [run(s, clock).get("temperature.q", 0) for _ in range(8)]
    assert flags[:4] == [0, 0, 0, 0] and flags[-1] == STUCK


def test_slow_bus_times_out(clock: VirtualClock) -> None:
    s, _ = sim_sampler(clock, [{"chip": "bus", "kind": "slow", "from_h": 0, "to_h": 9,
                                "rate": 0.2}])
    flags: dict[str, int] = {}
    for _ in range(10):
        for k, f in run(s, clock).items():
            if k.endswith(".q"):
                flags[k] = flags.get(k, 0) | f
    assert any(f & TIMEOUT for f in flags.values())
    assert not any(f & (CRC | NACK) for f in flags.values())


def test_uart_sensor_board(clock: VirtualClock) -> None:
    s, _ = sim_sampler(clock, [], "unix-sim-pms")
    v = run(s, clock)
    assert {"pm1", "pm2_5", "pm10", "lamp_power", "illuminance"} <= set(v)
    assert "pm2_5.q" not in v


def test_slots_answer_self_tests(clock: VirtualClock) -> None:
    buses, scale, _ = street(board(), clock)
    s = Sampler(board(), buses, scale, log=lambda m: None)
    names = [slot.name for slot in s]
    assert names[0] == "bme280@0x76" and len(s) == 7
    first = next(iter(s))
    assert first.RANGES["temperature"] == (-40, 85)
    assert "temperature" in first.read() and first.raw() and len(first.raw()) == 8  # BME280 data
    assert sampler.STUCK_AFTER == 6
