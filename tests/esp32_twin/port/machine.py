"""The esp32 port's `machine`, as far as Lantern's HAL (firmware/node/hal/esp32.py) uses it.

Behaviour at the hardware's boundary, after ports/esp32 of MicroPython 1.25: I2C, UART and ADC
carry their transactions to the register-level chip models of the simulated street
(firmware/sim, over sim/wire.py); the gateway link's UART is the pty the harness wires to the
gateway; RTC memory is a file kept through deep sleep, watchdog and resets, gone after a power
cut; deep sleep, reset and the watchdog end this VM and the harness boots the next one with
the reset cause the port reports. Names, signatures and constants are checked against
micropython-esp32-stubs (tests/esp32_twin/test_stubs.py).
"""
# ruff: noqa: UP031, SIM115 - MicroPython: no f-strings in ports, no contextlib


import io as _io
import struct as _struct

import _twin

# machine.reset_cause() / wake_reason() values of the esp32 port
PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
PIN_WAKE = 2
EXT0_WAKE = 2
EXT1_WAKE = 3
TIMER_WAKE = 4
TOUCHPAD_WAKE = 5
ULP_WAKE = 6
SLEEP = 2
DEEPSLEEP = 4

_RTC_MEM_MAX = 2048  # MICROPY_HW_RTC_USER_MEM_MAX
_GET_FILENO = 10  # MP_STREAM_GET_FILENO: select/asyncio poll the pty's descriptor


def reset_cause():
    return _twin.RESET_CAUSE


def wake_reason():
    return _twin.WAKE_REASON


def deepsleep(time_ms=0):
    """The chip powers down until the timer (the harness) wakes it through a reset."""
    _twin.down(_twin.EXIT_DEEPSLEEP, b"%d" % time_ms)


def reset():
    _twin.down(_twin.EXIT_RESET)


def soft_reset():
    _twin.down(_twin.EXIT_SOFT_RESET)


def unique_id():
    return (_twin.read("mac") or b"\x24\x0a\xc4\x00\x00\x01")[:6]


def freq(hz=None):
    return 160000000 if hz is None else None


def idle():
    pass


class WDT:
    """The task watchdog: the harness ends the VM if feed() is late (file `wdt`: deadline)."""

    def __init__(self, *, id=0, timeout=5000):
        if id != 0:
            raise ValueError("WDT(%d) doesn't exist" % id)
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        self._timeout = timeout
        self.feed()

    def feed(self):
        late = _twin.host_us() + self._timeout * 1000 // _twin.SPEED
        _twin.write("wdt", b"%d %d" % (self._timeout, late))


class RTC:
    def __init__(self, id=0):
        pass

    def datetime(self, datetimetuple=None):
        import time

        if datetimetuple is None:
            us = _twin.rtc_us()
            t = time.gmtime(us // 1000000)
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], us % 1000000)
        y, mo, d, _wd, h, mi, s, sub = datetimetuple
        _twin.set_rtc_us((time.mktime((y, mo, d, h, mi, s, 0, 0)) * 1000000) + sub)
        return None

    def init(self, datetime):
        self.datetime(datetime)

    def memory(self, data=None):
        """RTC slow memory (RTC_NOINIT): survives everything but a loss of power."""
        if data is None:
            return _twin.read("rtc_mem", b"")
        if len(data) > _RTC_MEM_MAX:
            raise ValueError("buffer too long")
        _twin.write("rtc_mem", bytes(data))
        return None


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1

    def __init__(self, id, mode=-1, pull=-1, *, value=None):
        self._id = id
        self._v = 0
        if value is not None:
            self.value(value)

    def value(self, x=None):
        if x is None:
            return self._v
        self._v = 1 if x else 0
        with open(_twin.path("gpio"), "ab") as f:  # the bench's logic analyser
            f.write(b"%d %d %d\n" % (_twin.host_us(), self._id, self._v))
        return None

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def toggle(self):
        self.value(not self._v)


# --------------------------------------------------------------- buses to the chip models


