"""HAL of the simulated board on MicroPython's unix port: a pty as the UART, files as flash,
the sensors on a simulated street (firmware/sim)."""

import gc
import struct
import time

# Linux termios c_cc indices (MicroPython's termios module does not export them)
_VTIME = 5
_VMIN = 6


def open_uart(port, baud):
    """The link device opened raw and non-blocking-ish: read(n) returns what is there."""
    import termios

    f = open(port, "r+b")
    fd = f.fileno()
    termios.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[6][_VMIN] = 0
    attrs[6][_VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return f


# The board's clock (node/clock.py, docs/time.md): the host's, which NTP keeps right, unless
# node.json says "clock_at_epoch": true. Then it starts at the Unix epoch on every boot, as an
# ESP32's RTC does after a power cut, and holds no true time until the gateway's sets it.
_rtc = None  # [Unix ms, ticks_ms then] once set, or from boot with clock_at_epoch
_at_epoch = False


def _start_clock(cfg):
    global _rtc, _at_epoch
    if cfg.get("clock_at_epoch") and not _at_epoch:
        _at_epoch = True
        _rtc = [0, time.ticks_ms()]


def rtc_ms():
    """The board's clock in Unix ms."""
    if _rtc is None:
        return time.time_ns() // 1000000
    return _rtc[0] + time.ticks_diff(time.ticks_ms(), _rtc[1])


def set_clock(epoch_ms):
    global _rtc
    _rtc = [epoch_ms, time.ticks_ms()]


def clock_known():
    """Whether the clock holds the true time without a gateway's: the host's does."""
    return not _at_epoch


def heap_free():
    gc.collect()
    return gc.mem_free()


class _Street:
    """The simulated street process's end of the sensor buses (sim/wire.py)."""

    def __init__(self, name):
        import socket

        from sim import wire

        self.wire = wire
        self.sock = socket.socket(wire.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(wire.sockaddr(name))
        self._head = struct.calcsize(wire.REPLY)

    def call(self, op, bus, addr=0, mem=0, nread=0, data=b""):
        s = self.sock
        s.write(struct.pack(self.wire.REQUEST, op, bus, addr, mem, nread, len(data)))
        if data:
            s.write(data)
        err, n = struct.unpack(self.wire.REPLY, s.read(self._head))
        out = s.read(n) if n else b""
        if err:
            raise OSError(err)
        return out


class I2C:
    """machine.I2C's controller methods, carried to the chips in the street process."""

    def __init__(self, street, index):
        self._s = street
        self._i = index

    def scan(self):
        return list(self._s.call(9, self._i))

    def writeto(self, addr, buf, stop=True):
        self._s.call(1, self._i, addr, 0, 0, bytes(buf))
        return len(buf)

    def readfrom_into(self, addr, buf, stop=True):
        buf[:] = self._s.call(2, self._i, addr, 0, len(buf))

    def readfrom(self, addr, nbytes, stop=True):
        return self._s.call(2, self._i, addr, 0, nbytes)

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        self._s.call(3, self._i, addr, memaddr, 0, bytes(buf))

    def readfrom_mem_into(self, addr, memaddr, buf, addrsize=8):
        buf[:] = self._s.call(4, self._i, addr, memaddr, len(buf))

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        return self._s.call(4, self._i, addr, memaddr, nbytes)


class UART:
    """machine.UART's byte-stream methods for a sensor on a simulated UART."""

    def __init__(self, street, index):
        self._s = street
        self._i = index

    def write(self, buf):
        self._s.call(5, self._i, 0, 0, 0, bytes(buf))
        return len(buf)

    def any(self):
        return struct.unpack("<H", self._s.call(7, self._i))[0]

    def read(self, nbytes=256):
        return self._s.call(6, self._i, 0, 0, nbytes) or None

    def readinto(self, buf, nbytes=None):
        data = self.read(len(buf) if nbytes is None else nbytes)
        if not data:
            return None
        buf[: len(data)] = data
        return len(data)


class ADC:
    """machine.ADC.read_uv for a simulated analogue input."""

    def __init__(self, street, index):
        self._s = street
        self._i = index

    def read_uv(self):
        return struct.unpack("<i", self._s.call(8, self._i))[0]


def sensor_buses(board, cfg):
    """The board's buses with the simulated street's chips on them: (buses by name, time scale).

    cfg["sim"] holds the scenario (docs/sensors.md). With sim.socket the chips run in their own
    process (tools/street/sim.py starts it) and cost this heap nothing; without it they run here.
    """
    _start_clock(cfg)
    sim = cfg.get("sim") or {}
    scale = sim.get("chip_speed", 1)
    if sim.get("socket"):
        from sim import wire

        try:
            street = _Street(sim["socket"])
        except OSError as e:
            print("sim: no street process at @%s (%r); sensors run in this VM" % (
                sim["socket"], e))
        else:
            buses = {}
            for i, name in enumerate(wire.bus_names(board)):
                kind = UART if name in board.get("uart", {}) else (
                    ADC if name in board.get("adc", {}) else I2C)
                buses[name] = kind(street, i)
            return buses, scale
    try:
        from sim import street as local

        return local.build(board, sim, cfg["id"])[:2]
    except MemoryError:
        print("sim: no room for the chip models in this heap; no sensors")
        return {}, scale
