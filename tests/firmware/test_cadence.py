"""Cadences, power-down between measurements and a low battery, on the simulated street: the
real sampler and drivers against the chip models' command behaviour (docs/sensors.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from node.drivers import NackError, SensorTimeout, pms5003, scd4x, sps30
from node.sampler import SAVING, WARMUP, Sampler, flag_names

from tests.helpers.clock import VirtualClock, one_chip, street

BOARDS = Path(__file__).resolve().parents[2] / "boards"
FIVE_MIN = 300_000
PM = {"pm1", "pm2_5", "pm4", "pm10"}


def board(name: str = "unix-sim") -> dict[str, Any]:
    from node import board as boards

    b = json.loads((BOARDS / f"{name}.json").read_text())
    boards.validate(b)
    return dict(b)


def typical(**extra: Any) -> dict[str, Any]:
    return {"interval_ms": FIVE_MIN, "cadence_ms": {"sps30": 900_000}, "power_down": True,
            "deep_sleep": True, **extra}


def cycle(s: Sampler, clock: VirtualClock) -> dict[str, Any]:
    t0 = clock.ms
    v = s.sample_blocking()
    clock.ms = t0 + FIVE_MIN * s.interval_factor
    return v


def test_particulates_every_third_interval_climate_every_one(clock: VirtualClock) -> None:
    buses, scale, sc = street(board(), clock)
    s = Sampler(board(), buses, scale, log=lambda m: None, cfg=typical(),
                lightsleep=clock.sleep_ms)
    got = [cycle(s, clock) for _ in range(7)]
    assert [set(v) >= PM for v in got] == [True, False, False, True, False, False, True]
    assert all({"temperature", "co2", "LAeq", "illuminance", "lamp_power", "battery"} <= set(v)
               for v in got)
    # woken just long enough: nothing is flagged warming up, nothing stale or failed
    assert all(k not in v for v in got for k in v if k.endswith(".q")), got
    v = got[-1]
    assert v["pm2_5"] == pytest.approx(sc.pm2_5(sc.t()), abs=2 + 0.2 * v["pm2_5"])


def test_chips_sleep_between_measurements(clock: VirtualClock) -> None:
    b = board()
    buses, scale, _ = street(b, clock)
    s = Sampler(b, buses, scale, log=lambda m: None, cfg=typical(), lightsleep=clock.sleep_ms)
    cycle(s, clock)
    chips = {m.chip: m for m in buses["i2c0"].devices.values()}
    assert chips["sps30"].asleep and not chips["sps30"].measuring
    assert chips["pcba_dbm"].down
    assert chips["bme280"].regs[0xF4] & 3 == 0  # sleep mode
    assert not chips["bh1750"].powered
    assert chips["ina219"].regs[0] & 7 == 0  # power-down mode
    # CO2 every 5 min: idle between shots is cheaper than a discarded shot after power-down
    assert not chips["scd4x"].asleep and not chips["scd4x"].periodic
    by = {sl.chip: sl for sl in s}
    assert by["sps30"].driver.power == 0 and by["scd4x"].driver.power == 1
    # and the time each chip was awake is what the board's current model says it needs
    assert clock.slept >= 31_000


def test_unmanaged_by_default_on_simulated_boards(clock: VirtualClock) -> None:
    buses, scale, _ = street(board(), clock)
    Sampler(board(), buses, scale, log=lambda m: None)
    chips = {m.chip: m for m in buses["i2c0"].devices.values()}
    assert chips["sps30"].measuring and chips["scd4x"].periodic


def test_sps30_asleep_answers_nothing_until_woken_twice(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("sps30"), clock)
    drv = sps30.SPS30(buses["i2c"])
    drv.sleep()
    with pytest.raises(NackError):
        drv.read()  # a driver that forgot to wake the sensor
    with pytest.raises(OSError):
        buses["i2c"].writeto(0x69, b"\x11\x03")  # the first wake-up only turns the interface on
    buses["i2c"].writeto(0x69, b"\x11\x03")  # the second is acknowledged
    buses["i2c"].writeto(0x69, b"\x10\x01")  # idle now: sleep is accepted again...
    with pytest.raises(OSError):
        buses["i2c"].writeto(0x69, b"\x01\x04")  # ...and then nothing answers
    drv = sps30.SPS30(buses["i2c"])  # a node back from deep sleep finds it asleep
    clock.advance(1000)
    assert drv.read()["pm2_5"] >= 0


def test_sps30_refuses_sleep_while_measuring(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("sps30"), clock)
    sps30.SPS30(buses["i2c"])
    with pytest.raises(OSError):
        buses["i2c"].writeto(0x69, b"\x10\x01")  # sleep is only taken in idle mode


def test_scd41_single_shot_and_power_down(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("scd4x"), clock)
    drv = scd4x.SCD4X(buses["i2c"])
    model = buses["i2c"].devices[0x62]
    drv.sleep(deep=True)
    assert model.asleep and drv.power == 0
    with pytest.raises(NackError):
        drv.read()  # powered down: nothing answers
    drv.wake()
    assert drv.again_ms == 5000  # the first shot after waking is to be discarded
    clock.advance(5000)
    assert drv.read() is None  # discarded; a second shot is running
    clock.advance(5000)
    out = drv.read()
    assert abs(out["co2"] - sc.co2(sc.t())) < 40
    assert model.shots == 2 and drv.power == 1


def test_scd41_first_shot_after_wake_reads_high_in_the_model(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("scd4x"), clock)
    drv = scd4x.SCD4X(buses["i2c"])
    drv.sleep(deep=True)
    drv.wake()
    drv.again_ms = 0  # a driver that keeps the first shot
    clock.advance(5000)
    assert drv.read()["co2"] - sc.co2(sc.t()) > 100


def test_pms5003_asleep_gives_no_frame(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("pms5003", bus="uart"), clock)
    drv = pms5003.PMS5003(buses["uart"])
    drv.sleep()
    with pytest.raises(SensorTimeout):
        drv.read()
    drv.wake()
    assert drv.read()["pm2_5"] >= 0


def test_low_battery_lowers_the_cadence_and_says_so(clock: VirtualClock) -> None:
    b = board()
    buses, scale, _ = street(b, clock)
    logged: list[str] = []
    low = {"low_v": 4.5, "critical_v": 3.0, "low_factor": 3}  # the simulated cell is ~3.7-4.1 V
    s = Sampler(b, buses, scale, log=logged.append, cfg=typical(battery_low=low),
                lightsleep=clock.sleep_ms)
    v = cycle(s, clock)
    assert s.interval_factor == 3
    assert v["battery.q"] == SAVING and flag_names(SAVING) == ["saving"]
    assert any("cadence divided by 3" in m for m in logged)
    t0 = clock.ms
    got = [cycle(s, clock) for _ in range(4)]
    # each interval is now 15 min (the node waits interval_factor intervals), particulates
    # still every third interval: every 45 min
    assert clock.ms - t0 == 4 * 3 * FIVE_MIN
    assert all("temperature" in v for v in got)
    assert [set(v) >= PM for v in got] == [False, False, True, False]
    assert all("battery" in v and v["battery.q"] & SAVING for v in got)
    s.low = {"low_v": 3.0}  # charged again (a lamp night): back to normal
    v = cycle(s, clock)
    assert s.interval_factor == 1 and "battery.q" not in v
    assert not v.get("temperature.q", 0) & WARMUP


def test_lamp_powered_cell_runs_low_by_evening_and_the_node_saves(clock: VirtualClock) -> None:
    """The lamp charges the cell at night; by late afternoon it is low and the node slows."""
    b = board()
    buses, scale, sc = street(b, clock, supply="lamp")
    t = sc.t()  # midnight: the lamp is on and charging
    assert sc.lamp_on(t) and sc.battery(t + 4 * 3600) > sc.battery(t)
    assert sc.battery(t + 17 * 3600) < sc.battery(t + 8 * 3600)  # drained through the day
    low = {"low_v": 3.75, "critical_v": 3.5}
    s = Sampler(b, buses, scale, log=lambda m: None, cfg=typical(battery_low=low),
                lightsleep=clock.sleep_ms)
    saving = []
    while clock.ms - 1_764_288_000_000 < 24 * 3_600_000:
        v = cycle(s, clock)
        saving.append(bool(v.get("battery.q", 0) & SAVING))
    # normal at night and in the morning, saving in the afternoon, normal again after dusk
    assert not saving[0] and any(saving) and not saving[-1]

