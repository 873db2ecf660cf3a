"""Sensirion SPS30 particulate matter sensor on I2C (float output format).

Same framing as every Sensirion I2C chip: 16-bit command words, each 16-bit word sent back is
followed by its CRC-8 (SPS30 datasheet §6). Mass concentrations come as big-endian IEEE754
floats split over two CRC-protected words; only PM1.0..PM10 are read (the master may stop
reading after any word).
"""

import struct
import time

from . import NackError, Sensirion, word

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_CMD_START = const(0x0010)
_CMD_STOP = const(0x0104)
_CMD_DATA_READY = const(0x0202)
_CMD_READ_VALUES = const(0x0300)
_CMD_VERSION = const(0xD100)
_CMD_SLEEP = const(0x1001)  # idle -> sleep: fan, laser and interface off (firmware >= 2.0)
_CMD_WAKE = const(0x1103)  # sleep -> idle
_START_FLOAT = const(0x0300)  # start argument: output format 0x03 (IEEE754 float), 0x00
_START_MS = const(20)  # start/stop execution time
_N_MASS = const(4)  # PM1.0, PM2.5, PM4.0, PM10


class SPS30(Sensirion):
    # Sensirion gives a start-up time of 8 s at high number concentrations and longer at the
    # low ones typical of a street; flag the first 30 s after the fan starts
    WARMUP_MS = 30000
    PERIOD_MS = 1000
    OVERSAMPLE = 1
    RANGES = {"pm1": (0, 1000), "pm2_5": (0, 1000), "pm4": (0, 1000), "pm10": (0, 1000)}
    # 1 ug/m3, the chip's own integer output format; its precision is ±10 ug/m3 (datasheet),
    # so decimals would be noise
    PLACES = {"pm1": 0, "pm2_5": 0, "pm4": 0, "pm10": 0}
    STUCK = ("pm1", "pm2_5", "pm4", "pm10")

    def __init__(self, i2c, address=0x69):
        super().__init__(i2c, address, "sps30", 2 * _N_MASS, with_arg=True)
        self._float = bytearray(4)
        self.power = 2  # measuring (node/sampler.py power states)
        self._wake_up()  # a node back from deep sleep finds the sensor asleep
        v = self._query(_CMD_VERSION, 1)  # probe: firmware major.minor, CRC-checked
        self.version = (v >> 8, v & 0xFF)
        # a node reboot leaves the sensor measuring, and it takes start only when idle
        self._stop()
        self._command(_CMD_START, _START_FLOAT)
        time.sleep_ms(_START_MS)

    def _stop(self):
        try:
            self._command(_CMD_STOP)
        except NackError:  # already idle: nothing to stop
            pass
        time.sleep_ms(_START_MS)

    def _wake_up(self):
        """Datasheet, I2C command Wake-up (0x1103): asleep, the interface is off; the first
        wake-up only switches it on (and is not acknowledged), the second wakes the sensor."""
        for _ in range(2):
            try:
                self._command(_CMD_WAKE)
            except NackError:
                pass
        time.sleep_ms(_START_MS)

    def sleep(self, deep=True):
        """Stop measuring (fan and laser off) and sleep; only an idle sensor takes sleep."""
        self._stop()
        self._command(_CMD_SLEEP)
        self.power = 0

    def wake(self):
        """Wake up and start measuring: the fan needs WARMUP_MS before values are stable."""
        self._wake_up()
        self._command(_CMD_START, _START_FLOAT)
        time.sleep_ms(_START_MS)
        self.power = 2

    def read(self):
        """PM1.0, PM2.5, PM4.0, PM10 in ug/m3; None while no new measurement is ready."""
        if not self._query(_CMD_DATA_READY, 1) & 1:
            return None
        self._query(_CMD_READ_VALUES, 2 * _N_MASS)
        b, f = self._buf, self._float
        out = []
        for i in range(_N_MASS):
            hi, lo = word(b, 2 * i), word(b, 2 * i + 1)
            f[0], f[1], f[2], f[3] = hi >> 8, hi & 0xFF, lo >> 8, lo & 0xFF
            out.append(round(struct.unpack(">f", f)[0], 2))
        return {"pm1": out[0], "pm2_5": out[1], "pm4": out[2], "pm10": out[3]}
