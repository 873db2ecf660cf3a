"""BME280: Bosch's worked compensation example, the register map, the driver on the simulator."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from node.drivers import NackError, SensorError, bme280
from sim import bme280 as model

from tests.helpers.clock import VirtualClock, one_chip, street

# BMP280 datasheet (BST-BMP280-DS001) §3.12 "Calculating pressure and temperature", worked
# example; the BME280 uses the same trimming parameters and formulas for T and P.
DIG = (27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000)
ADC_T, ADC_P = 519888, 415148
EXAMPLE_T = 25.08  # °C
EXAMPLE_P = 100653.27  # Pa, the datasheet's double-precision result
H_CAL = (75, 362, 0, 324, 50, 30)


def test_datasheet_example_integer_compensation() -> None:
    t, p, _ = bme280.compensate(ADC_T, ADC_P, 0x8000, DIG + H_CAL)
    assert t == 2508  # 0.01 °C
    # the 64-bit integer result (Pa/256) agrees with the double-precision example to 0.02 Pa
    assert abs(p / 256 - EXAMPLE_P) < 0.02


def test_datasheet_example_double_compensation_in_the_simulator() -> None:
    tf = model.t_fine(ADC_T)
    assert round(tf / 5120, 2) == EXAMPLE_T
    assert round(model.pressure(ADC_P, tf), 2) == EXAMPLE_P


def _double_humidity(adc_h: int, adc_t: int) -> float:
    """The datasheet's double-precision humidity formula (§8.1), written out here once more."""
    h1, h2, h3, h4, h5, h6 = H_CAL
    v = model.t_fine(adc_t) - 76800.0
    v = (adc_h - (h4 * 64.0 + h5 / 16384.0 * v)) * (
        h2 / 65536.0 * (1.0 + h6 / 67108864.0 * v * (1.0 + h3 / 67108864.0 * v)))
    v = v * (1.0 - h1 * v / 524288.0)
    return min(100.0, max(0.0, v))


@given(adc_t=st.integers(400000, 600000), adc_h=st.integers(20000, 40000))
def test_integer_humidity_matches_the_double_formula(adc_t: int, adc_h: int) -> None:
    _, _, h = bme280.compensate(adc_t, ADC_P, adc_h, DIG + H_CAL)
    assert abs(h / 1024 - _double_humidity(adc_h, adc_t)) < 0.02


def test_calibration_registers_round_trip() -> None:
    tp, hum = model.calibration_bytes()
    assert bme280.parse_calibration(tp, hum) == DIG + H_CAL
    # dig_H4/dig_H5 share 0xE5 nibble by nibble; negative values keep their sign
    hum = bytearray(hum)
    hum[3], hum[4], hum[5] = 0xF0, 0x8F, 0xFF  # H4 = 0xF0F (-241), H5 = 0xFF8 (-8)
    cal = bme280.parse_calibration(tp, hum)
    assert cal[15] == -241 and cal[16] == -8


class ScriptedI2C:
    """A bus that answers register reads from a dict (the chip's memory) and logs writes."""

    def __init__(self, regs: dict[int, int]) -> None:
        self.regs = regs
        self.writes: list[tuple[int, bytes]] = []

    def readfrom_mem(self, addr: int, reg: int, n: int) -> bytes:
        return bytes(self.regs.get(reg + i, 0) for i in range(n))

    def readfrom_mem_into(self, addr: int, reg: int, buf: bytearray) -> None:
        buf[:] = self.readfrom_mem(addr, reg, len(buf))

    def writeto_mem(self, addr: int, reg: int, data: bytes) -> None:
        self.writes.append((reg, bytes(data)))


def test_datasheet_example_through_the_registers() -> None:
    tp, hum = model.calibration_bytes()
    regs = {0xD0: 0x60}
    regs.update({0x88 + i: b for i, b in enumerate(tp)})
    regs.update({0xE1 + i: b for i, b in enumerate(hum)})
    data = struct.pack(">I", ADC_P << 4)[1:] + struct.pack(">I", ADC_T << 4)[1:] + b"\x80\x00"
    regs.update({0xF7 + i: b for i, b in enumerate(data)})
    bus = ScriptedI2C(regs)
    drv = bme280.BME280(bus)
    # ctrl_hum is written before ctrl_meas (it only takes effect on a ctrl_meas write)
    assert [r for r, _ in bus.writes] == [0xF2, 0xF5, 0xF4]
    assert bus.writes[-1][1] == b"\x27"  # T x1, P x1, normal mode
    out = drv.read()
    assert out["temperature"] == EXAMPLE_T
    assert abs(out["pressure"] - EXAMPLE_P) < 0.025  # reported to 0.01 Pa


def test_no_conversion_yet_reads_none() -> None:
    tp, hum = model.calibration_bytes()
    regs = {0xD0: 0x60, **{0x88 + i: b for i, b in enumerate(tp)},
            **{0xE1 + i: b for i, b in enumerate(hum)},
            0xF7: 0x80, 0xFA: 0x80, 0xFD: 0x80}  # the data registers' reset values
    assert bme280.BME280(ScriptedI2C(regs)).read() is None


def test_wrong_chip_id_is_refused() -> None:
    with pytest.raises(SensorError, match="chip id 0x58"):
        bme280.BME280(ScriptedI2C({0xD0: 0x58}))  # a BMP280


def test_on_the_simulator_tracks_the_scenario(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("bme280"), clock)
    drv = bme280.BME280(buses["i2c"], 0x76)
    for _ in range(8):  # every three hours for a day
        clock.advance(3 * 3600 * 1000)
        out = drv.read()
        t = sc.t()
        assert abs(out["temperature"] - sc.temperature(t)) < 0.1
        assert abs(out["pressure"] - sc.pressure(t)) < 8
        assert abs(out["humidity"] - sc.humidity(t)) < 0.6


def test_second_address_and_absent_chip(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("bme280", address=0x77), clock)
    assert bme280.BME280(buses["i2c"], 0x77).read()["pressure"] > 90000
    with pytest.raises(NackError, match="bme280@0x76"):
        bme280.BME280(buses["i2c"], 0x76)


@settings(max_examples=30, deadline=None)
@given(st.floats(-39, 84), st.floats(5, 95), st.floats(80000, 108000))
def test_simulator_inverse_and_driver_agree(temp: float, rh: float, press: float) -> None:
    """The simulator inverts the double formula; the driver's integers land back on the input."""
    adc_t = model._solve(model.t_fine, temp * 5120.0, 0, 0xFFFFF)
    tf = model.t_fine(adc_t)
    adc_p = model._solve(lambda a: model.pressure(a, tf), press, 0, 0xFFFFF, rising=False)
    adc_h = model._solve(lambda a: model.humidity(a, tf), rh, 0, 0xFFFF)
    t, p, h = bme280.compensate(adc_t, adc_p, adc_h, DIG + H_CAL)
    assert abs(t / 100 - temp) <= 0.011
    assert abs(p / 256 - press) < 0.5
    assert abs(h / 1024 - rh) < 0.05
