"""Sensirion SCD40/SCD41 CO2 sensor (photoacoustic NDIR) on I2C: periodic or single shot.

Commands are 16-bit words; every 16-bit word the chip sends is followed by its CRC-8
(Sensirion datasheet "SCD4x" §3.11). In periodic mode the chip produces one measurement every
5 s; reading before the next one is ready returns None (the sampler flags the reading stale).
Once the sampler manages its power (sleep/wake) the driver switches to the SCD41's single-shot
mode (§3.10): wake() starts one 5 s measurement, read() collects it, sleep() leaves the chip
idle (0.15 mA) or, when the next shot is far enough away, powers it down; after a power-down
the first shot is discarded (§3.10.4), which costs a second shot.

Pressure: the chip converts what it senses (CO2 molecules per volume) to ppm at the pressure it
is told; by default that of its altitude setting (0 m: 1013 hPa). The sampler hands it the
node's own BME280 pressure every interval (set_pressure: set_ambient_pressure, hPa); the chip
takes it while measuring, and in single-shot mode it is sent again before each shot.
Self-calibration (ASC, on from the factory): with the board option "asc" (true/false) the
driver reads the chip's state at start, sets it if it differs and reads it back (`asc`); it
never persists it, so the chip's EEPROM is not worn (docs/corrections.md).
"""

import time

from . import NackError, Sensirion, SensorTimeout, word

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_CMD_START_PERIODIC = const(0x21B1)
_CMD_READ_MEASUREMENT = const(0xEC05)
_CMD_STOP_PERIODIC = const(0x3F86)
_CMD_DATA_READY = const(0xE4B8)
_CMD_SERIAL = const(0x3682)
_STOP_MS = const(500)  # stop_periodic_measurement execution time
_EXEC_MS = const(1)  # execution time of the read commands
_SERIAL_MS = const(1)
_CMD_SINGLE_SHOT = const(0x219D)
_CMD_POWER_DOWN = const(0x36E0)
_CMD_WAKE_UP = const(0x36F6)
_WAKE_MS = const(20)  # wake_up max. command duration (§3.10.4)
_SHOT_MS = const(5000)  # measure_single_shot max. command duration (§3.10.1)
_CMD_AMBIENT_PRESSURE = const(0xE000)  # set (argument) / get ambient pressure, hPa
_CMD_SET_ASC = const(0x2416)  # set_automatic_self_calibration_enabled (idle only)
_CMD_GET_ASC = const(0x2313)  # get_automatic_self_calibration_enabled (idle only)
_P_MIN_HPA = const(700)  # set_ambient_pressure's range
_P_MAX_HPA = const(1200)


def convert(co2, t_raw, rh_raw):
    """Datasheet §3.6.2: T = -45 + 175 * word / (2^16 - 1), RH = 100 * word / (2^16 - 1)."""
    return {"co2": co2, "temperature": round(-45 + 175 * t_raw / 65535, 2),
            "humidity": round(100 * rh_raw / 65535, 2)}


