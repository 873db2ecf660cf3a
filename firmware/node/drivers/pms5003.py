"""Plantower PMS5003 particulate matter sensor on a UART (9600 8N1), passive mode.

Frames (Plantower PMS5003 manual, "Appendix I"): 0x42 0x4D, a 16-bit frame length (28),
13 16-bit data words, a 16-bit checksum that is the sum of every byte before it. Host commands
are 0x42 0x4D, command, two data bytes and the same kind of checksum. Passive mode: the sensor
answers one frame per read command instead of streaming.
"""

import time

from . import CRCError, SensorTimeout

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_CMD_READ = const(0xE2)
_CMD_MODE = const(0xE1)  # data 0x00 passive, 0x01 active
_CMD_SLEEP = const(0xE4)  # data 0x00 sleep, 0x01 wake up
_FRAME = const(32)
_REPLY_MS = const(200)  # a 32-byte frame takes 33 ms at 9600 baud, plus the sensor's latency
_POLL_MS = const(5)


def command(cmd, data=0):
    """A host command frame with its checksum."""
    out = bytearray((0x42, 0x4D, cmd, data >> 8, data & 0xFF, 0, 0))
    s = sum(out[:5])
    out[5] = s >> 8
    out[6] = s & 0xFF
    return out


def parse(frame):
    """A 32-byte data frame → PM1.0, PM2.5, PM10 (atmospheric environment), ug/m3."""
    if frame[0] != 0x42 or frame[1] != 0x4D or ((frame[2] << 8) | frame[3]) != _FRAME - 4:
        raise CRCError("pms5003: not a data frame")
    if sum(frame[:30]) & 0xFFFF != (frame[30] << 8) | frame[31]:
        raise CRCError("pms5003: checksum mismatch")
    return {"pm1": (frame[10] << 8) | frame[11], "pm2_5": (frame[12] << 8) | frame[13],
            "pm10": (frame[14] << 8) | frame[15]}


class PMS5003:
    # "stable data should be got at least 30 seconds after the sensor wakeup from the sleep
    # mode because of the fan's performance" (PMS5003 manual)
    WARMUP_MS = 30000
    PERIOD_MS = 1000
    OVERSAMPLE = 1
    RANGES = {"pm1": (0, 500), "pm2_5": (0, 500), "pm10": (0, 500)}  # effective range
    STUCK = ()  # integer ug/m3 at street levels repeat legitimately

    def __init__(self, uart, address=None):
        self.uart = uart
        self._frame = bytearray(_FRAME)
        self._read_cmd = command(_CMD_READ)
        self.wake()
        self.read()  # probe: a frame with a good checksum, or a specific exception

    def wake(self):
        """Fan on (the wake command), passive mode again; stable after WARMUP_MS."""
        self.uart.write(command(_CMD_SLEEP, 1))
        self.uart.write(command(_CMD_MODE, 0))
        self._drain(_REPLY_MS)
        self.power = 2

    def sleep(self, deep=True):
        """Fan and laser off (the sleep command); the sensor ignores reads until woken."""
        self.uart.write(command(_CMD_SLEEP, 0))
        self._drain(_REPLY_MS)
        self.power = 0

    def _drain(self, wait_ms=0):
        deadline = time.ticks_add(time.ticks_ms(), wait_ms)
        while True:
            if self.uart.any():
                self.uart.read()
            elif time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                return
            else:
                time.sleep_ms(_POLL_MS)

    def read(self):
        """PM1.0, PM2.5, PM10 in ug/m3 for one read command."""
        uart = self.uart
        self._drain()
        uart.write(self._read_cmd)
        f = self._frame
        mv = memoryview(f)
        n = 0
        deadline = time.ticks_add(time.ticks_ms(), _REPLY_MS)
        while n < _FRAME:
            if uart.any():
                got = uart.readinto(mv[n:])
                n += got or 0
                # resynchronise on the start characters if line noise came first
                while n >= 2 and (f[0] != 0x42 or f[1] != 0x4D):
                    f[:n - 1] = f[1:n]
                    n -= 1
                if n == 1 and f[0] != 0x42:
                    n = 0
            elif time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                raise SensorTimeout("pms5003: no frame within %d ms (%d bytes)" % (_REPLY_MS, n))
            else:
                time.sleep_ms(_POLL_MS)
        return parse(f)
