"""SPS30 model: start/stop, sleep/wake-up, 1 s measurements as IEEE754 floats, data-ready.

Asleep, the interface is off (datasheet, I2C commands Sleep 0x1001 and Wake-up 0x1103): every
transaction is NACKed, and only a wake-up command twice in a row (the first switches the
interface on and is NACKed as well) brings the sensor back to idle. Sleep is only taken in
idle mode: a driver has to stop the measurement first.

Humid air: particles take up water and scatter as bigger ones, so the mass an optical counter
reports grows with humidity. A street whose aerosol has a hygroscopicity (`sc.aerosol_kappa`,
0 by default: dry) makes the model read its dry mass times `growth()`."""

import errno
import struct

from .scenario import K_CHIP
from .sensirion import SensirionChip, words

_PERIOD_MS = 1000
_DENSITY = 1.65  # dry particle density relative to water


def growth(sc, t):
    """kappa-Koehler mass growth of the street's aerosol at its humidity (1: dry air)."""
    kappa = getattr(sc, "aerosol_kappa", 0)
    if not kappa:
        return 1.0
    aw = min(sc.humidity(t), 99.0) / 100
    return 1 + kappa / _DENSITY * aw / (1 - aw)


class Model(SensirionChip):
    def power_on(self):
        super().power_on()
        self.measuring = False
        self.started = 0
        self.read_k = 0
        self.frozen = None
        self.asleep = False
        self.interface = True

    def write(self, data):
        if self.asleep:
            if len(data) == 2 and (data[0] << 8) | data[1] == 0x1103:
                if self.interface:
                    self.asleep = False
                    self.reply = None
                    return
                self.interface = True
            raise OSError(errno.ENODEV)
        super().write(data)

    def read(self, n):
        if self.asleep:
            raise OSError(errno.ENODEV)
        return super().read(n)

    def _k(self):
        return int((self.sc.chip_ms() - self.started) // _PERIOD_MS) if self.measuring else 0

    def _values(self, k):
        if self.stuck() and self.frozen:
            return self.frozen
        sc = self.sc
        t = sc.t()
        pm25 = sc.pm2_5(t) * growth(sc, t) * (1 + 0.03 * sc.gauss(K_CHIP, 2 * k)) + 0.3 * sc.gauss(
            K_CHIP, 2 * k + 1)
        pm25 = max(0.0, pm25)
        mass = (pm25 * 0.7, pm25, pm25 * 1.15, pm25 * 1.45)
        number = (mass[0] * 6.1, mass[0] * 7.0, pm25 * 7.1, mass[2] * 6.3, mass[3] * 4.5)
        self.frozen = mass + number + (0.61,)
        return self.frozen

    def command(self, cmd, args):
        if cmd == 0x0010:  # start measurement, argument 0x0300 (float format)
            if args != [0x0300] or self.measuring:
                raise OSError(errno.EIO)
            self.measuring = True
            self.started = self.sc.chip_ms()
            self.read_k = 0
            return None
        if cmd == 0x0104:  # stop measurement
            self.measuring = False
            return None
        if cmd == 0x0202:  # read data-ready flag
            return words((1 if self._k() > self.read_k else 0,))
        if cmd == 0x0300:  # read measured values: 10 floats, each as two CRC-protected words
            k = self._k()
            if not self.measuring or k < 1:
                raise OSError(errno.EIO)
            self.read_k = k
            out = []
            for v in self._values(k):
                b = struct.pack(">f", v)
                out.append((b[0] << 8) | b[1])
                out.append((b[2] << 8) | b[3])
            return words(out)
        if cmd == 0x1001:  # sleep: only from idle
            if self.measuring:
                raise OSError(errno.EIO)
            self.asleep = True
            self.interface = False
            return None
        if cmd == 0x1103:  # wake-up while awake: nothing to do
            return None
        if cmd == 0xD100:  # read version: firmware 2.3
            return words((0x0203,))
        if cmd == 0xD304:  # device reset
            self.power_on()
            return None
        raise OSError(errno.EIO)
