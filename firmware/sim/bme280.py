"""BME280 model: the register map, trimming parameters, and raw ADC values made by inverting
the datasheet's double-precision compensation (§8.1) for the scenario's weather."""

import errno
import struct

from .bus import Chip
from .scenario import K_CHIP

# BMP280 datasheet §3.12 example trimming values for T and P (the BME280 shares them);
# humidity values typical of a production part
T1, T2, T3 = 27504, 26435, -1000
P1, P2, P3, P4, P5, P6, P7, P8, P9 = 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000
H1, H2, H3, H4, H5, H6 = 75, 362, 0, 324, 50, 30
_PERIOD_MS = 10  # normal mode at x1 oversampling, t_standby 0.5 ms


def t_fine(adc_t):
    v1 = (adc_t / 16384.0 - T1 / 1024.0) * T2
    v2 = (adc_t / 131072.0 - T1 / 8192.0) ** 2 * T3
    return v1 + v2


def pressure(adc_p, tf):
    v1 = tf / 2.0 - 64000.0
    v2 = v1 * v1 * P6 / 32768.0
    v2 = v2 + v1 * P5 * 2.0
    v2 = v2 / 4.0 + P4 * 65536.0
    v1 = (P3 * v1 * v1 / 524288.0 + P2 * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * P1
    p = 1048576.0 - adc_p
    p = (p - v2 / 4096.0) * 6250.0 / v1
    return p + (P9 * p * p / 2147483648.0 + p * P8 / 32768.0 + P7) / 16.0


def humidity(adc_h, tf):
    h = tf - 76800.0
    h = (adc_h - (H4 * 64.0 + H5 / 16384.0 * h)) * (
        H2 / 65536.0 * (1.0 + H6 / 67108864.0 * h * (1.0 + H3 / 67108864.0 * h)))
    return h * (1.0 - H1 * h / 524288.0)


def _solve(f, target, lo, hi, rising=True):
    """The integer ADC value whose compensated result is nearest the target (bisection)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (f(mid) < target) == rising:
            lo = mid
        else:
            hi = mid
    return lo if abs(f(lo) - target) <= abs(f(hi) - target) else hi


def calibration_bytes():
    tp = bytearray(26)
    struct.pack_into("<HhhHhhhhhhhh", tp, 0, T1, T2, T3, P1, P2, P3, P4, P5, P6, P7, P8, P9)
    tp[25] = H1
    h = bytearray(7)
    struct.pack_into("<hB", h, 0, H2, H3)
    h[3] = (H4 >> 4) & 0xFF
    h[4] = (H4 & 0x0F) | ((H5 & 0x0F) << 4)
    h[5] = (H5 >> 4) & 0xFF
    struct.pack_into("<b", h, 6, H6)
    return tp, h


class Model(Chip):
    def power_on(self):
        self.regs = bytearray(256)
        tp, h = calibration_bytes()
        self.regs[0x88:0x88 + 26] = tp
        self.regs[0xE1:0xE1 + 7] = h
        self.regs[0xD0] = 0x60
        self.regs[0xF7:0xFF] = b"\x80\x00\x00\x80\x00\x00\x80\x00"  # reset values: no data
        self.ptr = 0
        self.k = -1

    def write(self, data):
        self.ptr = data[0]
        for i in range(0, len(data) - 1, 2):  # register/value pairs (datasheet §6.2.1)
            reg, val = data[i], data[i + 1]
            if reg == 0xE0:
                if val == 0xB6:
                    self.power_on()
            elif reg in (0xF2, 0xF4, 0xF5):
                self.regs[reg] = val
            else:
                raise OSError(errno.EIO)

    def read(self, n):
        if self.ptr <= 0xF7 < self.ptr + n:
            self._convert()
        out = bytes(self.regs[self.ptr:self.ptr + n])
        self.ptr = (self.ptr + n) & 0xFF
        return out

    def _convert(self):
        mode = self.regs[0xF4] & 0x03
        if mode == 0 or self.stuck():
            return
        k = int(self.sc.chip_ms() // _PERIOD_MS)
        if k == self.k:
            return  # reads within one conversion see the same result
        self.k = k
        if mode != 3:
            self.regs[0xF4] &= 0xFC  # forced mode: one conversion, then sleep
        sc = self.sc
        t = sc.t()
        temp = sc.temperature(t) + 0.02 * sc.gauss(K_CHIP, 3 * k)
        press = sc.pressure(t) + 1.5 * sc.gauss(K_CHIP, 3 * k + 1)
        rh = sc.humidity(t) + 0.1 * sc.gauss(K_CHIP, 3 * k + 2)
        adc_t = _solve(t_fine, temp * 5120.0, 0, 0xFFFFF)
        tf = t_fine(adc_t)
        adc_p = _solve(lambda a: pressure(a, tf), press, 0, 0xFFFFF, rising=False)
        adc_h = _solve(lambda a: humidity(a, tf), max(0.0, min(100.0, rh)), 0, 0xFFFF)
        r = self.regs
        if not self.regs[0xF4] >> 5:
            adc_t = 0x80000
        if not (self.regs[0xF4] >> 2) & 0x07:
            adc_p = 0x80000
        if not self.regs[0xF2] & 0x07:
            adc_h = 0x8000
        r[0xF7], r[0xF8], r[0xF9] = adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4
        r[0xFA], r[0xFB], r[0xFC] = adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4
        r[0xFD], r[0xFE] = adc_h >> 8, adc_h & 0xFF
