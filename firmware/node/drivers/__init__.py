"""Sensor drivers: one module per chip, each handed its bus. Shared errors and checksums live here.

Every driver follows the same shape: `Chip(bus, address=<datasheet default>, **options)` probes the
chip and configures it, `read()` returns canonical measurement names (docs/measurements.md) to
values in SenML units, or None when the chip has no new data yet. `PLACES` gives each float
measurement's resolution as decimal places, from the datasheet's step: the sampler rounds to
it (node/senml.py quantize) so that a value is the same number on every VM. Failures raise the
specific exceptions below, never a bare OSError, so the sampler can flag each reading with its
cause. One module here is not a chip: corrections.py, the corrections of the readings
(docs/corrections.md), loaded like a driver only by a board that needs it.
"""

import errno

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# chip → (class, bus kind, I2C addresses with the datasheet default first, measurements).
# Board validation (node/board.py) and the sampler both read this table; the driver module is
# only imported when a board uses the chip, so unused drivers cost no RAM.
CHIPS = {
    "battery": ("Battery", "adc", (), ("battery",)),
    "bh1750": ("BH1750", "i2c", (0x23, 0x5C), ("illuminance",)),
    "bme280": ("BME280", "i2c", (0x76, 0x77), ("humidity", "pressure", "temperature")),
    "ina219": ("INA219", "i2c", tuple(range(0x40, 0x50)),
               ("lamp_current", "lamp_power", "lamp_voltage")),
    "ina226": ("INA226", "i2c", tuple(range(0x40, 0x50)),
               ("lamp_current", "lamp_power", "lamp_voltage")),
    "pcba_dbm": ("PCBADBM", "i2c", (0x48,), ("LAeq", "LAmax")),
    "pms5003": ("PMS5003", "uart", (), ("pm1", "pm10", "pm2_5")),
    "scd4x": ("SCD4X", "i2c", (0x62,), ("co2", "humidity", "temperature")),
    "sps30": ("SPS30", "i2c", (0x69,), ("pm1", "pm10", "pm2_5", "pm4")),
}


class SensorError(Exception):
    """A sensor could not deliver a reading (root of every driver failure)."""


class NackError(SensorError):
    """The chip did not acknowledge its address or a byte: absent, unplugged or busy."""


class CRCError(SensorError):
    """A checksum over data from the chip did not match: line noise or a failing chip."""


class SensorTimeout(SensorError):
    """The bus timed out (clock stretching) or the chip never reported data ready."""


def bus_error(e, where):
    """The specific exception for an OSError raised by machine.I2C / UART.

    MicroPython raises ENODEV (address not acknowledged) or EIO (data byte not acknowledged)
    for a NACK; ETIMEDOUT when a chip stretches the clock past the bus timeout. ESP-IDF's
    hardware I2C may also report a missing chip as ETIMEDOUT: both mean "not answering".
    """
    code = e.args[0] if e.args else 0
    if code == errno.ETIMEDOUT:
        return SensorTimeout("%s: bus timeout" % where)
    return NackError("%s: no acknowledge (errno %s)" % (where, code))


