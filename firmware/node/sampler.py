"""Sampling: warm-up, oversampling with a median, quality flags, failure isolation, rediscovery.

Every sensor entry of the board file becomes a slot. Each interval the sampler reads every
present sensor OVERSAMPLE times, PERIOD_MS apart (the chip's conversion time), keeps the median
of each measurement rounded to the chip's PLACES, retries a failed read once, and flags what it
saw (docs/measurements.md).
A sensor that fails ABSENT_AFTER intervals in a row is dropped and probed from scratch every
interval until it answers again (plugged back in, powered up). No sensor can stop another.
"""

import asyncio
import time

from . import drivers
from .drivers import CRCError, NackError, SensorError, SensorTimeout
from .senml import quantize

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# quality flags, one bit each (docs/measurements.md "Quality flags")
WARMUP = const(1)  # the sensor is within its warm-up time: the value may be off-spec
RANGE = const(2)  # outside the chip's rated range, or the chip flagged an overflow (no value)
STALE = const(4)  # no new reading this interval (the chip's cadence is slower): no value
STUCK = const(8)  # the chip's outputs have not changed for STUCK_AFTER intervals: frozen
CRC = const(16)  # a CRC/checksum mismatch this interval (the read was retried)
NACK = const(32)  # the chip did not acknowledge this interval (the read was retried)
TIMEOUT = const(64)  # a bus or data-ready timeout this interval (the read was retried)
FAILED = const(128)  # no value: every attempt this interval failed (cause in the bits above)
ABSENT = const(256)  # no value: the sensor is not answering and is being probed again
FLAG_NAMES = ("warmup", "range", "stale", "stuck", "crc", "nack", "timeout", "failed", "absent")

STUCK_AFTER = const(6)
ABSENT_AFTER = const(3)
_FAIL = "fail"  # sentinel: every attempt of a read failed
_RAW_MAX = const(12)


def flag_names(bits):
    """The names of the bits set, for logs and tools."""
    return [n for i, n in enumerate(FLAG_NAMES) if bits & (1 << i)]


def _cause(e):
    if isinstance(e, CRCError):
        return CRC
    if isinstance(e, NackError):
        return NACK
    if isinstance(e, SensorTimeout):
        return TIMEOUT
    return 0


class Slot:
    """One sensor of the board: its driver while present, and what the sampler remembers."""

    def __init__(self, spec, bus):
        self.chip = spec["chip"]
        info = drivers.CHIPS[self.chip]
        self.address = spec.get("address")
        self.bus = bus
        self.bus_name = spec["bus"]
        self.options = spec.get("options") or {}
        self.oversample = spec.get("oversample", 0)
        self.names = tuple(spec.get("measurements") or info[3])
        where = "0x%02x" % self.address if isinstance(self.address, int) else self.bus_name
        self.label = "%s@%s" % (self.chip, where)
        self.driver = None
        self.started = 0
        self.fails = 0
        self.errors = 0  # failed read attempts and probes since boot
        self.last = None  # the watched values of the previous fresh reading (stuck detection)
        self.same = 0  # how many fresh readings in a row repeated them exactly
        self.down = False  # reported as not answering (logged once per outage)

    # the driver's face, for self-tests (node/commands.py) while the sensor is present
    @property
    def name(self):
        return self.label

    @property
    def RANGES(self):  # noqa: N802 - mirrors the drivers' attribute
        return getattr(self.driver, "RANGES", {})

    @property
    def PERIOD_MS(self):  # noqa: N802
        return getattr(self.driver, "PERIOD_MS", 100)

    def read(self):
        if self.driver is None:
            try:
                self.driver = drivers.open(self.chip, self.bus, self.address, self.options)
                self.started = time.ticks_ms()
            except Exception as e:  # noqa: BLE001
                raise SensorError("%s: not answering (%r)" % (self.label, e))
        return self.driver.read()

    def raw(self):
        """The first bytes the driver last read from the chip (a REPLY frame is small)."""
        for name in ("_data", "_buf", "_frame", "_one"):
            buf = getattr(self.driver, name, None)
            if buf is not None:
                return bytes(buf[:_RAW_MAX])
        return None


