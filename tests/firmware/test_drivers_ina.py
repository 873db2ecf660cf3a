"""INA219 / INA226: the datasheets' configure/measure/calculate examples, register by register,
and both drivers on the simulated lamp supply."""

from __future__ import annotations

from typing import Any

import pytest
from node.drivers import SensorError, current_lsb, ina219, ina226
from sim import ina2xx
from sim.ina226 import Model as INA226Model

from tests.helpers.clock import VirtualClock, one_chip, street


class Regs:
    """Reads the simulated chip's registers directly (what a logic analyser would see)."""

    def __init__(self, model: Any) -> None:
        self.m = model

    def __getitem__(self, reg: int) -> int:
        self.m.write(bytes((reg,)))
        b = self.m.read(2)
        return (b[0] << 8) | b[1]


def test_ina219_datasheet_table_3() -> None:
    """INA219 datasheet (SBOS448) Table 3: 10 A, VCM 12 V, 2 mΩ, 40 mV shunt range, 16 V bus."""
    assert ina219.calibration(0.001, 0.002) == 20480 == 0x5000
    assert ina219.config(20, 16) == 0x019F
    chip = ina2xx.INA219Model(None, "ina219", {"shunt_ohms": 0.002})
    chip._convert = lambda: None  # registers as in the table, no new conversion
    chip.regs[0] = 0x019F
    chip.regs[5] = 0x5000
    chip.store(0x07D0, 11.98)  # shunt register 07D0h (20 mV); bus 11.98 V
    regs = Regs(chip)
    assert regs[2] >> 3 == 0x0BB3 == 2995  # bus register 5D98h without CNVR/OVF
    assert regs[4] == 0x2710  # current register: 10000 → 10.0 A at 1 mA/bit
    assert regs[3] == 0x1766  # power register: 5990 → 119.8 W at 20 mW/bit


def test_ina226_datasheet_table_1() -> None:
    """INA226 datasheet (SBOS547) Table 1: 10 A, VCM 12 V, 2 mΩ."""
    assert ina226.calibration(0.001, 0.002) == 2560 == 0x0A00
    chip = INA226Model(None, "ina226", {"shunt_ohms": 0.002})
    chip._convert = lambda: None
    chip.regs[5] = 0x0A00
    chip.store(0x1F40, 11.98)  # shunt 1F40h (20 mV at 2.5 uV/bit)
    regs = Regs(chip)
    assert regs[2] == 0x2570  # bus: 9584 x 1.25 mV = 11.98 V
    assert regs[4] == 0x2710  # current: 10000 → 10 A
    assert regs[3] == 0x12B8  # power: 4792 x 25 mW = 119.8 W
    assert regs[0xFE] == 0x5449 and regs[0xFF] == 0x2260  # "TI", die id


class TableBus:
    """Serves one chip model at 0x40 with machine.I2C's register methods."""

    def __init__(self, chip: Any) -> None:
        self.chip = chip

    def writeto_mem(self, addr: int, reg: int, buf: Any) -> None:
        self.chip.write(bytes((reg,)) + bytes(buf))

    def readfrom_mem_into(self, addr: int, reg: int, buf: Any) -> None:
        self.chip.write(bytes((reg,)))
        buf[:] = self.chip.read(len(buf))


@pytest.mark.parametrize(("cls", "model", "shunt"), [
    (ina219.INA219, ina2xx.INA219Model, 0x07D0), (ina226.INA226, INA226Model, 0x1F40)])
def test_driver_reads_the_datasheet_example(cls: Any, model: Any, shunt: int) -> None:
    chip = model(None, cls.__name__.lower(), {"shunt_ohms": 0.002})
    kwargs = {"bus_max_v": 16} if cls is ina219.INA219 else {}
    drv = cls(TableBus(chip), 0x40, shunt_ohms=0.002, max_current=10, lsb=0.001, **kwargs)
    chip.store(shunt, 11.98)
    chip._convert = lambda: None  # hold the example's register values
    out = drv.read()
    assert out == {"lamp_voltage": pytest.approx(11.98), "lamp_current": pytest.approx(10.0),
                   "lamp_power": pytest.approx(119.8)}


@pytest.mark.parametrize(("max_current", "lsb"), [(3.2, 100e-6), (2.0, 100e-6), (10, 500e-6),
                                                   (0.6, 20e-6), (15, 500e-6)])
def test_current_lsb_is_the_next_round_value(max_current: float, lsb: float) -> None:
    assert current_lsb(max_current) == pytest.approx(lsb)
    assert current_lsb(max_current) >= max_current / 32768


@pytest.mark.parametrize("chip", ["ina219", "ina226"])
def test_on_the_simulated_lamp(chip: str, clock: VirtualClock) -> None:
    shunt = 0.1 if chip == "ina219" else 0.02
    buses, _, sc = street(one_chip(chip, address=0x40, options={"shunt_ohms": shunt}), clock)
    cls = ina219.INA219 if chip == "ina219" else ina226.INA226
    drv = cls(buses["i2c"], 0x40, shunt_ohms=shunt, max_current=3.2)
    seen_on = seen_off = False
    for _ in range(24):
        clock.advance(3600 * 1000)
        out = drv.read()
        v, i = sc.lamp_supply(sc.t())
        assert out["lamp_voltage"] == pytest.approx(v, abs=0.03)
        assert out["lamp_current"] == pytest.approx(i, abs=0.003)
        assert out["lamp_power"] == pytest.approx(v * i, abs=0.1)
        seen_on |= out["lamp_power"] > 20
        seen_off |= out["lamp_power"] < 1
    assert seen_on and seen_off


def test_ina219_restores_a_lost_calibration(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("ina219", address=0x40), clock)
    drv = ina219.INA219(buses["i2c"], 0x40)
    buses["i2c"].writeto_mem(0x40, 0, b"\x80\x00")  # the chip alone browns out: POR
    assert drv.read() is None  # noticed, calibration written again
    clock.advance(10)
    assert drv.read()["lamp_voltage"] > 20


def test_ina226_probe_checks_the_ids(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("ina219", address=0x40), clock)
    with pytest.raises(SensorError):  # an INA219 has no ID registers
        ina226.INA226(buses["i2c"], 0x40, shunt_ohms=0.02)


@pytest.mark.parametrize(("cls", "limit"), [(ina219.INA219, "320 mV"), (ina226.INA226, "81.92 mV")])
def test_a_shunt_too_big_for_the_current_is_refused(cls: Any, limit: str) -> None:
    with pytest.raises(ValueError, match=limit):
        cls(None, 0x40, shunt_ohms=0.1, max_current=4.0)


def test_ina219_overflow_gives_no_value(clock: VirtualClock) -> None:
    chip = ina2xx.INA219Model(None, "ina219", {"shunt_ohms": 0.1})
    drv = ina219.INA219(TableBus(chip), 0x40, shunt_ohms=0.1, max_current=0.3)  # 40 mV range
    chip.store(3000, 24.0)  # 30 mV... within range
    chip._convert = lambda: None
    assert drv.read()["lamp_current"] == pytest.approx(0.3, abs=0.001)
    chip.store(5000, 24.0)  # 50 mV: beyond the 40 mV range, OVF set
    out = drv.read()
    assert out["lamp_current"] is None and out["lamp_power"] is None
