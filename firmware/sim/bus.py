"""Simulated I2C bus, UART and ADC with machine.I2C/UART/ADC's methods, and the fault injector.

A fault from the scenario applies per transaction: "nack" (the chip does not acknowledge:
OSError ENODEV, as MicroPython raises it), "crc" (a bit of the chip's reply flips on the wire),
"slow" (the chip or the whole bus, chip "bus", stretches the clock past the bus timeout:
OSError ETIMEDOUT), "unplug" (the chip is gone; plugged back it starts from power-on), "stuck"
(the chip's results stop changing; the chip model handles that one).
"""

import errno
import time

from .scenario import K_FAULT


class Chip:
    """Base of a chip model: power-on state, write and read transactions, the scenario."""

    CRC = False  # whether the chip's protocol would detect a corrupted byte

    def __init__(self, sc, chip, options=None):
        self.sc = sc
        self.chip = chip
        self.options = options or {}
        self.power_on()

    def power_on(self):
        pass

    def write(self, data):
        raise OSError(errno.EIO)

    def read(self, n):
        raise OSError(errno.EIO)

    def stuck(self):
        """True while a "stuck" fault freezes this chip's results."""
        for kind, _ in self.sc.faults_for(self.chip, self.sc.t()):
            if kind == "stuck":
                return True
        return False


class _Faults:
    """Per-bus dice for the scenario's faults, deterministic in the transaction count."""

    def __init__(self, sc):
        self.sc = sc
        self.n = 0
        self.seen = {}  # chip → scenario hours of its last transaction (for unplug windows)

    def roll(self, rate):
        self.n += 1
        return rate >= 1 or (self.sc.u(K_FAULT, self.n) + 1) / 2 < rate

    def check(self, dev):
        """Raise the OSError a faulty transaction gives; True if the reply is to be corrupted."""
        sc = self.sc
        t = sc.t()
        for kind, rate in sc.faults_for("bus", t):
            if kind == "slow" and self.roll(rate):
                time.sleep_ms(2)
                raise OSError(errno.ETIMEDOUT)
        if dev is None:
            raise OSError(errno.ENODEV)
        now_h = sc.hours_since_start(t)
        last_h = self.seen.get(dev.chip, now_h)
        self.seen[dev.chip] = now_h
        corrupt = False
        for c, kind, lo, hi, rate in sc.faults:
            if c != dev.chip:
                continue
            if kind == "unplug":
                if lo <= now_h < hi:
                    raise OSError(errno.ENODEV)
                if last_h < hi <= now_h:  # plugged back in since the last transaction
                    dev.power_on()
            elif lo <= now_h < hi:
                if kind == "nack" and self.roll(rate):
                    raise OSError(errno.ENODEV)
                if kind == "slow" and self.roll(rate):
                    time.sleep_ms(2)
                    raise OSError(errno.ETIMEDOUT)
                if kind == "crc" and self.roll(rate):
                    corrupt = True
        return corrupt

    def corrupt(self, buf):
        h = self.sc.u(K_FAULT, 1000003 + self.n)
        i = int((h + 1) / 2 * len(buf)) % len(buf)
        buf[i] ^= 1 << (self.n % 8)


class SimI2C:
    """machine.I2C's controller methods over the chip models attached at their addresses."""

    def __init__(self, sc, name="i2c0"):
        self.name = name
        self.devices = {}
        self.faults = _Faults(sc)

    def attach(self, address, model):
        if address in self.devices:
            raise ValueError("%s: two chips at 0x%02x" % (self.name, address))
        self.devices[address] = model

    def _dev(self, addr):
        dev = self.devices.get(addr)
        return dev, self.faults.check(dev)

    def scan(self):
        found = []
        for addr in sorted(self.devices):
            try:
                self._dev(addr)
                found.append(addr)
            except OSError:
                pass
        return found

    def writeto(self, addr, buf, stop=True):
        dev, _ = self._dev(addr)
        dev.write(bytes(buf))
        return len(buf)

    def readfrom_into(self, addr, buf, stop=True):
        dev, corrupt = self._dev(addr)
        data = dev.read(len(buf))
        buf[:] = data
        if corrupt and dev.CRC:
            self.faults.corrupt(buf)

    def readfrom(self, addr, nbytes, stop=True):
        buf = bytearray(nbytes)
        self.readfrom_into(addr, buf)
        return bytes(buf)

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        dev, _ = self._dev(addr)
        dev.write(bytes((memaddr,)) + bytes(buf))

    def readfrom_mem_into(self, addr, memaddr, buf, addrsize=8):
        dev, corrupt = self._dev(addr)
        dev.write(bytes((memaddr,)))
        buf[:] = dev.read(len(buf))
        if corrupt and dev.CRC:
            self.faults.corrupt(buf)

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        buf = bytearray(nbytes)
        self.readfrom_mem_into(addr, memaddr, buf)
        return bytes(buf)


class SimUART:
    """machine.UART's byte-stream methods over one chip model (a UART has one device)."""

    def __init__(self, sc, model):
        self.model = model
        self.faults = _Faults(sc)
        self._rx = bytearray()

    def write(self, buf):
        try:
            corrupt = self.faults.check(self.model)
        except OSError:
            return len(buf)  # nobody listening, or a reply that never comes: the host times out
        reply = self.model.receive(bytes(buf))
        if reply:
            reply = bytearray(reply)
            if corrupt:
                self.faults.corrupt(reply)
            self._rx += reply
        return len(buf)

    def any(self):
        more = self.model.poll()  # a sensor in active mode streams on its own
        if more:
            self._rx += more
        return len(self._rx)

    def read(self, nbytes=None):
        self.any()
        if not self._rx:
            return None
        n = len(self._rx) if nbytes is None else min(nbytes, len(self._rx))
        out = bytes(self._rx[:n])
        self._rx = self._rx[n:]
        return out

    def readinto(self, buf, nbytes=None):
        data = self.read(len(buf) if nbytes is None else nbytes)
        if not data:
            return None
        buf[: len(data)] = data
        return len(data)


class SimADC:
    """machine.ADC's read_uv over one model (a pin with a voltage on it)."""

    def __init__(self, sc, model):
        self.model = model
        self.faults = _Faults(sc)

    def read_uv(self):
        try:
            self.faults.check(self.model)
        except OSError:
            return 1000  # a disconnected divider: the pin floats near ground
        return self.model.read_uv()

    def read_u16(self):
        return min(65535, self.read_uv() * 65535 // 3300000)
