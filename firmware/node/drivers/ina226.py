"""TI INA226 current/power monitor on I2C (36 V bus): the lamp's voltage, current and power.

Like the INA219 the chip scales current and power itself once calibrated (INA226 datasheet
SBOS547, §6.5.1): CAL = 0.00512 / (Current_LSB * R_shunt), Current = Shunt * CAL / 2048,
Power = Current * Bus / 20000, Power_LSB = 25 * Current_LSB, bus LSB 1.25 mV.
"""

from . import INA2xx, SensorError, ina_calibration

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_REG_BUS = const(0x02)
_REG_MASK = const(0x06)
_REG_MANUFACTURER = const(0xFE)
_REG_DIE = const(0xFF)
_MANUFACTURER_TI = const(0x5449)  # "TI"
_DIE_ID = const(0x2260)
# averages 1, bus and shunt conversion 1.1 ms, shunt and bus continuous: the reset value
_CONFIG = const(0x4127)
_OVF = const(0x0004)  # Mask/Enable: math overflow


def calibration(lsb, shunt_ohms):
    """Datasheet Equation 1; bit 15 of the register is reserved."""
    return ina_calibration(INA226.CHIP, lsb, shunt_ohms)


class INA226(INA2xx):
    PERIOD_MS = 3  # one shunt + one bus conversion: 2 x 1.1 ms
    # 81.92 mV shunt range, 36 V bus in 1.25 mV steps, Power_LSB 25 x Current_LSB
    CHIP = ("ina226", 0.08193, "81.92 mV", 36, 5, 25, 0.00512, 0x7FFF)
    config = _CONFIG

    def _start(self):
        if self._read(_REG_MANUFACTURER) != _MANUFACTURER_TI or self._read(_REG_DIE) != _DIE_ID:
            raise SensorError("%s: not an INA226 (manufacturer/die id)" % self._where)
        self._reset()
        self._configure()

    def read(self):
        """lamp_voltage (V), lamp_current (A), lamp_power (W)."""
        if not self._calibrated():  # a brown-out of the chip alone cleared it
            return None
        out = self._measure(round(self._read(_REG_BUS) * 1.25 / 1000, 5))
        if self._read(_REG_MASK) & _OVF:
            out["lamp_current"] = out["lamp_power"] = None
        return out

