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

Corrections (docs/corrections.md, node/drivers/corrections.py), loaded only by a board that
has something to correct: offsets, particulate humidity correction, the CO2 chip's pressure.
"""

import asyncio
import time

from . import drivers, unload
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


def corrections_apply(slots, cfg):
    """Whether this board and config have anything to correct (docs/corrections.md)."""
    corr = cfg.get("corrections") or {}
    names = set()
    for slot in slots:
        names.update(slot.names())
    return bool(cfg.get("offsets")) or (
        "humidity" in names and corr.get("pm_humidity", True) is not False and (
            "pm2_5" in names or "pm10" in names or "pm1" in names)) or (
        "co2" in names and corr.get("co2_pressure", True) is not False)


def _corrections():
    """node/drivers/corrections.py, loaded only while it computes (see its docstring)."""
    from .drivers import corrections

    return corrections


def _corrections_done():
    unload("drivers.corrections")


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
        # the board's entry (chip, address, bus, options, oversample, measurements, power)
        # stays in the board dict the node keeps: read from it, not copied per slot
        self.spec = spec
        self.chip = spec["chip"]
        self.bus = bus
        a = spec.get("address")
        where = "0x%02x" % a if isinstance(a, int) else spec["bus"]
        self.label = self.name = "%s@%s" % (self.chip, where)  # name: a driver's face
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

    def names(self):
        """The measurements this slot reports (the board's list, else the chip's)."""
        return self.spec.get("measurements") or drivers.CHIPS[self.chip][3]

    def open(self):  # noqa: A003
        s = self.spec
        self.driver = drivers.open(self.chip, self.bus, s.get("address"), s.get("options"))
        self.started = time.ticks_ms()

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

    @property
    def RANGES(self):  # noqa: N802 - the driver's face, for self-tests
        return getattr(self.driver, "RANGES", {})

    def read(self):
        if self.driver is None:
            try:
                self.open()
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
        # how many times interval_ms the node waits now: a low battery stretches the
        # interval (and with it every cadence) to save the boot, the sensors and the radio
        self.interval_factor = 1
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
            self._rest(slot)
        self.fix = None
        if corrections_apply(self.slots, cfg):
            # only a board with something to correct loads the corrections' code
            self.fix = _corrections().setup(cfg, log)
            _corrections_done()

    def __iter__(self):
        return iter(self.slots)

    def __len__(self):
        return len(self.slots)

    def errors(self):
        return sum(s.errors for s in self.slots)

    def _managed(self, slot):
        return self.power_down and slot.driver is not None and hasattr(slot.driver, "sleep")

    def _rest(self, slot):
        """Put a managed chip to sleep (deep if the gap to its next reading pays for the
        wake-up)."""
        if not self._managed(slot):
            return
        slot.account(time.ticks_ms())
        gap = slot.every * self.interval_factor * self.interval_ms
        try:
            slot.driver.sleep(gap >= getattr(slot.driver, "SLEEP_AFTER_MS", 0))
        except Exception as e:  # noqa: BLE001 - a chip that cannot sleep is still read
            slot.errors += 1
            self.log("sensor %s: cannot sleep: %r" % (slot.label, e))

    def _open(self, slot):
        """Probe and configure a sensor; the cause flags if it does not answer."""
        if slot.bus is None:
            if not slot.down:
                self.log("sensor %s: this board's HAL provides no bus '%s'" % (
                    slot.label, slot.spec["bus"]))
                slot.down = True
            return 0
        try:
            slot.open()
        except Exception as e:  # noqa: BLE001 - whatever one sensor does, the others go on
            slot.errors += 1
            if not slot.down:
                self.log("sensor %s: not answering (%r); probing it every interval" % (
                    slot.label, e))
                slot.down = True
            return _cause(e)
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

    def _feed(self, due):
        """Give the due chips that compensate for pressure the last good pressure reading
        (node config corrections.co2_pressure); due is [slot, cause flags, ...] per sensor."""
        p = self.fix["pressure"]
        if p is None or not self.fix["co2_pressure"]:
            return
        for e in due:
            slot = e[0]
            d = slot.driver
            if d is None or not hasattr(d, "set_pressure"):
                continue
            try:
                d.set_pressure(p)
            except SensorError as x:
                e[1] |= _cause(x)
                slot.errors += 1
            except Exception as x:  # noqa: BLE001 - a driver bug must not stop the node
                slot.errors += 1
                if not slot.down:
                    self.log("sensor %s: cannot set pressure: %r" % (slot.label, x))

    def _rounds(self):
        """Wake, read and put to sleep the due sensors; yields each pause (ms) on the way."""
        t0 = time.ticks_ms()
        self._waited = 0
        c = self.cycle
        self.cycle += 1
        scale = self.time_scale
        due = []  # [slot, cause flags, fresh readings, every attempt failed, again ms] per sensor
        waking = []
        for slot in self.slots:
            slot.since = t0  # the previous interval's rest was charged when it ended
            slot.every = self._every(slot)
            if c % slot.every:
                continue
            due.append([slot, self._open(slot) if slot.driver is None else 0, [], False])
            if self._managed(slot):
                waking.append((int(slot.need_ms() / scale), len(due) - 1))
        if self.fix is not None:
            self._feed(due)
        # wake the slowest first and each one just in time, so that all are ready together
        waking.sort(reverse=True)
        for k, (ms, j) in enumerate(waking):
            e = due[j]
            slot = e[0]
            slot.account(time.ticks_ms())
            try:
                slot.driver.wake()
                slot.started = time.ticks_ms()
            except SensorError as x:
                e[1] |= _cause(x)
                slot.errors += 1
            except Exception as x:  # noqa: BLE001
                slot.errors += 1
                self.log("sensor %s: cannot wake: %r" % (slot.label, x))
            gap = ms - (waking[k + 1][0] if k + 1 < len(waking) else 0)
            if gap > 0:
                self._waited += gap
                yield gap
        rounds = spacing = 0
        for e in due:
            d = e[0].driver
            # one more wait and read after the last round (SCD41: the first shot after a
            # power-down is discarded, datasheet §3.10.4), as the chip asked once awake: its
            # driver clears the wish when it discards that shot
            e.append(getattr(d, "again_ms", 0) if d is not None else 0)
            if d is not None:
                k = e[0].spec.get("oversample") or d.OVERSAMPLE
                rounds = max(rounds, k)
                if k > 1:
                    spacing = max(spacing, d.PERIOD_MS)
        for r in range(rounds + 1):
            ms = spacing
            if r == rounds:
                ms = max([e[4] for e in due] + [0])
                if not ms:
                    break
            if r or r == rounds:
                # the chips' own clock may run faster than ours (simulated boards)
                ms = max(1, int(ms / scale))
                self._waited += ms
                yield ms
            for e in due:
                slot = e[0]
                d = slot.driver
                if d is None or e[3] or (not e[4] if r == rounds
                                         else r >= (slot.spec.get("oversample") or d.OVERSAMPLE)):
                    continue
                slot.account(time.ticks_ms())
                v, f = self._read(slot)
                e[1] |= f
                if v is _FAIL:
                    e[3] = True
                elif v is not None:
                    e[2].append(v)
        values = {}
        now = time.ticks_ms()
        for slot, f, fresh, failed, _ in due:
            self._finish(slot, fresh, failed, f, now, values)
            self._rest(slot)
        if self.fix is not None:
            _corrections().apply(self.fix, self.slots, values)
            _corrections_done()
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
        was = self.interval_factor
        crit = low.get("critical_v", 0)
        lv = low.get("low_v", 0)
        factor = low.get("critical_factor", 6)
        if not (v < crit or (was > 1 and v < crit + hyst and was == factor)):
            factor = low.get("low_factor", 3) if v < lv or (was > 1 and v < lv + hyst) else 1
        if factor != was:
            self.log("battery %.3f V: cadence divided by %d (was %d)" % (v, factor, was))
            self.interval_factor = factor
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
        interval = self.interval_ms * self.interval_factor
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
        for name in slot.names():
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