class _Street:
    """This board's end of the wire to its chips (one connection per boot: a power cycle)."""

    _conn = None

    @classmethod
    def call(cls, op, bus, addr=0, mem=0, nread=0, data=b""):
        from sim import wire

        if bus is None:  # nothing on this bus
            if op == 9:
                return b""  # scan: no device answers
            if op in (5, 6, 7):
                return b"\x00\x00" if op == 7 else b""  # a UART line with nothing on it
            if op == 8:
                return b"\x00\x00\x00\x00"  # ADC: a pin tied low
            raise OSError(19)  # ENODEV: the address is not acknowledged

        if cls._conn is None:
            import socket

            s = socket.socket(wire.AF_UNIX, socket.SOCK_STREAM)
            s.connect(wire.sockaddr(_twin.read("street").decode()))
            cls._conn = s
        s = cls._conn
        s.write(_struct.pack(wire.REQUEST, op, bus, addr, mem, nread, len(data)) + data)
        err, n = _struct.unpack(wire.REPLY, s.read(_struct.calcsize(wire.REPLY)))
        out = s.read(n) if n else b""
        if err:
            raise OSError(err)
        return out

    @staticmethod
    def index(kind, ident):
        """The wire's bus index of the controller `kind` number `ident` (file `buses`), or None
        when nothing is wired to it (an I2C bus without chips NACKs, a UART line stays quiet)."""
        for line in (_twin.read("buses") or b"").decode().split("\n"):
            f = line.split()
            if len(f) == 3 and f[0] == kind and int(f[1]) == ident:
                return int(f[2])
        return None


def _pin_no(p):
    return p._id if isinstance(p, Pin) else int(p)


class I2C:
    """The I2C controller `id`; the chips' ACK/NACK come back as OSError(ENODEV/EIO)."""

    def __init__(self, id, *, scl, sda, freq=400000):
        self._bus = _Street.index("i2c", id)

    def scan(self):
        return list(_Street.call(9, self._bus))

    def writeto(self, addr, buf, stop=True):
        _Street.call(1, self._bus, addr, 0, 0, bytes(buf))
        return len(buf)

    def readfrom(self, addr, nbytes, stop=True):
        return _Street.call(2, self._bus, addr, 0, nbytes)

    def readfrom_into(self, addr, buf, stop=True):
        buf[:] = _Street.call(2, self._bus, addr, 0, len(buf))

    def writeto_mem(self, addr, memaddr, buf, *, addrsize=8):
        _Street.call(3, self._bus, addr, memaddr, 0, bytes(buf))

    def readfrom_mem(self, addr, memaddr, nbytes, *, addrsize=8):
        return _Street.call(4, self._bus, addr, memaddr, nbytes)

    def readfrom_mem_into(self, addr, memaddr, buf, *, addrsize=8):
        buf[:] = _Street.call(4, self._bus, addr, memaddr, len(buf))


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3

    def __init__(self, pin):
        self._bus = _Street.index("adc", _pin_no(pin))

    def atten(self, *args, **kwargs):
        pass

    def read_uv(self):
        return _struct.unpack("<i", _Street.call(8, self._bus))[0]


class UART(_io.IOBase):
    """UART `id`: the gateway link (a pty, file `uart<id>`) or a sensor on the street."""

    def __init__(self, id, baudrate=9600, bits=8, parity=None, stop=1, *, tx=None, rx=None,
                 rxbuf=None, timeout=None):
        self._f = None
        self._bus = None
        tty = _twin.read("uart%d" % id)
        if tty:
            import termios

            self._f = open(tty.decode(), "r+b")
            fd = self._f.fileno()
            termios.setraw(fd)
            attrs = termios.tcgetattr(fd)
            attrs[6][6] = 0  # VMIN: read returns what is there (the port's timeout=0)
            attrs[6][5] = 0  # VTIME
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        else:
            self._bus = _Street.index("uart", id)

    def read(self, nbytes=256):
        if self._f is not None:
            return self._f.read(nbytes) or None
        return _Street.call(6, self._bus, 0, 0, nbytes) or None

    def readinto(self, buf, nbytes=None):
        data = self.read(len(buf) if nbytes is None else nbytes) or b""
        buf[: len(data)] = data
        return len(data) or None  # None, as the port's, when nothing came

    def write(self, buf):
        if self._f is not None:
            return self._f.write(buf)
        _Street.call(5, self._bus, 0, 0, 0, bytes(buf))
        return len(buf)

    def any(self):
        if self._f is not None:
            raise OSError(95)  # not needed by the link: it polls the descriptor
        return _struct.unpack("<H", _Street.call(7, self._bus))[0]

    def ioctl(self, req, arg):
        if req == _GET_FILENO and self._f is not None:
            return self._f.fileno()
        return -1
