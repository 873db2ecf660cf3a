"""BH1750FVI model: opcodes only, continuous/one-time modes, MTreg, a 2-byte result."""

import errno

from .bus import Chip
from .scenario import K_CHIP


class Model(Chip):
    def power_on(self):
        self.powered = False
        self.mode = 0
        self.mt = 69
        self.since = 0
        self.count = 0
        self.k = -1

    def write(self, data):
        for op in data:
            if op == 0x00:
                self.powered = False
            elif op == 0x01:
                self.powered = True
            elif op == 0x07:
                if not self.powered:
                    raise OSError(errno.EIO)  # reset is not accepted in power-down
                self.count = 0
            elif op in (0x10, 0x11, 0x13, 0x20, 0x21, 0x23):
                self.powered = True
                self.mode = op
                self.since = self.sc.chip_ms()
                self.k = -1
            elif op & 0xF8 == 0x40:
                self.mt = (self.mt & 0x1F) | ((op & 0x07) << 5)
            elif op & 0xE0 == 0x60:
                self.mt = (self.mt & 0xE0) | (op & 0x1F)
            else:
                raise OSError(errno.EIO)

    def _period(self):
        base = 16 if self.mode & 0x03 == 0x03 else 120  # L-resolution / H-resolution, typical
        return base * self.mt / 69

    def read(self, n):
        if self.mode and self.powered and not self.stuck():
            k = int((self.sc.chip_ms() - self.since) // self._period())
            if k >= 1 and k != self.k:
                self.k = k
                sc = self.sc
                lux = sc.daylight(sc.t()) * (1 + 0.01 * sc.gauss(K_CHIP, k))
                count = lux * 1.2 * self.mt / 69
                if self.mode & 0x03 == 0x01:
                    count *= 2  # H-resolution mode 2: half-lux steps
                self.count = max(0, min(0xFFFF, int(count)))
                if self.mode & 0x20:  # one-time modes power down after the measurement
                    self.mode = 0
                    self.powered = False
        return bytes((self.count >> 8, self.count & 0xFF))[:n]
