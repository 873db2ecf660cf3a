"""Sensor drivers: one module per chip, each handed its bus. Shared errors and checksums live here.

Every driver follows the same shape: `Chip(bus, address=<datasheet default>, **options)` probes the
chip and configures it, `read()` returns canonical measurement names (docs/measurements.md) to
values in SenML units, or None when the chip has no new data yet. `PLACES` gives each float
measurement's resolution as decimal places, from the datasheet's step: the sampler rounds to
it (node/senml.py quantize) so that a value is the same number on every VM. Failures raise the
specific exceptions below, never a bare OSError, so the sampler can flag each reading with its
cause.
"""

import errno

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


def open(chip, bus, address=None, options=None):  # noqa: A001 - mirrors the board vocabulary
    """A driver instance for `chip` on `bus`; imports the driver module on first use."""
    cls_name = CHIPS[chip][0]
    mod = __import__("node.drivers." + chip, None, None, [cls_name])
    cls = getattr(mod, cls_name)
    kwargs = dict(options) if options else {}
    if address is not None:
        kwargs["address"] = address
    return cls(bus, **kwargs)
