"""Corrections on the node (docs/corrections.md), on CPython with a virtual clock: the humidity
factor, offsets recorded beside the data, bad config survived, flags carried to corrected
values, the SCD4x pressure and ASC commands on the simulated chip, and CO2 compensated in
single-shot mode too (the chip forgets the pressure at power-down)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from node.drivers import scd4x
from node.drivers.corrections import KAPPA, humidity_factor
from node.sampler import CRC, RANGE, STUCK, WARMUP, Sampler
from sim import sensirion

from tests.helpers.clock import VirtualClock, one_chip, street

BOARDS = Path(__file__).resolve().parents[2] / "boards"
MINUTE = 60_000


def board(name: str = "unix-sim") -> dict[str, Any]:
    from node import board as boards

    b = json.loads((BOARDS / f"{name}.json").read_text())
    boards.validate(b)
    return b


def climate_and_pm() -> dict[str, Any]:
    """A BME280 and an SPS30: the correction's two inputs."""
    b = board()
    b["sensors"] = [s for s in b["sensors"] if s["chip"] in ("bme280", "sps30")]
    return b


def sampler(clock: VirtualClock, b: dict[str, Any], log: list[str] | None = None,
            rh: float | None = None, **cfg: Any) -> tuple[Sampler, Any]:
    buses, scale, sc = street(b, clock)
    sc.aerosol_kappa = KAPPA
    if rh is not None:
        sc.humidity = lambda t: rh
    out = [] if log is None else log
    return Sampler(b, buses, scale, log=out.append, cfg=cfg), sc


def test_humidity_factor_is_the_kappa_koehler_mass_growth() -> None:
    assert humidity_factor(0) == 1
    assert humidity_factor(50) == pytest.approx(1 + 0.4 / 1.65)  # aw / (1 - aw) = 1
    assert humidity_factor(90, kappa=0.2) == pytest.approx(1 + 0.2 / 1.65 * 9)
    assert humidity_factor(97.9) > humidity_factor(90) > humidity_factor(70) > 1
    assert humidity_factor(98) is None and humidity_factor(100) is None
    assert humidity_factor(99, rh_max=99.5) is not None


def test_offsets_applied_and_sent_beside_the_data(clock: VirtualClock) -> None:
    s, sc = sampler(clock, climate_and_pm(), rh=60.0,
                    offsets={"temperature": -0.8, "humidity": 3.5})
    for _ in range(2):
        clock.advance(MINUTE)
        v = s.sample_blocking()
    t = sc.t()
    assert v["temperature_offset"] == pytest.approx(-0.8) and v["humidity_offset"] == 3.5
    assert v["temperature"] == pytest.approx(sc.temperature(t) - 0.8, abs=0.1)
    assert v["humidity"] == pytest.approx(63.5, abs=0.5)
    # the raw reading is the sent one minus the offset; the correction used the offset one
    assert v["pm2_5_corr"] == round(v["pm2_5"] / humidity_factor(v["humidity"]))
    assert "LAeq_offset" not in v  # no sound module on this board: nothing to shift


def test_humidity_offset_clipped_to_its_range(clock: VirtualClock) -> None:
    s, _ = sampler(clock, climate_and_pm(), rh=96.0, offsets={"humidity": 6})
    clock.advance(MINUTE)
    v = s.sample_blocking()
    assert v["humidity"] == 100 and v["humidity_offset"] == 6
    assert "pm2_5_corr" not in v and v["pm2_5_corr.q"] & RANGE  # too humid to correct
    assert "pm2_5" in v  # raw kept


def test_bad_correction_config_is_logged_and_left_out(clock: VirtualClock) -> None:
    log: list[str] = []
    s, _ = sampler(clock, climate_and_pm(), log, rh=50.0,
                   offsets={"pressure": 5, "temperature": "warm", "LAeq": True,
                            "humidity": 0},
                   corrections={"kappa": -1, "rh_max": 120})
    assert sum("offsets." in m for m in log) == 3 and sum("corrections." in m for m in log) == 2
    assert any("offsets.pressure" in m and "temperature, humidity, LAeq, LAmax" in m
               for m in log)
    clock.advance(MINUTE)
    v = s.sample_blocking()
    assert not [k for k in v if k.endswith("_offset")]  # a zero offset changes nothing
    assert v["pm2_5_corr"] == round(v["pm2_5"] / humidity_factor(v["humidity"], KAPPA))
    assert "pm_kappa" not in v


def test_a_kappa_of_the_nodes_own_travels_with_the_data(clock: VirtualClock) -> None:
    s, _ = sampler(clock, climate_and_pm(), rh=85.0, corrections={"kappa": 0.2})
    clock.advance(MINUTE)
    v = s.sample_blocking()
    assert v["pm_kappa"] == pytest.approx(0.2)
    assert v["pm10_corr"] == round(v["pm10"] / humidity_factor(v["humidity"], 0.2))