class Sampler:
    def __init__(self, board, buses, time_scale=1, log=print):
        self.time_scale = time_scale
        self.log = log
        self.slots = []
        for spec in board.get("sensors", ()):
            if "chip" not in spec:
                continue  # a placeholder entry for HALs without sensor_buses (board.py)
            slot = Slot(spec, buses.get(spec["bus"]))
            self.slots.append(slot)
            self._open(slot)

    def __iter__(self):
        return iter(self.slots)

    def __len__(self):
        return len(self.slots)

    def errors(self):
        return sum(s.errors for s in self.slots)

    def status(self):
        """(label, present, errors since boot) per sensor, for diagnostics."""
        return [(s.label, s.driver is not None, s.errors) for s in self.slots]

    def _open(self, slot):
        """Probe and configure a sensor; the cause flags if it does not answer."""
        if slot.bus is None:
            if not slot.down:
                self.log("sensor %s: this board's HAL provides no bus '%s'" % (
                    slot.label, slot.bus_name))
                slot.down = True
            return 0
        try:
            slot.driver = drivers.open(slot.chip, slot.bus, slot.address, slot.options)
        except Exception as e:  # noqa: BLE001 - whatever one sensor does, the others go on
            slot.errors += 1
            if not slot.down:
                self.log("sensor %s: not answering (%r); probing it every interval" % (
                    slot.label, e))
                slot.down = True
            return _cause(e)
        slot.started = time.ticks_ms()
        slot.fails = 0
        slot.last = None
        slot.same = 0
        if slot.down:
            self.log("sensor %s: answering again" % slot.label)
            slot.down = False
        return 0

    def _read(self, slot):
        """One reading with one retry: (result or None or _FAIL, cause flags)."""
        f = 0
        for _ in range(2):
            try:
                return slot.driver.read(), f
            except SensorError as e:
                f |= _cause(e)
            except Exception as e:  # noqa: BLE001 - a driver bug must not stop the node
                if not slot.down:
                    self.log("sensor %s: read failed: %r" % (slot.label, e))
            slot.errors += 1
        return _FAIL, f

    async def sample(self):
        """Read every sensor: {name: value, "<name>.q": flag bits} for this interval."""
        rounds = self._rounds()
        for ms in rounds:
            await asyncio.sleep(ms / 1000)
        return self._values

    def sample_blocking(self):
        """The same, sleeping between oversampled readings (benchmarks, self-tests)."""
        for ms in self._rounds():
            time.sleep_ms(ms)
        return self._values

    def _rounds(self):
        """Read all sensors round by round; yields the pause (ms) before each further round."""
        n = len(self.slots)
        causes = [0] * n
        results = [[] for _ in range(n)]
        failed = [False] * n
        rounds = 0
        spacing = 0
        for i, slot in enumerate(self.slots):
            if slot.driver is None:
                causes[i] = self._open(slot)
            d = slot.driver
            if d is not None:
                k = slot.oversample or d.OVERSAMPLE
                rounds = max(rounds, k)
                if k > 1:
                    spacing = max(spacing, d.PERIOD_MS)
        for r in range(rounds):
            if r:
                # the chips' own clock may run faster than ours (simulated boards)
                yield max(1, int(spacing / self.time_scale))
            for i, slot in enumerate(self.slots):
                d = slot.driver
                if d is None or failed[i] or r >= (slot.oversample or d.OVERSAMPLE):
                    continue
                v, f = self._read(slot)
                causes[i] |= f
                if v is _FAIL:
                    failed[i] = True
                elif v is not None:
                    results[i].append(v)
        values = {}
        now = time.ticks_ms()
        for i, slot in enumerate(self.slots):
            self._finish(slot, results[i], failed[i], causes[i], now, values)
        self._values = values

    def _finish(self, slot, results, failed, f, now, values):
        d = slot.driver
        fresh = None
        if d is None:
            f |= FAILED | ABSENT
        elif results:
            slot.fails = 0
            fresh = results
        elif failed:
            slot.fails += 1
            f |= FAILED
            if slot.fails >= ABSENT_AFTER:
                slot.driver = None
                slot.errors += 1
                f |= ABSENT
                if not slot.down:
                    self.log("sensor %s: not answering for %d intervals (%s); probing it "
                             "every interval" % (slot.label, slot.fails,
                                                 ",".join(flag_names(f & (CRC | NACK | TIMEOUT)))))
                    slot.down = True
        else:
            f |= STALE
        if d is not None and time.ticks_diff(now, slot.started) * self.time_scale < d.WARMUP_MS:
            f |= WARMUP
        ranges = getattr(d, "RANGES", None) or {}
        places = getattr(d, "PLACES", None) or {}
        if fresh is not None and getattr(d, "STUCK", ()):
            # a frozen chip repeats every output exactly; noise makes that vanishingly rare
            # for a live one, so all watched outputs must repeat, not just one
            sig = tuple(_median(fresh, n) for n in d.STUCK)
            slot.same = slot.same + 1 if sig == slot.last else 0
            slot.last = sig
            if slot.same >= STUCK_AFTER - 1:
                f |= STUCK
        for name in slot.names:
            nf = f
            if fresh is not None:
                v = _median(fresh, name)
                if v is None:
                    nf |= RANGE if any(name in r for r in fresh) else STALE
                else:
                    lim = ranges.get(name)
                    if lim and not lim[0] <= v <= lim[1]:
                        nf |= RANGE
                    # the sensor's resolution, the same number on every VM (docs/protocol.md)
                    values[name] = quantize(v, places.get(name))
            if nf:
                values[name + ".q"] = nf


def _median(results, name):
    """The median of one measurement over the oversampled readings (None if none had it)."""
    vals = sorted(r[name] for r in results if r.get(name) is not None)
    return vals[len(vals) // 2] if vals else None
