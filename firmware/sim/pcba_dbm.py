"""PCB Artists decibel meter model: 8-bit registers, one dB value per TAVG into a 100-deep history.

The module's level is an exponential average in dB, quantised to 1 dB; each TAVG window here
takes the scenario's LAeq plus fluctuation, and MAX follows the loudest event in a window.
"""

import errno

from .bus import Chip
from .scenario import K_CHIP

_REG_TAVG_HIGH = 0x07
_REG_TAVG_LOW = 0x08
_REG_RESET = 0x09
_HISTORY = 0x14
_DEPTH = 100


class Model(Chip):
    def power_on(self):
        self.regs = bytearray(0xB8)
        self.regs[0x00] = 0x31  # VERSION: hardware v3, firmware v1
        n = self.sc.node
        self.regs[0x01:0x05] = bytes(((n >> 24) & 0xFF, (n >> 16) & 0xFF, (n >> 8) & 0xFF,
                                      n & 0xFF))
        self.regs[0x05] = 0xAA
        self.regs[0x06] = 0x02
        self.regs[0x07], self.regs[0x08] = 0x03, 0xE8  # TAVG 1000 ms
        self.regs[0x0D], self.regs[0x0E] = 45, 85
        self.tavg = 1000
        self.ptr = 0
        self.next_k = int(self.sc.chip_ms() // self.tavg) + 1
        self.min = 0
        self.max = 0
        self.down = False  # CONTROL bit 0: powered down, no levels until a reset

    def write(self, data):
        self.ptr = data[0]
        for i, v in enumerate(data[1:]):
            reg = self.ptr + i
            if reg == _REG_RESET:
                if v & 0x08:
                    self.power_on()
                    return
                if v & 0x04:
                    self.regs[_HISTORY:_HISTORY + _DEPTH] = bytes(_DEPTH)
                if v & 0x02:
                    self.min = self.max = 0
            elif reg == 0x06:
                self._catch_up()
                self.regs[reg] = v & 0xFE
                if v & 0x01:
                    self.down = True
            elif reg in (0x05, 0x0D, 0x0E, _REG_TAVG_HIGH):
                self.regs[reg] = v
            elif reg == _REG_TAVG_LOW:
                self.regs[reg] = v
                self._catch_up()
                self.tavg = max(10, (self.regs[_REG_TAVG_HIGH] << 8) | v)
                self.next_k = int(self.sc.chip_ms() // self.tavg) + 1
            else:
                raise OSError(errno.EIO)

    def _catch_up(self):
        """Push one history value per TAVG window completed since the last access."""
        if self.stuck() or self.down:
            return
        now_k = int(self.sc.chip_ms() // self.tavg)
        if now_k < self.next_k:
            return
        first = max(self.next_k, now_k - _DEPTH + 1)
        sc = self.sc
        t_now = sc.t()
        h = self.regs
        for k in range(first, now_k + 1):
            # the scenario time of window k, going back from now at the chip/scenario rate
            t = t_now - (now_k - k) * self.tavg / 1000 * sc.speed / sc.chip_speed
            level = sc.laeq(t) + 1.5 * sc.gauss(K_CHIP, k)
            db = max(30, min(120, int(round(level))))
            peak = max(db, min(120, int(round(level + sc.lmax_excess(k)))))
            h[_HISTORY + 1:_HISTORY + _DEPTH] = h[_HISTORY:_HISTORY + _DEPTH - 1]
            h[_HISTORY] = db
            h[0x0A] = db
            self.max = max(self.max, peak)
            self.min = db if not self.min else min(self.min, db)
        self.next_k = now_k + 1

    def read(self, n):
        self._catch_up()
        self.regs[0x0B] = self.min
        self.regs[0x0C] = self.max
        out = bytes(self.regs[self.ptr:self.ptr + n])
        if len(out) < n:
            raise OSError(errno.EIO)
        self.ptr += n
        return out
