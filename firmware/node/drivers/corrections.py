"""Corrections of the sampler's readings, each sent beside the raw value (docs/corrections.md).

- Offsets (node config "offsets"): added to temperature, humidity and the sound levels; the
  offset itself goes out as "<name>_offset", so the raw reading is the sent one minus it.
- Particulate mass corrected for humidity by kappa-Koehler hygroscopic growth (Crilley et al.
  2018): "<pm>_corr" = <pm> / (1 + (kappa / DENSITY) * aw / (1 - aw)), aw = RH / 100; the
  kappa travels as "pm_kappa" when it is not the documented default.
- Pressure compensation: chips that take the ambient pressure (SCD4x) get the node's last good
  pressure reading before each interval's measurements.

node/sampler.py imports this module only for a board and config with something to correct,
and only while it computes: it keeps setup()'s plain state and gives the code back after each
apply() (on a deployed ESP32 the bytecode sits in the heap). The chips' pressure feed is the
sampler's own (Sampler._feed).
"""

from ..senml import quantize

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


def setup(cfg, log=print):
    """Node config "offsets" and "corrections", checked once: a bad entry is logged and left
    out, and the node samples on. Returns the settings and state the sampler keeps: plain
    data, so that this module's code can be given back between cycles."""
    corr = cfg.get("corrections") or {}
    k = corr.get("kappa", KAPPA)
    if not (_number(k) and 0 <= k <= 2):
        log("corrections.kappa: expected a number 0..2, got %r; using %s" % (k, KAPPA))
        k = KAPPA
    m = corr.get("rh_max", RH_MAX)
    if not (_number(m) and 50 <= m <= 100):
        log("corrections.rh_max: expected 50..100 %%RH, got %r; using %s" % (m, RH_MAX))
        m = RH_MAX
    offsets = {}
    given = cfg.get("offsets") or {}
    for name in given:
        off = given[name]
        if name not in OFFSETS or not _number(off):
            log("offsets.%s: expected a number for one of %s, got %r; ignored" % (
                name, ", ".join(OFFSETS), off))
        elif off:
            offsets[name] = off
    return {
        "pm_humidity": corr.get("pm_humidity", True) is not False,
        "co2_pressure": corr.get("co2_pressure", True) is not False,
        "kappa": k, "rh_max": m, "offsets": offsets,
        "pressure": None,  # Pa, the last good pressure reading (the sampler feeds the CO2 chip)
        "places": {},  # measurement -> its driver's PLACES (an offset keeps them)
    }


def _place(fix, slots, name):
    places = fix["places"]
    if name not in places:
        for slot in slots:
            d = slot.driver
            if d is not None and name in slot.names():
                places[name] = (getattr(d, "PLACES", None) or {}).get(name)
    return places.get(name)


def apply(fix, slots, values):
    """Offsets, then the particulate humidity correction, each beside the raw value; keep
    the pressure for the CO2 chip's next measurement (fix: what setup returned)."""
    from ..sampler import RANGE, STUCK, WARMUP  # loaded: the sampler calls this

    offsets = fix["offsets"]
    for name in offsets:
        v = values.get(name)
        if v is None:
            continue
        off = offsets[name]
        v = v + off
        if name == "humidity":
            v = 0 if v < 0 else 100 if v > 100 else v
        p = _place(fix, slots, name)
        values[name] = quantize(float(v), p)
        values[name + "_offset"] = quantize(float(off), p)
    p = values.get("pressure")
    if p is not None and not values.get("pressure.q", 0) & (RANGE | STUCK):
        fix["pressure"] = p
    rh = values.get("humidity")
    if not fix["pm_humidity"] or rh is None:
        return
    # what makes a corrected value suspect: either input warming up, out of range or
    # frozen; the bus diagnostics (crc, nack, timeout: a retry succeeded) stay on the raw
    valid = WARMUP | RANGE | STUCK
    hq = values.get("humidity.q", 0)
    kappa = fix["kappa"]
    c = humidity_factor(rh, kappa, fix["rh_max"])
    done = False
    for name in PM_NAMES:
        v = values.get(name)
        if v is None:
            continue
        f = (values.get(name + ".q", 0) | hq) & valid
        if c is None:
            f |= RANGE  # too humid to correct: the raw value alone goes out
        else:
            p = _place(fix, slots, name)
            values[name + "_corr"] = quantize(v / c, 0 if p is None else p)
            done = True
        if f:
            values[name + "_corr.q"] = f
    if done and kappa != KAPPA:
        # the method's parameter travels with the data unless it is the documented default
        values["pm_kappa"] = quantize(float(kappa), 3)
