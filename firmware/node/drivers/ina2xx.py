"""TI INA2xx current/power monitors on I2C: what the INA219 and INA226 drivers share.

A chip is a parameter table (class attributes), its probe and how it reports the bus voltage
and an overflow; `_read`/`_write` (16-bit big-endian registers) are its only bus access. The
chip computes current and power itself once calibrated: Cal = k / (Current_LSB * R_shunt),
Current in Current_LSB, Power in POWER_LSB x Current_LSB.
"""

from . import bus_error, current_lsb, places

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_REG_CONFIG = const(0x00)
_REG_POWER = const(0x03)
_REG_CURRENT = const(0x04)
_REG_CAL = const(0x05)
_RESET = const(0x8000)


def calibration(chip, lsb, shunt_ohms):
    """Datasheet Equation 1: k / (Current_LSB * R_shunt), in the calibration register's range."""
    name, k, cal_max = chip[0], chip[6], chip[7]
    cal = int(k / (lsb * shunt_ohms))
    if not 0 < cal <= cal_max:
        raise ValueError("%s: calibration %d out of range (lsb %g A, shunt %g ohm)" % (
            name, cal, lsb, shunt_ohms))
    return cal & cal_max


class INA2xx:
    """A chip's class gives CHIP, its parameter table: (name, the shunt's full-scale drop in V
    with a little float slack, the same as an error says it, the bus range in V, decimal places
    of the bus voltage's LSB, Power_LSB / Current_LSB, calibration constant k, the calibration
    register's largest value, which is also its mask); `config` (the configuration register);
    and `_start()`: probe the chip (SensorError if it is another), reset and configure it."""

    WARMUP_MS = 0
    OVERSAMPLE = 3
    STUCK = ()  # a regulated supply can hold its voltage to the LSB

    def __init__(self, i2c, address=0x40, shunt_ohms=0.1, max_current=3.2, lsb=None):
        self.i2c = i2c
        self.address = address
        chip = self.CHIP
        self._where = "%s@0x%02x" % (chip[0], address)
        self._buf = bytearray(2)
        if shunt_ohms * max_current > chip[1]:
            raise ValueError("%s: %g A through %g ohm exceeds the %s shunt range" % (
                chip[0], max_current, shunt_ohms, chip[2]))
        self.lsb = lsb or current_lsb(max_current)
        self.cal = calibration(chip, self.lsb, shunt_ohms)
        self.RANGES = {"lamp_voltage": (0, chip[3]),
                       "lamp_current": (-max_current, max_current),
                       "lamp_power": (0, chip[3] * max_current)}
        # bus voltage in its own steps, current in Current_LSB, power in Power_LSB steps
        self.PLACES = {"lamp_voltage": chip[4], "lamp_current": places(self.lsb),
                       "lamp_power": places(chip[5] * self.lsb)}
        self._start()
        self.power = 2

    def _write(self, reg, value):
        b = self._buf
        b[0] = value >> 8
        b[1] = value & 0xFF
        try:
            self.i2c.writeto_mem(self.address, reg, b)
        except OSError as e:
            raise bus_error(e, self._where)

    def _read(self, reg):
        b = self._buf
        try:
            self.i2c.readfrom_mem_into(self.address, reg, b)
        except OSError as e:
            raise bus_error(e, self._where)
        return (b[0] << 8) | b[1]

    def sleep(self, deep=True):
        """Power-down mode (configuration MODE bits 000): INA219 6 uA, INA226 0.5 uA typ."""
        self._write(_REG_CONFIG, self.config & ~7)
        self.power = 0

    def wake(self):
        """Continuous shunt and bus conversions again."""
        self._write(_REG_CONFIG, self.config)
        self.power = 2

    def _reset(self):
        self._write(_REG_CONFIG, _RESET)

    def _configure(self):
        self._write(_REG_CONFIG, self.config)
        self._write(_REG_CAL, self.cal)

    def _calibrated(self):
        """False once a calibration the chip lost (a brown-out of the chip alone) is restored."""
        if self._read(_REG_CAL) == self.cal:
            return True
        self._configure()
        return False

    def _measure(self, volts):
        """The readings, with the chip's current and power read after the bus voltage."""
        current = self._read(_REG_CURRENT)
        if current & 0x8000:
            current -= 0x10000
        power = self._read(_REG_POWER)
        return {"lamp_voltage": volts,
                "lamp_current": round(current * self.lsb, 6),
                "lamp_power": round(power * self.CHIP[5] * self.lsb, 6)}
