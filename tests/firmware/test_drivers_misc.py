"""BH1750, PMS5003, the PCB Artists sound level module and the battery divider: datasheet
examples, captured frames, and each driver on its simulated chip."""

from __future__ import annotations

import math

import pytest
from node.drivers import CRCError, NackError, SensorTimeout, battery, bh1750, pcba_dbm, pms5003
from sim import pms5003 as pms_model

from tests.helpers.clock import VirtualClock, one_chip, street

# ---------------------------------------------------------------- BH1750


def test_bh1750_datasheet_example() -> None:
    # BH1750FVI datasheet, "Measurement sequence example": High Byte 1000_0011, Low Byte
    # 1001_0000 → (2^15 + 2^9 + 2^8 + 2^7 + 2^4) / 1.2 ≈ 28067 lx
    assert round(bh1750.convert(0b1000_0011_1001_0000)) == 28067
    # a shorter measurement time scales by 69 / MTreg
    assert bh1750.convert(0x8390, 31) == pytest.approx(28066.67 * 69 / 31, rel=1e-6)


def test_bh1750_opcodes_and_values_on_the_simulator(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("bh1750"), clock)
    clock.advance(13 * 3600 * 1000)  # early afternoon: bright
    drv = bh1750.BH1750(buses["i2c"])
    assert drv.read() is None  # first conversion (54 ms at MTreg 31) not done yet
    clock.advance(100)
    lux = drv.read()["illuminance"]
    assert lux == pytest.approx(sc.daylight(sc.t()), rel=0.05)
    assert lux > 20000  # broad daylight
    with pytest.raises(ValueError, match="mtreg"):
        bh1750.BH1750(buses["i2c"], mtreg=20)
    with pytest.raises(NackError, match="bh1750@0x5c"):
        bh1750.BH1750(buses["i2c"], 0x5C)


def test_bh1750_at_night(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("bh1750"), clock)
    clock.advance(2 * 3600 * 1000)
    drv = bh1750.BH1750(buses["i2c"])
    clock.advance(100)
    assert drv.read()["illuminance"] < 5


# ---------------------------------------------------------------- PMS5003

# frames captured from real sensors, published as test data by PyPMS (avaldebe/PyPMS,
# tests/sensors): raw bytes and the PM values the sensor reported
CAPTURED = [
    ("424d001c0005000d00160005000d001602fd00fc001d000f00060006970003c5", (5, 13, 22)),
    ("424d001c003e00540060002a003e0050222309a4014a0028000600056700042c", (42, 62, 80)),
    ("424d001c00000008000b00000008000b00b40039002e001e00000000970002a1", (0, 8, 11)),
]


@pytest.mark.parametrize(("hexframe", "pm"), CAPTURED)
def test_pms5003_captured_frames(hexframe: str, pm: tuple[int, int, int]) -> None:
    frame = bytes.fromhex(hexframe)
    assert pms5003.parse(frame) == {"pm1": pm[0], "pm2_5": pm[1], "pm10": pm[2]}
    bad = bytearray(frame)
    bad[12] ^= 0x10
    with pytest.raises(CRCError, match="checksum"):
        pms5003.parse(bad)


def test_pms5003_commands_carry_their_checksum() -> None:
    # Plantower manual, host protocol: 42 4D CMD DATAH DATAL LRCH LRCL, LRC = sum of the rest
    assert bytes(pms5003.command(0xE2)) == bytes.fromhex("424de200000171")
    assert bytes(pms5003.command(0xE1, 0)) == bytes.fromhex("424de100000170")
    assert bytes(pms5003.command(0xE4, 1)) == bytes.fromhex("424de400010174")
    assert pms_model.frame([5, 13, 22, 5, 13, 22, 765, 252, 29, 15, 6, 6, 0x9700]) == \
        bytes.fromhex(CAPTURED[0][0])


def test_pms5003_passive_mode_on_the_simulator(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("pms5003", bus="uart"), clock)
    clock.advance(8 * 3600 * 1000)  # morning rush hour
    uart = buses["uart"]
    clock.advance(1500)
    assert uart.any()  # active mode after power-on: frames stream unasked
    drv = pms5003.PMS5003(uart)
    clock.advance(5000)
    assert not uart.any()  # passive now: nothing until asked
    out = drv.read()
    assert out["pm2_5"] == pytest.approx(sc.pm2_5(sc.t()), abs=2 + 0.2 * sc.pm2_5(sc.t()))
    assert out["pm1"] <= out["pm2_5"] <= out["pm10"]


def test_pms5003_noisy_line_unplugged_and_back(clock: VirtualClock) -> None:
    faults = [{"chip": "pms5003", "kind": "crc", "from_h": 1, "to_h": 2},
              {"chip": "pms5003", "kind": "unplug", "from_h": 3, "to_h": 4}]
    buses, _, _ = street(one_chip("pms5003", bus="uart"), clock, faults=faults)
    drv = pms5003.PMS5003(buses["uart"])
    clock.advance(1.5 * 3600 * 1000)
    with pytest.raises(CRCError):
        drv.read()
    clock.advance(2 * 3600 * 1000)
    with pytest.raises(SensorTimeout, match="no frame"):
        drv.read()
    clock.advance(1 * 3600 * 1000)
    # plugged back in it starts over in active mode and ignores passive reads: only a new
    # driver (the sampler's rediscovery) puts it back into passive mode
    with pytest.raises(SensorTimeout):
        drv.read()
    assert pms5003.PMS5003(buses["uart"]).read()["pm2_5"] >= 0


def test_pms5003_resynchronises_after_line_noise(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("pms5003", bus="uart"), clock)
    uart = buses["uart"]
    drv = pms5003.PMS5003(uart)
    real_write = uart.write

    def noisy_write(buf: bytes) -> int:
        n = real_write(buf)
        uart._rx[:0] = b"\x00\x42\x17"  # bytes of noise ahead of the reply
        return n

    uart.write = noisy_write
    assert drv.read()["pm10"] >= 0


# ---------------------------------------------------------------- sound level module


def test_leq_is_an_energy_average() -> None:
    assert pcba_dbm.leq([60]) == pytest.approx(60)
    assert pcba_dbm.leq([60, 70]) == pytest.approx(10 * math.log10((1e6 + 1e7) / 2))
    assert pcba_dbm.leq([50] * 99 + [90]) == pytest.approx(70.04, abs=0.01)  # one loud event


def test_pcba_dbm_on_the_simulator(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("pcba_dbm"), clock)
    bus = buses["i2c"]
    drv = pcba_dbm.PCBADBM(bus)
    assert drv.version == 0x31
    assert bus.readfrom_mem(0x48, 0x06, 1) == b"\x02"  # A-weighting
    assert drv.read() is None  # nothing measured in the first averaging period
    levels = []
    for _ in range(8):
        clock.advance(60_000)  # one minute: 60 one-second values in the history
        out = drv.read()
        levels.append(out["LAeq"])
        assert out["LAmax"] >= out["LAeq"]
        assert bus.readfrom_mem(0x48, 0x14, 1) == b"\x00"  # history cleared after the read
    assert sum(levels) / len(levels) == pytest.approx(sc.laeq(sc.t()), abs=2.5)


# ---------------------------------------------------------------- battery


def test_battery_divider(clock: VirtualClock) -> None:
    board = one_chip("battery", bus="adc", options={"divider": 3.0})
    buses, _, sc = street(board, clock)
    drv = battery.Battery(buses["adc"], divider=3.0)
    assert drv.read()["battery"] == pytest.approx(sc.battery(sc.t()), abs=0.02)
