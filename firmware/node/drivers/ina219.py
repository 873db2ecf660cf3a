"""TI INA219 current/power monitor on I2C: the lamp's supply voltage, current and power.

The chip computes current and power itself once the calibration register is set (INA219
datasheet SBOS448, §8.5.1): Cal = trunc(0.04096 / (Current_LSB * R_shunt)),
Current = Shunt * Cal / 4096, Power = Current * Bus / 5000, Power_LSB = 20 * Current_LSB.
"""

from . import INA2xx, SensorError, ina_calibration

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_REG_CONFIG = const(0x00)
_REG_BUS = const(0x02)
_POR_CONFIG = const(0x399F)  # the configuration register after a reset
_ADC_12BIT = const(0x3)  # BADC / SADC: 12-bit, 532 us per conversion
_MODE_CONT = const(0x7)  # shunt and bus, continuous
_PGA_MV = (40, 80, 160, 320)  # PG = 0..3: shunt full-scale range


def calibration(lsb, shunt_ohms):
    """Datasheet Equation 1; the register's bit 0 is always 0."""
    return ina_calibration(INA219.CHIP, lsb, shunt_ohms)


def config(shunt_mv, bus_max_v):
    """Configuration register: the smallest PGA range that holds the shunt drop, 16/32 V bus."""
    pg = 0
    while pg < 3 and _PGA_MV[pg] < shunt_mv:
        pg += 1
    brng = 1 if bus_max_v > 16 else 0
    return (brng << 13) | (pg << 11) | (_ADC_12BIT << 7) | (_ADC_12BIT << 3) | _MODE_CONT


class INA219(INA2xx):
    PERIOD_MS = 2  # one shunt + one bus conversion at 12 bits: 2 x 532 us
    RANGES = {"lamp_voltage": (0, 26), "lamp_current": (-3.2, 3.2), "lamp_power": (0, 83)}
    # 320 mV shunt range, 26 V bus in 4 mV steps, Power_LSB 20 x Current_LSB, bit 0 of Cal is 0
    CHIP = ("ina219", 0.32001, "320 mV", 26, 3, 20, 0.04096, 0xFFFE)

    def __init__(self, i2c, address=0x40, shunt_ohms=0.1, max_current=3.2, lsb=None,
                 bus_max_v=32):
        self.config = config(max_current * shunt_ohms * 1000, bus_max_v)
        super().__init__(i2c, address, shunt_ohms, max_current, lsb)

    def _start(self):
        self._reset()
        if self._read(_REG_CONFIG) != _POR_CONFIG:  # probe: only an INA219 resets to this
            raise SensorError("%s: configuration after reset is not 0x%04x" % (
                self._where, _POR_CONFIG))
        self._configure()

    def read(self):
        """lamp_voltage (V), lamp_current (A), lamp_power (W)."""
        bus = self._read(_REG_BUS)
        # a power-on reset of the chip alone (brown-out) clears the calibration: restore it
        if not self._calibrated():
            return None
        out = self._measure((bus >> 3) * 4 / 1000)
        if bus & 1:  # OVF: current and power are meaningless (the sampler flags them)
            out["lamp_current"] = out["lamp_power"] = None
        return out
