"""Bosch BME280 temperature, humidity and pressure sensor on I2C.

Compensation is the datasheet's integer code (BME280 datasheet rev 1.6, §4.2.3 and §8.2): 32-bit
for temperature and humidity, 64-bit for pressure. Integers, not floats, because ESP32
MicroPython floats are single precision and would lose the pressure's resolution.
"""

import struct

from . import SensorError, bus_error

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_REG_CALIB_TP = const(0x88)  # 26 bytes: dig_T1..dig_P9, reserved, dig_H1 at 0xA1
_REG_ID = const(0xD0)
_REG_RESET = const(0xE0)
_REG_CALIB_H = const(0xE1)  # 7 bytes: dig_H2..dig_H6
_REG_CTRL_HUM = const(0xF2)
_REG_CTRL_MEAS = const(0xF4)
_REG_CONFIG = const(0xF5)
_REG_DATA = const(0xF7)  # press_msb .. hum_lsb, 8 bytes, read in one burst (datasheet §4)
_CHIP_ID = const(0x60)
_SKIPPED_T = const(0x80000)  # the data registers' reset value: no measurement yet

# oversampling x1 for T, P and H, normal mode, t_standby 0.5 ms, filter off: a fresh
# conversion every ~10 ms, which the sampler's oversampling then medians
_CTRL_HUM = const(0x01)
_CTRL_MEAS = const(0x27)
_CTRL_SLEEP = const(0x24)  # the same oversampling, sleep mode: 0.1 uA (datasheet §3.3.1)
_CONFIG = const(0x00)


def _s12(v):
    return v - 0x1000 if v & 0x800 else v


def compensate(adc_t, adc_p, adc_h, cal):
    """Raw ADC values → (T in 0.01 °C, p in Pa/256, H in %RH/1024), the datasheet's integers."""
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6 = cal
    var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
    var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14
    t_fine = var1 + var2
    t = (t_fine * 5 + 128) >> 8

    var1 = t_fine - 128000
    var2 = var1 * var1 * p6
    var2 = var2 + ((var1 * p5) << 17)
    var2 = var2 + (p4 << 35)
    var1 = ((var1 * var1 * p3) >> 8) + ((var1 * p2) << 12)
    var1 = (((1 << 47) + var1) * p1) >> 33
    if var1 == 0:
        p = 0  # the datasheet's guard against a division by zero
    else:
        p = 1048576 - adc_p
        num = ((p << 31) - var2) * 3125
        # C integer division truncates toward zero; Python's // floors
        q = abs(num) // abs(var1)
        p = q if (num < 0) == (var1 < 0) else -q
        var1 = (p9 * (p >> 13) * (p >> 13)) >> 25
        var2 = (p8 * p) >> 19
        p = ((p + var1 + var2) >> 8) + (p7 << 4)

    v = t_fine - 76800
    v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16384) >> 15) * (
        ((((((v * h6) >> 10) * (((v * h3) >> 11) + 32768)) >> 10) + 2097152) * h2 + 8192) >> 14)
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4)
    v = 0 if v < 0 else v
    v = 419430400 if v > 419430400 else v
    return t, p, v >> 12


def parse_calibration(tp, hum):
    """The 18 trimming parameters from the 0x88..0xA1 and 0xE1..0xE7 register blocks."""
    cal = list(struct.unpack_from("<HhhHhhhhhhhh", tp, 0))
    cal.append(tp[25])  # dig_H1, unsigned char at 0xA1
    cal.append(struct.unpack_from("<h", hum, 0)[0])  # dig_H2
    cal.append(hum[2])  # dig_H3
    cal.append(_s12((hum[3] << 4) | (hum[4] & 0x0F)))  # dig_H4: 0xE4[7:0] / 0xE5[3:0]
    cal.append(_s12((hum[5] << 4) | (hum[4] >> 4)))  # dig_H5: 0xE6[7:0] / 0xE5[7:4]
    cal.append(struct.unpack_from("<b", hum, 6)[0])  # dig_H6
    return tuple(cal)


class BME280:
    WARMUP_MS = 0
    PERIOD_MS = 10  # one conversion at x1 oversampling takes at most 9.3 ms (datasheet §9.1)
    OVERSAMPLE = 3
    RANGES = {"temperature": (-40, 85), "humidity": (0, 100), "pressure": (30000, 110000)}
    # at x1 oversampling the ADCs give 16 bits: 0.005 °C and 2.62 Pa steps (datasheet,
    # oversampling settings); humidity 0.008 %RH
    PLACES = {"temperature": 2, "humidity": 2, "pressure": 0}
    STUCK = ("humidity", "pressure", "temperature")

    def __init__(self, i2c, address=0x76):
        self.i2c = i2c
        self.address = address
        self._where = "bme280@0x%02x" % address
        self._data = bytearray(8)
        tp = bytearray(26)
        hum = bytearray(7)
        try:
            chip = i2c.readfrom_mem(address, _REG_ID, 1)[0]
            if chip != _CHIP_ID:
                raise SensorError("%s: chip id 0x%02x, expected 0x%02x" % (
                    self._where, chip, _CHIP_ID))
            i2c.readfrom_mem_into(address, _REG_CALIB_TP, tp)
            i2c.readfrom_mem_into(address, _REG_CALIB_H, hum)
            # ctrl_hum only takes effect after a write to ctrl_meas (datasheet §5.4.3)
            i2c.writeto_mem(address, _REG_CTRL_HUM, bytes((_CTRL_HUM,)))
            i2c.writeto_mem(address, _REG_CONFIG, bytes((_CONFIG,)))
            i2c.writeto_mem(address, _REG_CTRL_MEAS, bytes((_CTRL_MEAS,)))
        except OSError as e:
            raise bus_error(e, self._where)
        self.calibration = parse_calibration(tp, hum)
        self.power = 2

    def _mode(self, value, state):
        try:
            self.i2c.writeto_mem(self.address, _REG_CTRL_MEAS, bytes((value,)))
        except OSError as e:
            raise bus_error(e, self._where)
        self.power = state

    def sleep(self, deep=True):
        """Sleep mode: no conversions; the data registers keep the last one."""
        self._mode(_CTRL_SLEEP, 0)

    def wake(self):
        """Normal mode again: a fresh conversion within PERIOD_MS."""
        self._mode(_CTRL_MEAS, 2)

    def read(self):
        """Temperature (Cel), humidity (%RH), pressure (Pa); None before the first conversion."""
        d = self._data
        try:
            self.i2c.readfrom_mem_into(self.address, _REG_DATA, d)
        except OSError as e:
            raise bus_error(e, self._where)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        if adc_t == _SKIPPED_T:
            return None
        t, p, h = compensate(adc_t, adc_p, adc_h, self.calibration)
        return {"temperature": t / 100, "pressure": round(p / 256, 2),
                "humidity": round(h / 1024, 2)}
