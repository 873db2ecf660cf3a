"""HAL of the QEMU board (mps2-an385): UART1 the link, UART2 the sensor buses, littlefs flash."""

import errno
import gc
import io
import struct
import time

import machine
import mps2

try:
    from micropython import const
except ImportError:  # CPython (type checks, docs)

    def const(x):
        return x


# CMSDK APB UART registers (ARM DDI 0479C, 4.3)
_DATA = const(0x00)
_STATE = const(0x04)
_CTRL = const(0x08)
_BAUDDIV = const(0x10)
_STATE_TXFULL = const(1)
_STATE_RXFULL = const(2)
_CTRL_TX_RX_EN = const(3)
_PCLK_HZ = const(25000000)
_BAUDDIV_MIN = const(16)

# MicroPython stream ioctl requests and poll flags (py/stream.h)
_MP_STREAM_POLL = const(3)
_MP_STREAM_CLOSE = const(4)
_POLL_RD = const(0x0001)
_POLL_WR = const(0x0004)

# A reset (SystemExit(75), node/ota.py and node/commands.py) is done by main.py, which boots
# the node again in place: machine.reset() ends QEMU and its flash, and a soft reset raised
# from the frozen main.py leaves the board at its REPL (board.c runs main.py inside mp_init).
WARM_RESET = True

# The board's UARTs by name; UART0 is the REPL
_UARTS = {"uart1": 0x40005000, "uart2": 0x40006000}


class UART(io.IOBase):
    """A polled CMSDK UART as a non-blocking stream, for asyncio's StreamReader/StreamWriter.

    The UART holds one received byte at a time; QEMU keeps the rest on its side of the line
    until that byte is read, so nothing is lost while the node is busy. Like machine.UART's
    `timeout_char`, a read goes on while the next character follows within timeout_char_us:
    a frame then arrives in one read instead of one read (and one allocation) per byte.
    """

    def __init__(self, base, baud=115200, rxbuf=256, timeout_char_us=2000):
        self._mem = machine.mem32
        self._data = base + _DATA
        self._state = base + _STATE
        self._buf = bytearray(rxbuf)
        self._timeout_char = timeout_char_us
        div = _PCLK_HZ // baud
        self._mem[base + _BAUDDIV] = div if div > _BAUDDIV_MIN else _BAUDDIV_MIN
        self._mem[base + _CTRL] = _CTRL_TX_RX_EN

    def readinto(self, buf, n=-1):
        """Bytes arriving now into buf; None if there are none (the stream would block)."""
        mem, state, data = self._mem, self._state, self._data
        if not mem[state] & _STATE_RXFULL:
            return None
        limit = len(buf) if n < 0 or n > len(buf) else n
        got = 0
        last = time.ticks_us()
        while got < limit:
            if mem[state] & _STATE_RXFULL:
                buf[got] = mem[data]
                got += 1
                last = time.ticks_us()
            elif time.ticks_diff(time.ticks_us(), last) > self._timeout_char:
                break
        return got

    def read(self, n=-1):
        got = self.readinto(self._buf, n)
        return None if got is None else bytes(self._buf[:got])

    def write(self, buf):
        """As many bytes as the transmitter takes now; None if it takes none."""
        mem, state, data = self._mem, self._state, self._data
        sent = 0
        for b in buf:
            if mem[state] & _STATE_TXFULL:
                break
            mem[data] = b
            sent += 1
        return sent if sent else None

    def any(self):
        return 1 if self._mem[self._state] & _STATE_RXFULL else 0

    def ioctl(self, req, arg):
        if req == _MP_STREAM_POLL:
            st = self._mem[self._state]
            ready = 0
            if arg & _POLL_RD and st & _STATE_RXFULL:
                ready |= _POLL_RD
            if arg & _POLL_WR and not st & _STATE_TXFULL:
                ready |= _POLL_WR
            return ready
        if req == _MP_STREAM_CLOSE:
            return 0
        return -1


def open_uart(port, baud):
    """The link UART by board name ("uart1"), as a non-blocking stream."""
    try:
        base = _UARTS[port]
    except KeyError:
        raise ValueError("qemu board: no UART %r (have %s)" % (port, ", ".join(sorted(_UARTS))))
    return UART(base, baud)


def heap_free():
    """Free heap after the last collection (the node collects once per cycle).

    Not collecting here keeps the whole cycle's allocations in place until the sampler's own
    collection, so the heap in use just before it (the node's heap_peak) is the cycle's
    high-water mark.
    """
    size, live, _, collections, _ = mps2.heap_stats()
    if not collections:
        gc.collect()
        size, live = mps2.heap_stats()[:2]
    return size - live


def heap_peak():
    """Most heap in use at any moment since boot: checked by the board at every collection."""
    return mps2.heap_stats()[2]


class _Street:
    """The simulated street's end of the sensor buses, over a UART the harness bridges to it.

    The same transactions (sim/wire.py) the unix board sends over a socket: the chip models
    run on the host, outside this board's heap, as real chips sit outside an ESP32's.
    """

    def __init__(self, uart, wire, timeout_ms=1000):
        self._uart = uart
        self._wire = wire
        self._head = struct.calcsize(wire.REPLY)
        self._timeout = timeout_ms

    def _read_exact(self, n):
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        start = time.ticks_ms()
        while got < n:
            if self._uart.any():  # slice only then: waiting must not allocate
                got += self._uart.readinto(mv[got:])
            elif time.ticks_diff(time.ticks_ms(), start) > self._timeout:
                raise OSError(errno.ETIMEDOUT)
        return buf

    def call(self, op, bus, addr=0, mem=0, nread=0, data=b""):
        u = self._uart
        while u.any():  # a reply that came after its call timed out: not this call's
            u.read()
        out = struct.pack(self._wire.REQUEST, op, bus, addr, mem, nread, len(data)) + data
        mv = memoryview(out)
        while mv:
            sent = u.write(mv)
            if sent:
                mv = mv[sent:]
        err, n = struct.unpack(self._wire.REPLY, self._read_exact(self._head))
        reply = bytes(self._read_exact(n)) if n else b""
        if err:
            raise OSError(err)
        return reply


def sensor_buses(board, cfg):
    """The board's sensor buses, carried over UART2 to the simulated street: (buses, time scale).

    cfg["sim"] holds the scenario (docs/sensors.md); its "uart" names the bridged UART. The bus
    classes are the unix board's: only the transport differs.
    """
    from sim import wire

    from .unix import ADC, I2C
    from .unix import UART as SimUART

    sim = cfg.get("sim") or {}
    street = _Street(open_uart(sim.get("uart", "uart2"), 115200), wire)
    buses = {}
    for i, name in enumerate(wire.bus_names(board)):
        kind = SimUART if name in board.get("uart", {}) else (
            ADC if name in board.get("adc", {}) else I2C)
        buses[name] = kind(street, i)
    return buses, sim.get("chip_speed", 1)