def test_correction_off_sends_raw_only(clock: VirtualClock) -> None:
    s, _ = sampler(clock, climate_and_pm(), rh=85.0, corrections={"pm_humidity": False})
    clock.advance(MINUTE)
    v = s.sample_blocking()
    assert "pm2_5" in v and not [k for k in v if "_corr" in k]


def test_corrected_values_carry_both_inputs_flags(clock: VirtualClock) -> None:
    buses, scale, _ = street(climate_and_pm(), clock,
                             faults=[{"chip": "bme280", "kind": "stuck", "from_h": 0.02}])
    s = Sampler(climate_and_pm(), buses, scale, log=lambda m: None)
    clock.advance(5000)  # a first value, inside the SPS30's 30 s warm-up
    v = s.sample_blocking()
    assert v["pm2_5.q"] & WARMUP and v["pm2_5_corr.q"] & WARMUP
    for _ in range(7):
        clock.advance(MINUTE)
        v = s.sample_blocking()
    assert v["humidity.q"] & STUCK and v["pm2_5_corr.q"] & STUCK and "pm2_5.q" not in v


def test_bus_diagnostics_stay_on_the_raw_reading(clock: VirtualClock) -> None:
    b = climate_and_pm()
    buses, scale, _ = street(b, clock, faults=[{"chip": "sps30", "kind": "crc", "rate": 0.5}])
    s = Sampler(b, buses, scale, log=lambda m: None)
    crc = 0
    for _ in range(12):
        clock.advance(MINUTE)
        v = s.sample_blocking()
        if "pm2_5" in v and v.get("pm2_5.q", 0) & CRC:
            crc += 1  # read on the retry: the value is good, and so is its correction
            assert "pm2_5_corr" in v and not v.get("pm2_5_corr.q", 0) & CRC
    assert crc


def test_no_humidity_no_correction(clock: VirtualClock) -> None:
    b = climate_and_pm()
    b["sensors"] = [x for x in b["sensors"] if x["chip"] == "sps30"]
    s, _ = sampler(clock, b, rh=80.0)
    clock.advance(MINUTE)
    v = s.sample_blocking()
    assert "pm2_5" in v and not [k for k in v if "_corr" in k]


# ---------------------------------------------------------------- SCD4x pressure and ASC


def test_scd4x_pressure_command_on_the_simulated_chip(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("scd4x"), clock)
    sc.node_alt = 800
    drv = scd4x.SCD4X(buses["i2c"])
    assert drv.set_pressure(65000) is False and drv.pressure_hpa is None  # below 700 hPa
    assert drv.set_pressure(120500) is False  # above 1200 hPa
    clock.advance(5000)
    uncompensated = drv.read()["co2"]
    assert drv.set_pressure(sc.pressure(sc.t())) is True
    assert 900 <= drv.pressure_hpa <= 930
    clock.advance(5000)
    compensated = drv.read()["co2"]
    truth = sc.co2(sc.t())
    ratio = sc.pressure(sc.t()) / 101325
    assert abs(uncompensated - truth * ratio) < 30 and abs(compensated - truth) < 30
    assert compensated - uncompensated > 20


def test_scd4x_model_refuses_a_pressure_out_of_range(clock: VirtualClock) -> None:
    from sim import scd4x as model

    _, _, sc = street(one_chip("scd4x"), clock)
    chip = model.Model(sc, "scd4x")
    assert chip.command(0xE000, []) == sensirion.words((1013,))  # 0 m: 1013 hPa
    with pytest.raises(OSError):
        chip.command(0xE000, [650])
    chip.command(0xE000, [920])
    assert chip.command(0xE000, []) == sensirion.words((920,))
    chip.command(0x36E0, [])  # power_down forgets it
    assert chip.ambient_hpa is None


@pytest.mark.parametrize("asc", [True, False, None])
def test_scd4x_asc_option(clock: VirtualClock, asc: bool | None) -> None:
    buses, _, _ = street(one_chip("scd4x"), clock)
    drv = scd4x.SCD4X(buses["i2c"], asc=asc)
    assert drv.asc is asc  # read back from the chip; None: left as it is, not read


def test_co2_compensated_in_single_shot_mode_at_800_m(clock: VirtualClock) -> None:
    b = board()
    b["sensors"] = [s for s in b["sensors"] if s["chip"] in ("bme280", "scd4x")]
    buses, scale, sc = street(b, clock)
    sc.node_alt = 800
    # 10-minute intervals: the SCD41 is powered down between shots (its pressure forgotten)
    s = Sampler(b, buses, scale, log=lambda m: None,
                cfg={"interval_ms": 600_000, "power_down": True})
    errors = []
    for _ in range(8):
        clock.advance(600_000)
        v = s.sample_blocking()
        if "co2" in v:
            errors.append(v["co2"] / sc.co2(sc.t()) - 1)
    slot = next(x for x in s if x.chip == "scd4x")
    assert slot.driver.single and slot.driver.pressure_hpa is not None
    assert len(errors) >= 6
    # the first shot had no pressure yet (the chip assumes sea level): 9 % low
    assert errors[0] < -0.06
    assert all(abs(e) < 0.04 for e in errors[1:]), errors
