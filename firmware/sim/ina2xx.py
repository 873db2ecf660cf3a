"""INA219 / INA226 models: 16-bit register file, the chip's own current and power arithmetic."""

import errno

from .bus import Chip
from .scenario import K_CHIP


class INA2xx(Chip):
    POR = {}  # register → power-on value
    SHUNT_LSB = 10e-6  # V per count
    CAL_DIV = 4096
    POWER_DIV = 5000
    PERIOD_MS = 2

    def power_on(self):
        self.regs = dict(self.POR)
        self.ptr = 0
        self.k = -1

    def write(self, data):
        self.ptr = data[0]
        if len(data) == 1:
            return
        if len(data) != 3:
            raise OSError(errno.EIO)
        value = (data[1] << 8) | data[2]
        if self.ptr == 0 and value & 0x8000:
            self.power_on()
        elif self.ptr in self.WRITABLE:
            self.regs[self.ptr] = value & self.WRITABLE[self.ptr]

    def read(self, n):
        if self.ptr not in self.regs:
            raise OSError(errno.EIO)
        if self.ptr in (1, 2, 3, 4, 6):
            self._convert()
        v = self.regs[self.ptr]
        return bytes((v >> 8, v & 0xFF))[:n]

    def _convert(self):
        k = int(self.sc.chip_ms() // self.PERIOD_MS)
        if k == self.k or self.stuck() or not self.regs[0] & 7:
            return  # MODE 000: power-down, the result registers keep the last conversion
        self.k = k
        sc = self.sc
        volts, amps = sc.lamp_supply(sc.t())
        volts += 0.005 * sc.gauss(K_CHIP, 2 * k)
        amps += 0.0005 * sc.gauss(K_CHIP, 2 * k + 1)
        shunt = int(round(amps * float(self.options.get("shunt_ohms", 0.1)) / self.SHUNT_LSB))
        self.store(shunt, volts)

    @staticmethod
    def s16(v):
        return v & 0xFFFF


class INA219Model(INA2xx):
    POR = {0: 0x399F, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
    WRITABLE = {0: 0x3FFF, 5: 0xFFFE}

    def store(self, shunt, volts):
        cfg = self.regs[0]
        full = (4000, 8000, 16000, 32000)[(cfg >> 11) & 3]  # PGA range in 10 uV counts
        ovf = 0
        if shunt > full or shunt < -full:
            shunt = full if shunt > 0 else -full
            ovf = 1
        bus_max = 32.0 if cfg & 0x2000 else 16.0
        bus = int(round(min(volts, bus_max) / 0.004))
        cal = self.regs[5]
        current = shunt * cal // self.CAL_DIV if cal else 0
        power = abs(current) * bus // self.POWER_DIV if cal else 0
        if not -32768 <= current <= 32767 or power > 0xFFFF:
            ovf = 1
            current = max(-32768, min(32767, current))
            power = min(0xFFFF, power)
        self.regs[1] = self.s16(shunt)
        self.regs[2] = (bus << 3) | 0x02 | ovf  # CNVR set, OVF
        self.regs[3] = power
        self.regs[4] = self.s16(current)
