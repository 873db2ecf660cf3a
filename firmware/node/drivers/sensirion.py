"""What every Sensirion I2C chip speaks: 16-bit command words, an optional argument word, and
responses of 16-bit words each followed by its CRC-8 (node/drivers/__init__.py crc8).

`_command` and `_response` are a chip's only bus access (no sleeping here: a chip that needs
time between a command and its response waits in its own module); SCD4x and SPS30 build on them.
"""

from . import bus_error, check_words, put_word, word


class Sensirion:
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
