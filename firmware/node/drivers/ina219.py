"""TI INA219 current/power monitor on I2C: the lamp's supply voltage, current and power.

The chip computes current and power itself once the calibration register is set (INA219
datasheet SBOS448, §8.5.1): Cal = trunc(0.04096 / (Current_LSB * R_shunt)),
Current = Shunt * Cal / 4096, Power = Current * Bus / 5000, Power_LSB = 20 * Current_LSB.
"""

from . import SensorError, bus_error, current_lsb, places

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_REG_CONFIG = const(0x00)
_REG_SHUNT = const(0x01)
_REG_BUS = const(0x02)
_REG_POWER = const(0x03)
_REG_CURRENT = const(0x04)
_REG_CAL = const(0x05)
_RESET = const(0x8000)
_POR_CONFIG = const(0x399F)  # the configuration register after a reset
_ADC_12BIT = const(0x3)  # BADC / SADC: 12-bit, 532 us per conversion
_MODE_CONT = const(0x7)  # shunt and bus, continuous
_PGA_MV = (40, 80, 160, 320)  # PG = 0..3: shunt full-scale range


def calibration(lsb, shunt_ohms):
    """Datasheet Equation 1; the register's bit 0 is always 0."""
    cal = int(0.04096 / (lsb * shunt_ohms))
    if not 0 < cal <= 0xFFFE:
        raise ValueError("ina219: calibration %d out of range (lsb %g A, shunt %g ohm)" % (
            cal, lsb, shunt_ohms))
    return cal & 0xFFFE


def config(shunt_mv, bus_max_v):
    """Configuration register: the smallest PGA range that holds the shunt drop, 16/32 V bus."""
    pg = 0
    while pg < 3 and _PGA_MV[pg] < shunt_mv:
        pg += 1
    brng = 1 if bus_max_v > 16 else 0
    return (brng << 13) | (pg << 11) | (_ADC_12BIT << 7) | (_ADC_12BIT << 3) | _MODE_CONT


class INA219:
    WARMUP_MS = 0
    PERIOD_MS = 2  # one shunt + one bus conversion at 12 bits: 2 x 532 us
    OVERSAMPLE = 3
    RANGES = {"lamp_voltage": (0, 26), "lamp_current": (-3.2, 3.2), "lamp_power": (0, 83)}
    STUCK = ()  # a regulated supply can hold its voltage to the LSB

    def __init__(self, i2c, address=0x40, shunt_ohms=0.1, max_current=3.2, lsb=None,
                 bus_max_v=32):
        self.i2c = i2c
        self.address = address
        self._where = "ina219@0x%02x" % address
        self._buf = bytearray(2)
        if shunt_ohms * max_current > 0.32001:
            raise ValueError("ina219: %g A through %g ohm exceeds the 320 mV shunt range" % (
                max_current, shunt_ohms))
        self.lsb = lsb or current_lsb(max_current)
        self.cal = calibration(self.lsb, shunt_ohms)
        self.config = config(max_current * shunt_ohms * 1000, bus_max_v)
        self.RANGES = {"lamp_voltage": (0, 26), "lamp_current": (-max_current, max_current),
                       "lamp_power": (0, 26 * max_current)}
        # bus voltage in 4 mV steps, current in Current_LSB, power in 20 x Current_LSB
        self.PLACES = {"lamp_voltage": 3, "lamp_current": places(self.lsb),
                       "lamp_power": places(20 * self.lsb)}
        self._write(_REG_CONFIG, _RESET)
        if self._read(_REG_CONFIG) != _POR_CONFIG:  # probe: only an INA219 resets to this
            raise SensorError("%s: configuration after reset is not 0x%04x" % (
                self._where, _POR_CONFIG))
        self._write(_REG_CONFIG, self.config)
        self._write(_REG_CAL, self.cal)

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

    def read(self):
        """lamp_voltage (V), lamp_current (A), lamp_power (W)."""
        bus = self._read(_REG_BUS)
        # a power-on reset of the chip alone (brown-out) clears the calibration: restore it
        if self._read(_REG_CAL) != self.cal:
            self._write(_REG_CONFIG, self.config)
            self._write(_REG_CAL, self.cal)
            return None
        current = self._read(_REG_CURRENT)
        if current & 0x8000:
            current -= 0x10000
        power = self._read(_REG_POWER)
        out = {"lamp_voltage": (bus >> 3) * 4 / 1000,
               "lamp_current": round(current * self.lsb, 6),
               "lamp_power": round(power * 20 * self.lsb, 6)}
        if bus & 1:  # OVF: current and power are meaningless (the sampler flags them)
            out["lamp_current"] = out["lamp_power"] = None
        return out
