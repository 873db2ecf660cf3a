"""Corrections of the sampler's readings, each sent beside the raw value (docs/corrections.md).

- Offsets (node config "offsets"): added to temperature, humidity and the sound levels; the
  offset itself goes out as "<name>_offset", so the raw reading is the sent one minus it.
- Particulate mass corrected for humidity by kappa-Koehler hygroscopic growth (Crilley et al.
  2018): "<pm>_corr" = <pm> / (1 + (kappa / DENSITY) * aw / (1 - aw)), aw = RH / 100; the
  kappa travels as "pm_kappa" when it is not the documented default.
- Pressure compensation: chips that take the ambient pressure (SCD4x) get the node's last good
  pressure reading before each interval's measurements.

node/sampler.py imports this module only for a board and config with something to correct,
so a board without it carries none of this code.
"""

from ..senml import quantize
from . import SensorError

OFFSETS = ("temperature", "humidity", "LAeq", "LAmax")  # what node config "offsets" may shift
PM_NAMES = ("pm1", "pm2_5", "pm4", "pm10")
KAPPA = 0.4  # bulk hygroscopicity of the street's aerosol, node config corrections.kappa
DENSITY = 1.65  # dry particle density relative to water (Crilley et al. 2018)
RH_MAX = 98  # at and above it no corrected value: the growth term diverges (fog, condensation)


def humidity_factor(rh, kappa=KAPPA, rh_max=RH_MAX):
    """kappa-Koehler mass growth of particles at relative humidity rh (%): the factor a wet
    reading is divided by, C = 1 + (kappa / DENSITY) * aw / (1 - aw) with aw = rh / 100;
    None at or above rh_max."""
    if rh >= rh_max:
        return None
    aw = rh / 100 if rh > 0 else 0.0
    return 1 + kappa / DENSITY * aw / (1 - aw)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x - x == 0


class Corrections:
    """Node config "offsets" and "corrections", checked once: a bad entry is logged and left
    out, and the node samples on."""

    def __init__(self, slots, cfg, log=print):
        # the sampler's flags: imported here, not at the top, so that this module alone
        # compiles in a small heap (the sampler has always loaded it before)
        from .. import sampler

        self._cause = sampler._cause
        self._warmup, self._range, self._stuck = sampler.WARMUP, sampler.RANGE, sampler.STUCK
        self.slots = slots
        self.log = log
        corr = cfg.get("corrections") or {}
        self.pm_humidity = corr.get("pm_humidity", True) is not False
        self.co2_pressure = corr.get("co2_pressure", True) is not False
        k = corr.get("kappa", KAPPA)
        if not (_number(k) and 0 <= k <= 2):
            log("corrections.kappa: expected a number 0..2, got %r; using %s" % (k, KAPPA))
            k = KAPPA
        self.kappa = k
        m = corr.get("rh_max", RH_MAX)
        if not (_number(m) and 50 <= m <= 100):
            log("corrections.rh_max: expected 50..100 %%RH, got %r; using %s" % (m, RH_MAX))
            m = RH_MAX
        self.rh_max = m
        self.offsets = {}
        offsets = cfg.get("offsets") or {}
        for name in offsets:
            off = offsets[name]
            if name not in OFFSETS or not _number(off):
                log("offsets.%s: expected a number for one of %s, got %r; ignored" % (
                    name, ", ".join(OFFSETS), off))
            elif off:
                self.offsets[name] = off
        self.pressure = None  # Pa, the last good pressure reading (fed to the CO2 chip)
        self._places = {}  # measurement -> its driver's PLACES (an offset keeps them)

    def feed(self, due):
        """Give the due chips that compensate for pressure the last good pressure reading;
        due is the sampler's [slot, cause flags, ...] per sensor."""
        p = self.pressure
        if p is None or not self.co2_pressure:
            return
        for e in due:
            slot = e[0]
            d = slot.driver
            if d is None or not hasattr(d, "set_pressure"):
                continue
            try:
                d.set_pressure(p)
            except SensorError as x:
                e[1] |= self._cause(x)
                slot.errors += 1
            except Exception as x:  # noqa: BLE001 - a driver bug must not stop the node
                slot.errors += 1
                if not slot.down:
                    self.log("sensor %s: cannot set pressure: %r" % (slot.label, x))

    def _place(self, name):
        if name not in self._places:
            for slot in self.slots:
                d = slot.driver
                if d is not None and name in slot.names():
                    self._places[name] = (getattr(d, "PLACES", None) or {}).get(name)
        return self._places.get(name)

    def apply(self, values):
        """Offsets, then the particulate humidity correction, each beside the raw value; keep
        the pressure for the CO2 chip's next measurement."""
        for name in self.offsets:
            v = values.get(name)
            if v is None:
                continue
            off = self.offsets[name]
            v = v + off
            if name == "humidity":
                v = 0 if v < 0 else 100 if v > 100 else v
            p = self._place(name)
            values[name] = quantize(float(v), p)
            values[name + "_offset"] = quantize(float(off), p)
        p = values.get("pressure")
        rng, stuck = self._range, self._stuck
        if p is not None and not values.get("pressure.q", 0) & (rng | stuck):
            self.pressure = p
        rh = values.get("humidity")
        if not self.pm_humidity or rh is None:
            return
        # what makes a corrected value suspect: either input warming up, out of range or
        # frozen; the bus diagnostics (crc, nack, timeout: a retry succeeded) stay on the raw
        valid = self._warmup | rng | stuck
        hq = values.get("humidity.q", 0)
        c = humidity_factor(rh, self.kappa, self.rh_max)
        done = False
        for name in PM_NAMES:
            v = values.get(name)
            if v is None:
                continue
            f = (values.get(name + ".q", 0) | hq) & valid
            if c is None:
                f |= rng  # too humid to correct: the raw value alone goes out
            else:
                p = self._place(name)
                values[name + "_corr"] = quantize(v / c, 0 if p is None else p)
                done = True
            if f:
                values[name + "_corr.q"] = f
        if done and self.kappa != KAPPA:
            # the method's parameter travels with the data unless it is the documented default
            values["pm_kappa"] = quantize(float(self.kappa), 3)
