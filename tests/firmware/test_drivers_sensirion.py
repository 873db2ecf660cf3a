"""Sensirion SCD4x and SPS30: the datasheets' CRC and read-out examples, and both drivers on the
simulated chips (idle/periodic states, data-ready, NACK when busy, corrupted words)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from node import drivers
from node.drivers import CRCError, NackError, SensorTimeout, scd4x, sps30
from sim import sensirion

from tests.helpers.clock import VirtualClock, one_chip, street

# CRC-8 examples from the datasheets: 0xBEEF → 0x92 (SCD4x §3.11 / SPS30 §6.2 "CRC-8 example");
# the SPS30 start-measurement argument 0x03 0x00 → 0xAC; SCD4x read_measurement's example reply
# (§3.6.2): 0x01F4 (500 ppm), 0x6667 (25 °C), 0x5EB9 (37 %RH) with CRCs 0x33, 0xA2, 0x3C.
CRC_EXAMPLES = [(b"\xbe\xef", 0x92), (b"\x03\x00", 0xAC), (b"\x01\xf4", 0x33),
                (b"\x66\x67", 0xA2), (b"\x5e\xb9", 0x3C)]
SCD4X_READ_EXAMPLE = bytes.fromhex("01f433" "6667a2" "5eb93c")


@pytest.mark.parametrize(("data", "crc"), CRC_EXAMPLES)
def test_crc8_datasheet_examples(data: bytes, crc: int) -> None:
    assert drivers.crc8(data) == crc
    assert sensirion.crc(data[0], data[1]) == crc  # the simulator's own implementation


def test_word_framing_round_trip() -> None:
    buf = bytearray(9)
    for i, w in enumerate((0x01F4, 0x6667, 0x5EB9)):
        drivers.put_word(buf, i, w)
    assert bytes(buf) == SCD4X_READ_EXAMPLE == bytes(sensirion.words((0x01F4, 0x6667, 0x5EB9)))
    drivers.check_words(buf, 3, "t")
    buf[4] ^= 0x01
    with pytest.raises(CRCError, match="word 1"):
        drivers.check_words(buf, 3, "t")


def test_scd4x_datasheet_read_measurement_example() -> None:
    b = SCD4X_READ_EXAMPLE
    out = scd4x.convert(drivers.word(b, 0), drivers.word(b, 1), drivers.word(b, 2))
    assert out == {"co2": 500, "temperature": 25.0, "humidity": 37.0}


class Recorder:
    """Wraps a bus and records every command word written to it."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.commands: list[int] = []

    def writeto(self, addr: int, buf: Any, stop: bool = True) -> int:
        self.commands.append((buf[0] << 8) | buf[1])
        return int(self.bus.writeto(addr, buf))

    def readfrom_into(self, addr: int, buf: Any, stop: bool = True) -> None:
        self.bus.readfrom_into(addr, buf)


def test_scd4x_on_the_simulator(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("scd4x"), clock)
    bus = Recorder(buses["i2c"])
    drv = scd4x.SCD4X(bus)
    # wake_up (a node back from deep sleep may find it powered down; never acknowledged),
    # stop (a reboot may leave it measuring), 500 ms, serial number, start periodic
    assert bus.commands == [0x36F6, 0x3F86, 0x3682, 0x21B1]
    assert clock.slept >= 500
    assert drv.read() is None  # first measurement only after 5 s
    clock.advance(5000)
    out = drv.read()
    assert abs(out["co2"] - sc.co2(sc.t())) < 40
    assert abs(out["temperature"] - sc.temperature(sc.t()) - 0.8) < 0.5  # self-heating
    assert drv.read() is None  # read out: nothing new until the next period
    clock.advance(5000)
    assert drv.read() is not None


def test_scd4x_reboot_while_measuring_and_busy_nack(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("scd4x"), clock)
    scd4x.SCD4X(buses["i2c"])
    clock.advance(6000)
    again = scd4x.SCD4X(buses["i2c"])  # the node rebooted; the chip kept measuring
    clock.advance(5000)
    assert again.read()["co2"] > 400
    # while stop_periodic_measurement executes (500 ms) the chip does not acknowledge
    buses["i2c"].writeto(0x62, b"\x3f\x86")
    with pytest.raises(NackError):
        again.read()


def test_scd4x_no_data_for_three_periods_is_a_timeout(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("scd4x"), clock)
    drv = scd4x.SCD4X(buses["i2c"])
    clock.advance(6000)
    assert drv.read()
    buses["i2c"].writeto(0x62, b"\x3f\x86")  # measurement stops behind the driver's back
    clock.advance(600)
    assert drv.read() is None
    clock.advance(15000)
    with pytest.raises(SensorTimeout):
        drv.read()


def test_scd4x_corrupted_word_raises_crc_error(clock: VirtualClock) -> None:
    faults = [{"chip": "scd4x", "kind": "crc", "from_h": 0, "to_h": 1}]
    buses, _, _ = street(one_chip("scd4x"), clock, faults=faults)
    with pytest.raises(CRCError, match="scd4x@0x62"):
        scd4x.SCD4X(buses["i2c"])  # the serial number comes back corrupted


def test_sps30_on_the_simulator(clock: VirtualClock) -> None:
    buses, _, sc = street(one_chip("sps30"), clock)
    drv = sps30.SPS30(buses["i2c"])
    assert drv.version == (2, 3)
    assert drv.read() is None  # the first measurement takes a second
    clock.advance(1000)
    out = drv.read()
    assert set(out) == {"pm1", "pm2_5", "pm4", "pm10"}
    expected = sc.pm2_5(sc.t())
    assert abs(out["pm2_5"] - expected) < 0.3 + 0.2 * expected
    assert out["pm1"] < out["pm2_5"] < out["pm4"] < out["pm10"]
    assert drv.read() is None


def test_sps30_start_argument_is_crc_checked(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("sps30"), clock)
    bus = buses["i2c"]
    with pytest.raises(OSError):
        bus.writeto(0x69, b"\x00\x10\x03\x00\xad")  # wrong CRC: the chip NACKs
    bus.writeto(0x69, b"\x00\x10\x03\x00\xac")  # the datasheet's example frame
    with pytest.raises(OSError):
        bus.writeto(0x69, b"\x00\x10\x03\x00\xac")  # already measuring: start is refused
    drv = sps30.SPS30(bus)  # stops first, so a reboot mid-measurement is fine
    clock.advance(1000)
    assert drv.read()["pm10"] > 0


def test_sps30_float_decoding() -> None:
    # mass concentrations are IEEE754 big-endian floats split over two CRC-protected words
    raw = struct.pack(">f", 12.5)
    buf = sensirion.words(((raw[0] << 8) | raw[1], (raw[2] << 8) | raw[3]))
    assert struct.unpack(">f", bytes((buf[0], buf[1], buf[3], buf[4])))[0] == 12.5
