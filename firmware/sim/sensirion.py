"""Sensirion I2C framing on the chip side: 16-bit command words in, CRC-protected words out.

Written independently of the driver's copy (node/drivers/__init__.py), so a CRC bug on one side
cannot hide behind the same bug on the other: both are checked against the datasheet example.
"""

import errno

from .bus import Chip


def crc(b0, b1):
    """CRC-8, polynomial 0x31, init 0xFF, over one 16-bit word (Sensirion datasheets)."""
    c = 0xFF
    for b in (b0, b1):
        c ^= b
        for _ in range(8):
            c = (c << 1) ^ 0x31 if c & 0x80 else c << 1
            c &= 0xFF
    return c


def words(values):
    """16-bit words → the byte stream a Sensirion chip sends (each word + its CRC)."""
    out = bytearray()
    for v in values:
        hi, lo = (v >> 8) & 0xFF, v & 0xFF
        out += bytes((hi, lo, crc(hi, lo)))
    return out


class SensirionChip(Chip):
    """A command-word chip: write = command (+ CRC-checked argument words), read = the reply."""

    CRC = True

    def power_on(self):
        self.reply = None

    def write(self, data):
        if len(data) < 2 or (len(data) - 2) % 3:
            raise OSError(errno.EIO)
        args = []
        for i in range(2, len(data), 3):
            if crc(data[i], data[i + 1]) != data[i + 2]:
                raise OSError(errno.EIO)  # the chip NACKs an argument with a bad CRC
            args.append((data[i] << 8) | data[i + 1])
        self.reply = self.command((data[0] << 8) | data[1], args)

    def read(self, n):
        r = self.reply
        if r is None or n > len(r):
            raise OSError(errno.EIO)  # nothing to send: the chip NACKs the read header
        self.reply = None
        return r[:n]

    def command(self, cmd, args):
        """Execute a command; return the reply bytes (None: none), raise OSError to NACK."""
        raise OSError(errno.EIO)
