"""INA226 model: 2.5 uV shunt and 1.25 mV bus LSBs, CAL/2048, power /20000, ID registers."""

from .ina2xx import INA2xx


class Model(INA2xx):
    POR = {0: 0x4127, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 0, 0xFE: 0x5449, 0xFF: 0x2260}
    WRITABLE = {0: 0x0FFF | 0x4000, 5: 0x7FFF, 6: 0xFC03, 7: 0xFFFF}
    SHUNT_LSB = 2.5e-6
    CAL_DIV = 2048
    POWER_DIV = 20000
    PERIOD_MS = 3

    def store(self, shunt, volts):
        shunt = max(-32768, min(32767, shunt))  # ±81.92 mV full scale
        bus = max(0, min(0x7FFF, int(round(volts / 0.00125))))
        cal = self.regs[5]
        current = shunt * cal // self.CAL_DIV if cal else 0
        power = abs(current) * bus // self.POWER_DIV if cal else 0
        ovf = 0
        if not -32768 <= current <= 32767 or power > 0xFFFF:
            ovf = 0x0004
            current = max(-32768, min(32767, current))
            power = min(0xFFFF, power)
        self.regs[1] = self.s16(shunt)
        self.regs[2] = bus
        self.regs[3] = power
        self.regs[4] = self.s16(current)
        self.regs[6] = (self.regs[6] & 0xFC00) | 0x0008 | ovf  # CVRF conversion ready
