"""ROHM BH1750FVI ambient light sensor on I2C, continuous high-resolution mode.

The chip has no registers, only opcodes (BH1750FVI datasheet, "Instruction Set Architecture"),
and answers a plain 2-byte read with the latest result: lux = count / 1.2 * (69 / MTreg).
A street sees full sun, so the measurement time register defaults to its minimum (31), which
stretches the range to ~121 klx at 1.85 lx per count.
"""

import time

from . import bus_error

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_POWER_DOWN = const(0x00)
_POWER_ON = const(0x01)
_RESET = const(0x07)  # clears the data register; only valid when powered on
_CONT_HRES = const(0x10)
_MT_HIGH = const(0x40)  # 01000_MT[7:5]
_MT_LOW = const(0x60)  # 011_MT[4:0]
_MT_DEFAULT = const(69)


def convert(count, mtreg=_MT_DEFAULT):
    """Datasheet: lux = count / 1.2, scaled by 69 / MTreg when the measurement time changes."""
    return count / 1.2 * _MT_DEFAULT / mtreg


class BH1750:
    WARMUP_MS = 0
    PERIOD_MS = 180  # maximum H-resolution measurement time at MTreg 69
    OVERSAMPLE = 1
    RANGES = {"illuminance": (0, 100000)}
    PLACES = {"illuminance": 1}  # a count is 0.23-1.85 lx (MTreg 254-31): 0.1 lx
    STUCK = ()  # 0 lx all night is no fault

    def __init__(self, i2c, address=0x23, mtreg=31):
        if not 31 <= mtreg <= 254:
            raise ValueError("bh1750: mtreg must be 31..254, got %d" % mtreg)
        self.i2c = i2c
        self.address = address
        self.mtreg = mtreg
        self._where = "bh1750@0x%02x" % address
        self._buf = bytearray(2)
        self._op = bytearray(1)
        for op in (_POWER_ON, _RESET, _MT_HIGH | (mtreg >> 5), _MT_LOW | (mtreg & 0x1F),
                   _CONT_HRES):
            self._write(op)
        self._started = time.ticks_ms()
        self.power = 2

    def sleep(self, deep=True):
        """Power down (0.01 uA typ.); MTreg is kept."""
        self._write(_POWER_DOWN)
        self.power = 0

    def wake(self):
        """Power on and start continuous H-resolution measurement again."""
        self._write(_POWER_ON)
        self._write(_CONT_HRES)
        self._started = time.ticks_ms()
        self.power = 2

    def _write(self, op):
        self._op[0] = op
        try:
            self.i2c.writeto(self.address, self._op)
        except OSError as e:
            raise bus_error(e, self._where)

    def read(self):
        """Illuminance (lx); None until the first conversion has completed."""
        wait = self.PERIOD_MS * self.mtreg // _MT_DEFAULT
        if time.ticks_diff(time.ticks_ms(), self._started) < wait:
            return None
        try:
            self.i2c.readfrom_into(self.address, self._buf)
        except OSError as e:
            raise bus_error(e, self._where)
        count = (self._buf[0] << 8) | self._buf[1]
        return {"illuminance": round(convert(count, self.mtreg), 1)}
