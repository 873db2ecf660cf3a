"""SCD40/SCD41 model: idle/periodic states, 5 s measurements, data-ready, NACK when busy."""

import errno

from .scenario import K_CHIP
from .sensirion import SensirionChip, words

_PERIOD_MS = 5000
_STOP_MS = 500


class Model(SensirionChip):
    def power_on(self):
        super().power_on()
        self.periodic = False
        self.started = 0
        self.busy_until = -1
        self.read_k = 0  # the last measurement index read out
        self.frozen = None

    def _k(self):
        """Index of the latest completed measurement (0: none yet)."""
        return int((self.sc.chip_ms() - self.started) // _PERIOD_MS) if self.periodic else 0

    def _measure(self, k):
        if self.stuck() and self.frozen:
            return self.frozen
        sc = self.sc
        t = sc.t()
        co2 = int(round(sc.co2(t) + 6 * sc.gauss(K_CHIP, 3 * k)))
        temp = sc.temperature(t) + 0.8 + 0.05 * sc.gauss(K_CHIP, 3 * k + 1)  # self-heating
        rh = sc.humidity(t) * 0.95 + 0.3 * sc.gauss(K_CHIP, 3 * k + 2)
        self.frozen = (co2, int((temp + 45) * 65535 / 175), int(max(0, min(100, rh)) * 655.35))
        return self.frozen

    def write(self, data):
        if self.sc.chip_ms() < self.busy_until:
            raise OSError(errno.ENODEV)  # still executing stop_periodic_measurement
        super().write(data)

    def command(self, cmd, args):
        if self.periodic and cmd not in (0xEC05, 0xE4B8, 0x3F86, 0xE000, 0x2427):
            raise OSError(errno.EIO)  # ignored in periodic mode (datasheet §3.5)
        if cmd == 0x21B1:  # start_periodic_measurement
            self.periodic = True
            self.started = self.sc.chip_ms()
            self.read_k = 0
            return None
        if cmd == 0x3F86:  # stop_periodic_measurement
            self.periodic = False
            self.busy_until = self.sc.chip_ms() + _STOP_MS
            return None
        if cmd == 0xE4B8:  # get_data_ready_status: low 11 bits non-zero when ready
            return words((0x8006 if self._k() > self.read_k else 0x8000,))
        if cmd == 0xEC05:  # read_measurement: NACK when the buffer is empty
            k = self._k()
            if k <= self.read_k:
                raise OSError(errno.EIO)
            self.read_k = k
            return words(self._measure(k))
        if cmd == 0x3682:  # get_serial_number
            n = self.sc.node
            return words((0x1F2B, n >> 16, n & 0xFFFF))
        raise OSError(errno.EIO)
