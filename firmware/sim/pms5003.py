"""PMS5003 model on a UART: active streaming or passive read-on-command, sleep/wake, frames.

Humid air grows the mass it reads as the SPS30 model's does (sim/sps30.py growth)."""

from .scenario import K_CHIP
from .sps30 import growth

_PERIOD_MS = 1000


def frame(words13):
    """A 32-byte data frame: 42 4D, length 28, 13 data words, checksum of all bytes before it."""
    out = bytearray(b"\x42\x4d\x00\x1c")
    for w in words13:
        out += bytes(((w >> 8) & 0xFF, w & 0xFF))
    s = sum(out)
    out += bytes(((s >> 8) & 0xFF, s & 0xFF))
    return out


def _ack(cmd, data):
    out = bytearray((0x42, 0x4D, 0x00, 0x04, cmd, data))
    s = sum(out)
    return out + bytes((s >> 8, s & 0xFF))


class Model:
    CRC = True  # the frame checksum catches a corrupted byte

    def __init__(self, sc, chip, options=None):
        self.sc = sc
        self.chip = chip
        self.power_on()

    def power_on(self):
        self.active = True
        self.awake = True
        self.last = self.sc.chip_ms()
        self.n = 0
        self.frozen = None

    def _frame(self):
        sc = self.sc
        stuck = False
        for kind, _ in sc.faults_for(self.chip, sc.t()):
            stuck = stuck or kind == "stuck"
        if stuck and self.frozen:
            return self.frozen
        self.n += 1
        t = sc.t()
        pm25 = sc.pm2_5(t) * growth(sc, t) * (1 + 0.05 * sc.gauss(K_CHIP, self.n))
        atm = [int(round(max(0.0, pm25 * r))) for r in (0.68, 1.0, 1.4)]
        cf1 = atm  # CF=1 equals atmospheric below ~30 ug/m3 on real units
        counts = [int(pm25 * c) for c in (160, 48, 9, 1.1, 0.3, 0.1)]
        self.frozen = frame(cf1 + atm + counts + [0x9700])
        return self.frozen

    def receive(self, data):
        """Host → sensor bytes; the reply, if any."""
        if len(data) != 7 or data[0] != 0x42 or data[1] != 0x4D:
            return None
        if sum(data[:5]) != (data[5] << 8) | data[6]:
            return None  # the sensor ignores a command with a bad checksum
        cmd, value = data[2], data[4]
        if cmd == 0xE4:  # sleep (0) / wake (1)
            if value:
                if not self.awake:
                    self.awake = True
                    self.last = self.sc.chip_ms()
                return None
            self.awake = False
            return _ack(cmd, value)
        if not self.awake:
            return None
        if cmd == 0xE1:  # mode: 0 passive, 1 active
            self.active = bool(value)
            return _ack(cmd, value)
        if cmd == 0xE2 and not self.active:
            return self._frame()
        return None

    def poll(self):
        """In active mode a frame every second (chip time)."""
        if not (self.active and self.awake):
            return None
        now = self.sc.chip_ms()
        if now - self.last < _PERIOD_MS:
            return None
        self.last = now
        return self._frame()
