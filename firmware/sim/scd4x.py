"""SCD40/SCD41 model: idle/periodic/single-shot/power-down states, 5 s measurements, data-ready,
NACK when busy or asleep (datasheet §3.5, §3.10).

Powered down, the chip NACKs everything; wake_up wakes it and is itself not acknowledged. The
first single shot after a wake-up reads high (the datasheet says to discard it): a driver that
keeps it reports CO2 off by _FIRST_SHOT_PPM.

Pressure: the chip senses CO2 molecules per volume, which scale with the air's pressure, and
reports ppm at the pressure it compensates for: the one set_ambient_pressure (0xE000) gave it,
else the one of its altitude setting (0x2427, 0 m by default). So a chip that is not told
reads the street's CO2 times p_street / p_assumed: 9 % low at 800 m. Both settings are RAM
(lost at power-down and power-on). ASC state: 0x2313 / 0x2416, on from the factory."""

import errno

from .scenario import K_CHIP
from .sensirion import SensirionChip, words

_PERIOD_MS = 5000
_STOP_MS = 500
_SHOT_MS = 5000
_WAKE_MS = 20
_FIRST_SHOT_PPM = 150


def altitude_hpa(metres):
    """The pressure the chip assumes at an altitude (the standard atmosphere's), hPa."""
    return 1013.25 * (1 - 2.25577e-5 * metres) ** 5.25588


class Model(SensirionChip):
    def power_on(self):
        super().power_on()
        self.periodic = False
        self.started = 0
        self.busy_until = -1
        self.read_k = 0  # the last measurement index read out
        self.frozen = None
        self.asleep = False
        self.shot_at = None  # chip ms when the single shot in progress completes
        self.shots = 0
        self.fresh = False  # the next shot is the first after a wake-up
        self.ambient_hpa = None  # set_ambient_pressure (RAM)
        self.altitude = 0  # set_sensor_altitude (RAM here; the chip could persist it)
        self.asc = True

    def _shot_ready(self):
        return self.shot_at is not None and self.sc.chip_ms() >= self.shot_at

    def _k(self):
        """Index of the latest completed measurement (0: none yet)."""
        return int((self.sc.chip_ms() - self.started) // _PERIOD_MS) if self.periodic else 0

    def _measure(self, k):
        if self.stuck() and self.frozen:
            return self.frozen
        sc = self.sc
        t = sc.t()
        assumed = self.ambient_hpa or altitude_hpa(self.altitude)
        co2 = int(round(sc.co2(t) * sc.pressure(t) / 100 / assumed + 6 * sc.gauss(K_CHIP, 3 * k)))
        temp = sc.temperature(t) + 0.8 + 0.05 * sc.gauss(K_CHIP, 3 * k + 1)  # self-heating
        rh = sc.humidity(t) * 0.95 + 0.3 * sc.gauss(K_CHIP, 3 * k + 2)
        self.frozen = (co2, int((temp + 45) * 65535 / 175), int(max(0, min(100, rh)) * 655.35))
        return self.frozen

    def write(self, data):
        if self.asleep:
            if len(data) == 2 and (data[0] << 8) | data[1] == 0x36F6:
                self.asleep = False
                self.fresh = True
                self.busy_until = self.sc.chip_ms() + _WAKE_MS
            raise OSError(errno.ENODEV)  # asleep; wake_up itself is never acknowledged
        if self.sc.chip_ms() < self.busy_until:
            raise OSError(errno.ENODEV)  # still executing stop_periodic_measurement
        if self.shot_at is not None and not self._shot_ready():
            raise OSError(errno.ENODEV)  # busy with a single shot
        super().write(data)

    def read(self, n):
        if self.asleep:
            raise OSError(errno.ENODEV)
        return super().read(n)

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
        if cmd == 0x219D:  # measure_single_shot (SCD41), from idle
            self.shots += 1
            self.shot_at = self.sc.chip_ms() + _SHOT_MS
            return None
        if cmd == 0x36E0:  # power_down, from idle
            self.asleep = True
            self.shot_at = None
            self.ambient_hpa = None
            return None
        if cmd == 0xE000:  # set_ambient_pressure (hPa), also while measuring; or get it
            if not args:
                return words((self.ambient_hpa or int(altitude_hpa(self.altitude) + 0.5),))
            if not 700 <= args[0] <= 1200:
                raise OSError(errno.EIO)
            self.ambient_hpa = args[0]
            return None
        if cmd == 0x2427 and args:  # set_sensor_altitude (m)
            self.altitude = args[0]
            return None
        if cmd == 0x2313:  # get_automatic_self_calibration_enabled
            return words((1 if self.asc else 0,))
        if cmd == 0x2416 and args:  # set_automatic_self_calibration_enabled
            self.asc = bool(args[0])
            return None
        if cmd == 0xE4B8:  # get_data_ready_status: low 11 bits non-zero when ready
            ready = self._k() > self.read_k or self._shot_ready()
            return words((0x8006 if ready else 0x8000,))
        if cmd == 0xEC05 and self._shot_ready():  # the single shot's result, once
            self.shot_at = None
            co2, t, rh = self._measure(1000000 + self.shots)
            if self.fresh:
                self.fresh = False
                co2 += _FIRST_SHOT_PPM
            return words((co2, t, rh))
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
