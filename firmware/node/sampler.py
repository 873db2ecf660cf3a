"""Sampling: warm-up, oversampling with a median, quality flags, failure isolation, rediscovery,
cadences, power-down between measurements, and the node's energy estimate.

Every sensor entry of the board file becomes a slot. Each interval the sampler reads every
present sensor that is due OVERSAMPLE times, PERIOD_MS apart (the chip's conversion time), keeps
the median of each measurement rounded to the chip's PLACES, retries a failed read once, and
flags what it saw (docs/measurements.md).
A sensor that fails ABSENT_AFTER intervals in a row is dropped and probed from scratch every
interval until it answers again (plugged back in, powered up). No sensor can stop another.

Power (docs/sensors.md "Energy"): a slow or costly sensor gets its own cadence (node config
"cadence_ms"); with "power_down" a chip whose driver can sleep is woken just long enough for its
warm-up and measurement (the board's current model), staggered so that all finish together, and
put back to sleep. Every state a chip spends time in is charged at the board's current for it,
and energy() adds the microcontroller and the radio: mJ per interval and per reading, and the
days a cell lasts. A low battery (node config "battery_low") stretches every cadence.
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
SAVING = const(512)  # on battery.q: the battery is low and the node has lowered its cadence
FLAG_NAMES = ("warmup", "range", "stale", "stuck", "crc", "nack", "timeout", "failed", "absent",
              "saving")

# a chip's power state, as drivers that can sleep report it in `power` (docs/sensors.md)
SLEEP = const(0)
IDLE = const(1)
MEASURE = const(2)

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
        # the board's current model of this chip (mA, uA, ms) and the charge it drew (mA*ms)
        self.model = spec.get("power") or {}
        self.charge = 0.0
        self.since = time.ticks_ms()
        self.every = 1  # read every n-th interval

    def current(self):
        """mA the chip draws in its present power state (absent: its sleep current)."""
        m = self.model
        d = self.driver
        state = getattr(d, "power", MEASURE) if d is not None else SLEEP
        if state == MEASURE:
            return m.get("measure_ma", 0)
        if state == IDLE:
            return m.get("idle_ma", m.get("measure_ma", 0))
        return m.get("sleep_ua", 0) / 1000

    def account(self, now):
        """Charge the time since the last call at the present state's current."""
        self.charge += time.ticks_diff(now, self.since) * self.current()
        self.since = now

    def need_ms(self):
        """Chip ms from waking to a reading: the board's warm-up and measurement times."""
        m = self.model
        d = self.driver
        return m.get("warmup_ms", d.WARMUP_MS) + m.get("measure_ms", d.PERIOD_MS)

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
    def __init__(self, board, buses, time_scale=1, log=print, cfg=None, lightsleep=None):
        cfg = cfg or {}
        self.time_scale = time_scale
        self.log = log
        # node config (docs/configuration.md): the interval, each chip's own cadence, whether
        # sensors sleep between measurements (by default on real boards) and the MCU between
        # intervals, and when a low battery stretches the cadence
        self.interval_ms = cfg.get("interval_ms", 60000)
        self.cadence = cfg.get("cadence_ms") or {}
        self.power_down = cfg.get("power_down", board.get("hal") == "esp32")
        self.deep_sleep = cfg.get("deep_sleep", False)
        self.low = cfg.get("battery_low") or {}
        self.link = (cfg.get("link") or {}).get("type", "uart")
        self.lightsleep = lightsleep  # the HAL's light sleep for the pauses (None: busy wait)
        model = board.get("power") or {}
        self.volts = model.get("supply_v", 3.7)
        self.mcu = model.get("mcu") or {}
        self.radio = model.get("radio") or {}
        self.cell_mah = cfg.get("cell_mah", (model.get("cell") or {}).get("mah", 0))
        self.factor = 1  # the cadence divisor a low battery imposes (1: normal)
        self.cycle = 0
        self._values = {}
        self._waited = 0
        # energy since boot, in mA*ms: mcu, radio, per chip; and what it bought
        self.charge = {"mcu": 0.0, "radio": 0.0}
        self.covered_ms = 0
        self.intervals = 0
        self.readings = 0
        self.last_charge = 0.0
        self.slots = []
        for spec in board.get("sensors", ()):
            if "chip" not in spec:
                continue  # a placeholder entry for HALs without sensor_buses (board.py)
            slot = Slot(spec, buses.get(spec["bus"]))
            self.slots.append(slot)
            self._open(slot)
            slot.every = self._every(slot)
            self._rest(slot, self._long(slot))

    def __iter__(self):
        return iter(self.slots)

    def __len__(self):
        return len(self.slots)

    def errors(self):
        return sum(s.errors for s in self.slots)

    def status(self):
        """(label, present, errors since boot) per sensor, for diagnostics."""
        return [(s.label, s.driver is not None, s.errors) for s in self.slots]

    @property
    def interval_factor(self):
        """How many times interval_ms the node should wait now: a low battery stretches the
        interval (and with it every cadence) to save the boot, the sensors and the radio."""
        return self.factor

    def _managed(self, slot):
        return self.power_down and slot.driver is not None and hasattr(slot.driver, "sleep")

    def _long(self, slot):
        """Whether the gap to the chip's next reading pays for its deepest sleep."""
        gap = slot.every * self.factor * self.interval_ms
        return gap >= getattr(slot.driver, "SLEEP_AFTER_MS", 0)

    def _rest(self, slot, long):
        """Put a managed chip to sleep (deep if the gap pays for the wake-up)."""
        if not self._managed(slot):
            return
        slot.account(time.ticks_ms())
        try:
            slot.driver.sleep(long)
        except Exception as e:  # noqa: BLE001 - a chip that cannot sleep is still read
            slot.errors += 1
            self.log("sensor %s: cannot sleep: %r" % (slot.label, e))

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
        slot.since = slot.started
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
        """Read every due sensor: {name: value, "<name>.q": flag bits} for this interval."""
        for ms in self._rounds():
            await asyncio.sleep(ms / 1000)
        return self._values

    def sample_blocking(self):
        """The same, sleeping between readings (benchmarks, self-tests, a deep-sleeping node)."""
        for ms in self._rounds():
            if self.lightsleep is not None:
                self.lightsleep(ms)
            else:
                time.sleep_ms(ms)
        return self._values

    def _every(self, slot):
        n = 1
        ms = self.cadence.get(slot.chip)
        if ms and self.interval_ms:
            n = max(1, (ms + self.interval_ms // 2) // self.interval_ms)
        return n

    def _rounds(self):
        """Wake, read and put to sleep the due sensors; yields each pause (ms) on the way."""
        t0 = time.ticks_ms()
        self._waited = 0
        c = self.cycle
        self.cycle += 1
        n = len(self.slots)
        causes = [0] * n
        results = [[] for _ in range(n)]
        failed = [False] * n
        due = [False] * n
        waking = []
        for i, slot in enumerate(self.slots):
            slot.since = t0  # the previous interval's rest was charged when it ended
            slot.every = self._every(slot)
            if c % slot.every:
                continue
            due[i] = True
            if slot.driver is None:
                causes[i] = self._open(slot)
            if self._managed(slot):
                waking.append((int(slot.need_ms() / self.time_scale), i))
        # wake the slowest first and each one just in time, so that all are ready together
        waking.sort(reverse=True)
        for k, (ms, i) in enumerate(waking):
            slot = self.slots[i]
            slot.account(time.ticks_ms())
            try:
                slot.driver.wake()
                slot.started = time.ticks_ms()
            except SensorError as e:
                causes[i] |= _cause(e)
                slot.errors += 1
            except Exception as e:  # noqa: BLE001
                slot.errors += 1
                self.log("sensor %s: cannot wake: %r" % (slot.label, e))
            gap = ms - (waking[k + 1][0] if k + 1 < len(waking) else 0)
            if gap > 0:
                self._waited += gap
                yield gap
        rounds = 0
        spacing = 0
        for i, slot in enumerate(self.slots):
            d = slot.driver
            if due[i] and d is not None:
                k = slot.oversample or d.OVERSAMPLE
                rounds = max(rounds, k)
                if k > 1:
                    spacing = max(spacing, d.PERIOD_MS)
        for r in range(rounds + 1):
            if r == rounds:
                # a chip may ask for one more wait (SCD41: the first shot after power-down
                # is discarded, datasheet §3.10.4)
                again = [i for i in range(n) if due[i] and self.slots[i].driver is not None
                         and getattr(self.slots[i].driver, "again_ms", 0)]
                if not again:
                    break
                ms = max(self.slots[i].driver.again_ms for i in again)
                ms = max(1, int(ms / self.time_scale))
                self._waited += ms
                yield ms
            elif r:
                # the chips' own clock may run faster than ours (simulated boards)
                ms = max(1, int(spacing / self.time_scale))
                self._waited += ms
                yield ms
            for i, slot in enumerate(self.slots):
                d = slot.driver
                if not due[i] or d is None or failed[i]:
                    continue
                if r == rounds:
                    if not getattr(d, "again_ms", 0):
                        continue
                elif r >= (slot.oversample or d.OVERSAMPLE):
                    continue
                slot.account(time.ticks_ms())
                v, f = self._read(slot)
                causes[i] |= f
                if v is _FAIL:
                    failed[i] = True
                elif v is not None:
                    results[i].append(v)
        values = {}
        now = time.ticks_ms()
        for i, slot in enumerate(self.slots):
            if due[i]:
                self._finish(slot, results[i], failed[i], causes[i], now, values)
                self._rest(slot, self._long(slot))
        self._battery(values)
        self._values = values
        self._charge(t0, values)

    def _battery(self, values):
        """Lower the cadence below battery_low.low_v (more below critical_v); flag it."""
        v = values.get("battery")
        low = self.low
        if v is None or not low:
            return
        hyst = low.get("hysteresis_v", 0.05)
        factor = 1
        if v < low.get("critical_v", 0) or (self.factor > 1 and v < low.get(
                "critical_v", 0) + hyst and self.factor == low.get("critical_factor", 6)):
            factor = low.get("critical_factor", 6)
        elif v < low.get("low_v", 0) or (self.factor > 1 and v < low.get("low_v", 0) + hyst):
            factor = low.get("low_factor", 3)
        if factor != self.factor:
            self.log("battery %.3f V: cadence divided by %d (was %d)" % (v, factor, self.factor))
            self.factor = factor
        if factor > 1:
            values["battery.q"] = values.get("battery.q", 0) | SAVING

    # ---------------------------------------------------------------- energy

    def _charge(self, t0, values):
        """Charge this interval: the cycle as it ran, then the rest of it at resting currents."""
        end = time.ticks_ms()
        cycle = time.ticks_diff(end, t0)
        mcu = self.mcu
        active = mcu.get("active_ma", 0)
        wait = self._waited if cycle >= self._waited else cycle
        q = (cycle - wait) * active
        q += wait * (mcu.get("light_sleep_ma", active) if self.lightsleep else active)
        interval = self.interval_ms * self.factor
        boot = mcu.get("boot_ms", 0) if self.deep_sleep else 0
        rest = interval - cycle - boot
        rest = rest if rest > 0 else 0
        q += boot * active
        q += rest * (mcu.get("deep_sleep_ua", 0) / 1000 if self.deep_sleep else active)
        radio = self.radio
        if self.link == "ble":
            r = (radio.get("ble_pack_ms", 0) + radio.get("ble_adv_ms", 0)) * radio.get("ble_ma", 0)
        else:
            r = radio.get("uart_pack_ms", 0) * radio.get("uart_ma", 0)
        ch = self.charge
        ch["mcu"] += q
        ch["radio"] += r
        total = q + r
        for slot in self.slots:
            slot.account(end)
            # what the chip draws through the rest of the interval, in the state it was left in
            slot.charge += (rest + boot) * slot.current()
            total += slot.charge - ch.get(slot.label, 0)
            ch[slot.label] = slot.charge
        self.last_charge = total
        self.covered_ms += max(interval, cycle + boot)
        self.intervals += 1
        self.readings += len([k for k in values if k[-2:] != ".q"])

    def awake(self, ms):
        """Charge ms of the node's own work after sampling (seal, store, send) at the MCU's
        active current instead of the sleep the interval's rest was charged at."""
        mcu = self.mcu
        rest = mcu.get("deep_sleep_ua", 0) / 1000 if self.deep_sleep else mcu.get("active_ma", 0)
        extra = ms * (mcu.get("active_ma", 0) - rest)
        self.charge["mcu"] += extra
        self.last_charge += extra

    def energy(self):
        """The node's energy since boot: mJ per interval and per reading, mAh a day, the days
        the configured cell lasts without charging, and where the budget goes (mJ/interval)."""
        n = self.intervals
        if not n:
            return None
        mj = self.volts / 1000  # mA*ms -> mJ
        total = sum(self.charge.values())
        ma = total / self.covered_ms if self.covered_ms else 0
        mah_day = ma * 24
        out = {"mj_interval": total * mj / n, "mj_last": self.last_charge * mj,
               "mj_reading": total * mj / self.readings if self.readings else 0,
               "mah_day": mah_day, "by": {k: v * mj / n for k, v in self.charge.items()}}
        if self.cell_mah and mah_day:
            out["days"] = self.cell_mah / mah_day
        return out

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