def crc8(buf, start=0, end=None):
    """Sensirion CRC-8: polynomial 0x31 (x^8 + x^5 + x^4 + 1), init 0xFF, no reflection."""
    crc = 0xFF
    for i in range(start, len(buf) if end is None else end):
        crc ^= buf[i]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def check_words(buf, n, where):
    """Verify n Sensirion words (2 data bytes + CRC each) in buf; raise CRCError on a mismatch."""
    for i in range(0, 3 * n, 3):
        if crc8(buf, i, i + 2) != buf[i + 2]:
            raise CRCError("%s: CRC mismatch in word %d" % (where, i // 3))


def word(buf, i):
    """The i-th big-endian 16-bit word of a Sensirion response (skipping the CRC bytes)."""
    return (buf[3 * i] << 8) | buf[3 * i + 1]


def put_word(buf, i, value):
    """Write a 16-bit word and its CRC at word position i of buf (Sensirion framing)."""
    j = 3 * i
    buf[j] = (value >> 8) & 0xFF
    buf[j + 1] = value & 0xFF
    buf[j + 2] = crc8(buf, j, j + 2)


class Sensirion:
    """A Sensirion I2C chip: `_command` and `_response` are its only bus access (no sleeping
    here: a chip that needs time between a command and its response waits in its own module,
    as the virtual-clock tests expect)."""

    def __init__(self, i2c, address, name, n_words, with_arg=False):
        self.i2c = i2c
        self.address = address
        self._where = "%s@0x%02x" % (name, address)
        self._cmd = bytearray(5 if with_arg else 2)  # command word (+ argument word and CRC)
        self._buf = bytearray(3 * n_words)  # the longest response, CRC bytes included

    def _command(self, cmd, arg=None):
        c = self._cmd
        c[0] = cmd >> 8
        c[1] = cmd & 0xFF
        n = 2
        if arg is not None:
            put_word(memoryview(c)[2:], 0, arg)
            n = 5
        try:
            self.i2c.writeto(self.address, c if n == len(c) else memoryview(c)[:n])
        except OSError as e:
            raise bus_error(e, self._where)

    def _query(self, cmd, n_words):
        """Send a command and read its n CRC-checked words at once; the first one."""
        self._command(cmd)
        return self._response(n_words)

    def _response(self, n_words):
        """Read n CRC-checked words into the buffer; the first one."""
        buf = memoryview(self._buf)[: 3 * n_words]
        try:
            self.i2c.readfrom_into(self.address, buf)
        except OSError as e:
            raise bus_error(e, self._where)
        check_words(buf, n_words, self._where)
        return word(buf, 0)


def places(step):
    """Decimal places that write every multiple of `step` (e.g. 0.0002 → 4) exactly, at most 8."""
    for p in range(8):
        x = step * 10**p
        if abs(x - round(x)) < x * 1e-4:  # tolerates the float error of the step itself
            return p
    return 8


def current_lsb(max_current):
    """INA2xx Current_LSB: the smallest 1-2-5 round value ≥ Max_Expected_I / 2^15."""
    minimum = max_current / 32768
    step = 1e-6
    while True:
        for m in (1, 2, 5):
            if m * step >= minimum * 0.999999:  # tolerate float error at exact steps
                return m * step
        step *= 10


# ---------------------------------------------------------------- TI INA2xx family
# The INA219/INA226 share one base here rather than a module of their own: every board has a
# lamp monitor, and a module costs its globals and its import on a 110 KB heap.
# A chip is a parameter table (class attributes), its probe and how it reports the bus voltage
# and an overflow; `_read`/`_write` (16-bit big-endian registers) are its only bus access. The
# chip computes current and power itself once calibrated: Cal = k / (Current_LSB * R_shunt),
# Current in Current_LSB, Power in POWER_LSB x Current_LSB.

_INA_CONFIG = const(0x00)
_INA_POWER = const(0x03)
_INA_CURRENT = const(0x04)
_INA_CAL = const(0x05)
_INA_RESET = const(0x8000)


def ina_calibration(chip, lsb, shunt_ohms):
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
        self.cal = ina_calibration(chip, self.lsb, shunt_ohms)
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
        self._write(_INA_CONFIG, self.config & ~7)
        self.power = 0

    def wake(self):
        """Continuous shunt and bus conversions again."""
        self._write(_INA_CONFIG, self.config)
        self.power = 2

    def _reset(self):
        self._write(_INA_CONFIG, _INA_RESET)

    def _configure(self):
        self._write(_INA_CONFIG, self.config)
        self._write(_INA_CAL, self.cal)

    def _calibrated(self):
        """False once a calibration the chip lost (a brown-out of the chip alone) is restored."""
        if self._read(_INA_CAL) == self.cal:
            return True
        self._configure()
        return False

    def _measure(self, volts):
        """The readings, with the chip's current and power read after the bus voltage."""
        current = self._read(_INA_CURRENT)
        if current & 0x8000:
            current -= 0x10000
        power = self._read(_INA_POWER)
        return {"lamp_voltage": volts,
                "lamp_current": round(current * self.lsb, 6),
                "lamp_power": round(power * self.CHIP[5] * self.lsb, 6)}


def open(chip, bus, address=None, options=None):  # noqa: A001 - mirrors the board vocabulary
    """A driver instance for `chip` on `bus`; imports the driver module on first use."""
    cls_name = CHIPS[chip][0]
    mod = __import__("node.drivers." + chip, None, None, [cls_name])
    cls = getattr(mod, cls_name)
    kwargs = dict(options) if options else {}
    if address is not None:
        kwargs["address"] = address
    return cls(bus, **kwargs)
