"""TI INA226 current/power monitor on I2C (36 V bus): the lamp's voltage, current and power.

Like the INA219 the chip scales current and power itself once calibrated (INA226 datasheet
SBOS547, §6.5.1): CAL = 0.00512 / (Current_LSB * R_shunt), Current = Shunt * CAL / 2048,
Power = Current * Bus / 20000, Power_LSB = 25 * Current_LSB, bus LSB 1.25 mV.
"""

from . import SensorError, bus_error, current_lsb, places

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_REG_CONFIG = const(0x00)
_REG_BUS = const(0x02)
_REG_POWER = const(0x03)
_REG_CURRENT = const(0x04)
_REG_CAL = const(0x05)
_REG_MASK = const(0x06)
_REG_MANUFACTURER = const(0xFE)
_REG_DIE = const(0xFF)
_MANUFACTURER_TI = const(0x5449)  # "TI"
_DIE_ID = const(0x2260)
_RESET = const(0x8000)
# averages 1, bus and shunt conversion 1.1 ms, shunt and bus continuous: the reset value
_CONFIG = const(0x4127)
_OVF = const(0x0004)  # Mask/Enable: math overflow


def calibration(lsb, shunt_ohms):
    """Datasheet Equation 1; bit 15 of the register is reserved."""
    cal = int(0.00512 / (lsb * shunt_ohms))
    if not 0 < cal <= 0x7FFF:
        raise ValueError("ina226: calibration %d out of range (lsb %g A, shunt %g ohm)" % (
            cal, lsb, shunt_ohms))
    return cal


class INA226:
    WARMUP_MS = 0
    PERIOD_MS = 3  # one shunt + one bus conversion: 2 x 1.1 ms
    OVERSAMPLE = 3
    STUCK = ()  # a regulated supply can hold its voltage to the LSB

    def __init__(self, i2c, address=0x40, shunt_ohms=0.1, max_current=3.2, lsb=None):
        self.i2c = i2c
        self.address = address
        self._where = "ina226@0x%02x" % address
        self._buf = bytearray(2)
        if shunt_ohms * max_current > 0.08193:
            raise ValueError("ina226: %g A through %g ohm exceeds the 81.92 mV shunt range" % (
                max_current, shunt_ohms))
        self.lsb = lsb or current_lsb(max_current)
        self.cal = calibration(self.lsb, shunt_ohms)
        self.RANGES = {"lamp_voltage": (0, 36), "lamp_current": (-max_current, max_current),
                       "lamp_power": (0, 36 * max_current)}
        # bus voltage in 1.25 mV steps, current in Current_LSB, power in 25 x Current_LSB
        self.PLACES = {"lamp_voltage": 5, "lamp_current": places(self.lsb),
                       "lamp_power": places(25 * self.lsb)}
        if self._read(_REG_MANUFACTURER) != _MANUFACTURER_TI or self._read(_REG_DIE) != _DIE_ID:
            raise SensorError("%s: not an INA226 (manufacturer/die id)" % self._where)
        self._write(_REG_CONFIG, _RESET)
        self._write(_REG_CONFIG, _CONFIG)
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
        if self._read(_REG_CAL) != self.cal:  # a brown-out of the chip alone cleared it
            self._write(_REG_CONFIG, _CONFIG)
            self._write(_REG_CAL, self.cal)
            return None
        bus = self._read(_REG_BUS)
        current = self._read(_REG_CURRENT)
        if current & 0x8000:
            current -= 0x10000
        power = self._read(_REG_POWER)
        out = {"lamp_voltage": round(bus * 1.25 / 1000, 5),
               "lamp_current": round(current * self.lsb, 6),
               "lamp_power": round(power * 25 * self.lsb, 6)}
        if self._read(_REG_MASK) & _OVF:
            out["lamp_current"] = out["lamp_power"] = None
        return out
