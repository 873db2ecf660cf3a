"""PCB Artists I2C sound level meter module (PCBA-DBM), A-weighted: LAeq and LAmax.

Registers from the vendor's programming manual: VERSION 0x00, CONTROL 0x06 (bits 2:1 filter,
01 = A-weighting), TAVG 0x07/0x08 (averaging time in ms, high byte first; writing the low byte
applies it), RESET 0x09 (bit 2 clears the history, bit 1 MIN/MAX), DECIBEL 0x0A, MAX 0x0C,
DBHISTORY 0x14..0x77 (one dB value per TAVG, newest first, 0 = not yet measured).

The module averages in dB (an exponential moving average), so its values are slow-time-weighted
levels, not energy averages; LAeq over the node's interval is computed here as the energy mean
of the history entries since the previous read, LAmax is the MAX register over the same span.
"""

import math

from . import SensorError, bus_error

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_REG_VERSION = const(0x00)
_REG_CONTROL = const(0x06)
_REG_TAVG_HIGH = const(0x07)
_REG_RESET = const(0x09)
_REG_DECIBEL = const(0x0A)
_REG_MAX = const(0x0C)
_REG_HISTORY = const(0x14)
_HISTORY = const(100)
_CONTROL_A = const(0x02)  # A-weighting, no interrupt, powered
_CLEAR = const(0x06)  # clear history and MIN/MAX
_POWER_DOWN = const(0x01)  # CONTROL bit 0
_SYSTEM_RESET = const(0x08)  # RESET bit 3: a reset, which also powers the module up


def leq(levels):
    """Energy-average of dB levels: 10 log10(mean(10^(L/10)))."""
    return 10 * math.log10(sum(math.pow(10, lv / 10) for lv in levels) / len(levels))


class PCBADBM:
    WARMUP_MS = 1000  # "the decibel reading is only valid after about 1 second of power-up"
    PERIOD_MS = 1000
    OVERSAMPLE = 1
    RANGES = {"LAeq": (35, 116), "LAmax": (35, 116)}  # 1 % linearity range, dBA SPL
    PLACES = {"LAeq": 1, "LAmax": 0}  # the module reports whole dB; the average gets 0.1
    STUCK = ()

    def __init__(self, i2c, address=0x48, tavg_ms=1000):
        self.i2c = i2c
        self.address = address
        self.tavg_ms = tavg_ms
        self._where = "pcba_dbm@0x%02x" % address
        self._hist = bytearray(_HISTORY)
        self._one = bytearray(1)
        try:
            self.version = i2c.readfrom_mem(address, _REG_VERSION, 1)[0]
            if not self.version:
                raise SensorError("%s: VERSION register reads 0" % self._where)
        except OSError as e:
            raise bus_error(e, self._where)
        self._configure()

    def _configure(self):
        i2c, address = self.i2c, self.address
        try:
            i2c.writeto_mem(address, _REG_CONTROL, bytes((_CONTROL_A,)))
            # TAVG high byte first: the low byte write applies both
            i2c.writeto_mem(address, _REG_TAVG_HIGH, bytes((self.tavg_ms >> 8,
                                                            self.tavg_ms & 0xFF)))
            i2c.writeto_mem(address, _REG_RESET, bytes((_CLEAR,)))
        except OSError as e:
            raise bus_error(e, self._where)
        self.power = 2

    def sleep(self, deep=True):
        """Power down (90 uA at 3.3 V): no levels are measured until wake()."""
        try:
            self.i2c.writeto_mem(self.address, _REG_CONTROL, bytes((_CONTROL_A | _POWER_DOWN,)))
        except OSError as e:
            raise bus_error(e, self._where)
        self.power = 0

    def wake(self):
        """Reset (which powers the module up), then A-weighting, TAVG, history cleared again:
        LAeq then covers the listening window since the wake-up."""
        try:
            self.i2c.writeto_mem(self.address, _REG_RESET, bytes((_SYSTEM_RESET,)))
        except OSError as e:
            raise bus_error(e, self._where)
        self._configure()

    def read(self):
        """LAeq and LAmax (dB) since the previous read; None if no level is measured yet."""
        h, one = self._hist, self._one
        try:
            self.i2c.readfrom_mem_into(self.address, _REG_HISTORY, h)
            self.i2c.readfrom_mem_into(self.address, _REG_MAX, one)
            lmax = one[0]
            levels = [v for v in h if v]
            if not levels:
                self.i2c.readfrom_mem_into(self.address, _REG_DECIBEL, one)
                if not one[0]:
                    return None
                levels = [one[0]]
            self.i2c.writeto_mem(self.address, _REG_RESET, bytes((_CLEAR,)))
        except OSError as e:
            raise bus_error(e, self._where)
        top = max(levels)
        return {"LAeq": round(leq(levels), 1), "LAmax": lmax if lmax >= top else top}