class SCD4X(Sensirion):
    WARMUP_MS = 5000  # the first measurement is ready 5 s after start_periodic_measurement
    PERIOD_MS = 5000
    OVERSAMPLE = 1
    # SCD41's specified range is 400-5000 ppm (SCD40: 400-2000); the output goes to 40000
    RANGES = {"co2": (400, 5000), "temperature": (-10, 60), "humidity": (0, 100)}
    PLACES = {"co2": 0, "temperature": 2, "humidity": 2}  # 1 ppm; 0.0027 °C; 0.0015 %RH
    STUCK = ("co2", "temperature", "humidity")
    # powering down pays once the idle current until the next shot (0.15 mA typ.) costs more
    # than the discarded first shot after wake-up (243 mJ typ. at 3.3 V): 243/3.3/0.15 ms
    SLEEP_AFTER_MS = 491000

    def __init__(self, i2c, address=0x62, asc=None):
        super().__init__(i2c, address, "scd4x", 3, with_arg=True)
        self.pressure_hpa = None  # the ambient pressure the chip compensates for (None: its own)
        self.power = 2
        self.single = False
        self.again_ms = 0  # the sampler waits this long again before the next read
        # A node back from deep sleep may find the chip powered down: wake it (the chip does not
        # acknowledge wake_up). A node reboot leaves the chip measuring, and in periodic mode it
        # ignores everything but a few commands: stop first, then identify it and start again.
        self._wake_up()
        self._command(_CMD_STOP_PERIODIC)
        time.sleep_ms(_STOP_MS)
        self._query(_CMD_SERIAL, 3, _SERIAL_MS)
        b = self._buf
        self.serial = (word(b, 0) << 32) | (word(b, 1) << 16) | word(b, 2)
        self.asc = None  # not read: the factory default is on
        if asc is not None:
            self.asc = bool(self._query(_CMD_GET_ASC, 1, _EXEC_MS))
            if bool(asc) != self.asc:
                self._command(_CMD_SET_ASC, 1 if asc else 0)
                time.sleep_ms(_EXEC_MS)
                self.asc = bool(self._query(_CMD_GET_ASC, 1, _EXEC_MS))
        self._command(_CMD_START_PERIODIC)
        self._last_data = time.ticks_ms()

    def _query(self, cmd, n_words, wait_ms):
        """Send a command, wait its execution time, read n CRC-checked words; the first one."""
        self._command(cmd)
        time.sleep_ms(wait_ms)
        return self._response(n_words)

    def _wake_up(self):
        try:
            self._command(_CMD_WAKE_UP)
        except NackError:
            pass  # never acknowledged (§3.10.4)
        time.sleep_ms(_WAKE_MS)

    def set_pressure(self, pa):
        """Compensate for an ambient pressure of `pa` Pa from now on; False (and ignored)
        outside the command's 700-1200 hPa."""
        hpa = int(pa / 100 + 0.5)
        if not _P_MIN_HPA <= hpa <= _P_MAX_HPA:
            return False
        self.pressure_hpa = hpa
        if not self.single:
            self._send_pressure()
        return True

    def _send_pressure(self):
        self._command(_CMD_AMBIENT_PRESSURE, self.pressure_hpa)
        time.sleep_ms(_EXEC_MS)

    def _shot(self):
        self._command(_CMD_SINGLE_SHOT)
        self._last_data = time.ticks_ms()
        self.power = 2

    def sleep(self, deep=True):
        """Single-shot mode from now on; between shots idle, or powered down if `deep`."""
        if not self.single:
            self._command(_CMD_STOP_PERIODIC)
            time.sleep_ms(_STOP_MS)
            self.single = True
        if deep:
            self._command(_CMD_POWER_DOWN)
            self.power = 0
        else:
            self.power = 1

    def wake(self):
        """Start a single shot (after a power-down: one to discard first)."""
        self.again_ms = 0
        if self.power == 0:
            self._wake_up()
            self.again_ms = _SHOT_MS
        if self.pressure_hpa is not None:
            self._send_pressure()  # not kept across a power-down
        self._shot()

    def read(self):
        """CO2 (ppm), temperature (Cel), humidity (%RH); None until a new measurement is ready."""
        ready = self._query(_CMD_DATA_READY, 1, _EXEC_MS)
        if not ready & 0x07FF:  # the 11 least significant bits are 0 when no data is ready
            # three missed periods mean the chip has stopped measuring (brown-out, reset)
            if time.ticks_diff(time.ticks_ms(), self._last_data) > 3 * self.PERIOD_MS:
                raise SensorTimeout("%s: no measurement for %d ms" % (
                    self._where, 3 * self.PERIOD_MS))
            return None
        self._query(_CMD_READ_MEASUREMENT, 3, _EXEC_MS)
        self._last_data = time.ticks_ms()
        if self.single:
            if self.again_ms:  # the first shot after a power-down: discard it, take another
                self.again_ms = 0
                self._shot()
                return None
            self.power = 1
        b = self._buf
        return convert(word(b, 0), word(b, 1), word(b, 2))
