"""The street's weather, traffic, lamp and faults as pure functions of (seed, node, time).

Nothing here keeps state between calls: a value depends only on the seed, the node and the
scenario time, so two runs agree and a test can recompute what a node must have measured.
Scenario time runs `speed` times faster than the wall clock from `anchor_ms`; chip time (warm-up
and conversion periods inside the chip models) runs `chip_speed` times faster, so a compressed
day still sees a CO2 sensor refresh more than once per simulated hour.
"""

import math
import time

_M32 = 0xFFFFFFFF
_TWO_PI = 2 * math.pi

# noise channels
K_TMEAN = 1
K_TAMP = 2
K_DEW = 3
K_PRESS = 4
K_PM = 5
K_CO2 = 6
K_CLOUD = 7
K_NODE = 8
K_LMAX = 9
K_FAULT = 10
K_LAMP = 11  # a flickering lamp's on/off dice
K_CHIP = 16  # chip noise channels start here: K_CHIP + chip-specific offsets

FAULT_KINDS = ("nack", "crc", "stuck", "unplug", "slow")
# Faults of the street rather than of a chip's bus: target → kinds (docs/sensors.md "Faults")
STREET_FAULTS = {
    "lamp": ("dark", "dayburn", "flicker", "degraded"),  # the luminaire and its photocell
    "node": ("dead",),  # the whole node is off: no packs at all
    "battery": ("drain",),  # the backup cell loses its charge
}
FLICKER_SLOT_S = 120  # a flickering lamp is on or off for two minutes at a time
DEGRADED = 0.5  # a degraded lamp draws half its power (a failed LED string, a wrong lamp)
DRAIN_V_PER_H = 0.08  # a draining cell (its charger dead) loses this much an hour
DRAIN_FLOOR_V = 3.0  # ... down to where its protection cuts it off


def _mix(h):
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    return (h >> 16) ^ h


def hash32(a, b, c):
    return _mix(_mix(_mix(a & _M32) ^ (b & _M32)) ^ (c & _M32))


def name_hash(text):
    h = 2166136261
    for ch in text:
        h = ((h ^ ord(ch)) * 16777619) & _M32
    return h


def _bump(h, centre, width):
    d = (h - centre) / width
    return math.exp(-0.5 * d * d)


def saturation_hpa(t):
    """Magnus formula over water (WMO): saturation vapour pressure in hPa at t °C."""
    return 6.112 * math.exp(17.62 * t / (243.12 + t))


class Scenario:
    def __init__(self, cfg=None, node="SL-0001", wall_ms=None):
        cfg = cfg or {}
        self.seed = int(cfg.get("seed", 1))
        self.node = name_hash(node)
        self.speed = float(cfg.get("speed", 1))
        self.chip_speed = float(cfg.get("chip_speed", 1))
        self.anchor_ms = int(cfg.get("anchor_ms", 0)) or (
            wall_ms if wall_ms is not None else self.wall_ms())
        self.start_s = float(cfg.get("start_s", 0)) or self.anchor_ms / 1000
        self.tz_h = float(cfg.get("tz_h", 0))
        self.sunrise_h = float(cfg.get("sunrise_h", 6.0))
        self.sunset_h = float(cfg.get("sunset_h", 20.0))
        self.supply = cfg.get("supply", "panel")  # the cell's charger: "panel" or "lamp"
        self.faults = []
        for i, f in enumerate(cfg.get("faults", ())):
            kind = f.get("kind")
            chip = f.get("chip", "bus")
            street = STREET_FAULTS.get(chip, ())
            if kind in street:
                pass
            elif chip in ("lamp", "node"):
                raise ValueError("sim.faults[%d].kind: %r is not a %s fault (%s)" % (
                    i, kind, chip, ", ".join(street)))
            elif kind not in FAULT_KINDS:
                raise ValueError("sim.faults[%d].kind: %r is not one of %s" % (
                    i, kind, ", ".join(FAULT_KINDS + STREET_FAULTS["lamp"]
                                       + STREET_FAULTS["node"] + STREET_FAULTS["battery"])))
            self.faults.append((chip, kind, float(f.get("from_h", 0)),
                                float(f.get("to_h", 1e9)), float(f.get("rate", 1.0))))
        self.node_dt = 0.4 * self.u(K_NODE, 1)  # microclimate: a shaded or sunny post
        self.node_alt = 25 + 15 * self.u(K_NODE, 2)  # metres above sea level
        self.node_traffic = 0.8 + 0.2 * self.u(K_NODE, 3)  # busier or quieter corner

    # ---------------------------------------------------------------- clocks and noise
    @staticmethod
    def wall_ms():
        return time.time_ns() // 1000000

    def t(self, wall_ms=None):
        """Scenario time: Unix seconds (float) in the simulated street."""
        w = self.wall_ms() if wall_ms is None else wall_ms
        return self.start_s + (w - self.anchor_ms) * self.speed / 1000

    def hours_since_start(self, t):
        return (t - self.start_s) / 3600

    def chip_ms(self, wall_ms=None):
        """Time inside the chips (ms since the anchor), for warm-ups and conversion periods."""
        w = self.wall_ms() if wall_ms is None else wall_ms
        return (w - self.anchor_ms) * self.chip_speed

    def u(self, key, n):
        """Uniform in [-1, 1), a pure function of (seed, node, key, n)."""
        return hash32(self.seed ^ self.node, key, n) / 2147483648.0 - 1.0

    def gauss(self, key, n):
        """Approximately standard normal (sum of four uniforms)."""
        return 0.866 * (self.u(key, 4 * n) + self.u(key, 4 * n + 1) + self.u(key, 4 * n + 2)
                        + self.u(key, 4 * n + 3))

    def hour(self, t):
        return (t / 3600 + self.tz_h) % 24

    def _daily(self, key, t):
        """A per-day random level in [-1, 1), interpolated so midnight has no step."""
        x = (t / 3600 + self.tz_h) / 24 - 0.5
        d = math.floor(x)
        f = x - d
        d = int(d)
        return self.u(key, d) * (1 - f) + self.u(key, d + 1) * f

    # ---------------------------------------------------------------- weather
    def temperature(self, t):
        """Air temperature, °C: minimum at 05:00, maximum at 15:00."""
        h = self.hour(t)
        mean = 13 + 4 * self._daily(K_TMEAN, t) + self.node_dt
        amp = 5 + 1.5 * self._daily(K_TAMP, t)
        if 5 <= h < 15:
            shape = -math.cos(math.pi * (h - 5) / 10)
        else:
            shape = math.cos(math.pi * ((h - 15) % 24) / 14)
        return mean + amp * shape

    def humidity(self, t):
        """Relative humidity, %: from a dew point that stays put while the air warms up."""
        temp = self.temperature(t)
        dew = 13 + 4 * self._daily(K_TMEAN, t) - 6 + 2 * self._daily(K_DEW, t)
        dew = min(dew, temp - 0.3)
        return 100 * saturation_hpa(dew) / saturation_hpa(temp)

    def pressure(self, t):
        """Station pressure, Pa: a slow synoptic swing, lower on a higher post."""
        return (101325 + 900 * math.sin(_TWO_PI * t / (5 * 86400) + self.seed)
                + 250 * self._daily(K_PRESS, t) - 12 * self.node_alt)

    # ---------------------------------------------------------------- traffic
    def traffic(self, t):
        """Relative traffic: a daytime level with morning and evening rush-hour peaks."""
        h = self.hour(t)
        k = 0.08 + 0.35 * _bump(h, 14, 4.5) + 0.9 * _bump(h, 8, 0.9) + 0.8 * _bump(h, 17.5, 1.1)
        return k * self.node_traffic

    def pm2_5(self, t):
        return max(1.0, 6 + 2.5 * self._daily(K_PM, t) + 12 * self.traffic(t))

    def co2(self, t):
        return 418 + 8 * self._daily(K_CO2, t) + 60 * self.traffic(t)

    def laeq(self, t):
        """A-weighted equivalent sound level, dB."""
        return 44 + 10 * math.log10(1 + 25 * self.traffic(t))

    # ---------------------------------------------------------------- light, lamp, battery
    def daylight(self, t):
        """Illuminance on an upward-facing sensor, lx: sun by day, twilight, starlight."""
        h = self.hour(t)
        rise, sets = self.sunrise_h, self.sunset_h
        if rise < h < sets:
            s = math.sin(math.pi * (h - rise) / (sets - rise))
            cloud = 0.6 + 0.35 * self._daily(K_CLOUD, t)
            return 400 + 100000 * cloud * s ** 1.5
        dt = min((rise - h) % 24, (h - sets) % 24)
        return 400 * math.exp(-9 * dt) + 0.05

    def lamp_on(self, t):
        """The photocell switches the lamp below 30 lx: ~17 min after sunset until dawn."""
        return self.daylight(t) < 30

    def lamp_burning(self, t):
        """Whether the lamp gives light: the photocell's wish, unless a lamp fault says
        otherwise (dark: broken; dayburn: the photocell stuck closed; flicker: a failing lamp
        going out and striking again every few minutes while it should burn)."""
        on = self.lamp_on(t)
        if not self.faults:
            return on
        for kind, _ in self.faults_for("lamp", t):
            if kind == "dark":
                return False
            if kind == "dayburn":
                return True
            if kind == "flicker" and on:
                return self.u(K_LAMP, int(t // FLICKER_SLOT_S)) >= 0
        return on

    def lamp_power(self, t):
        """The LED luminaire's draw, W: 36 W, dimmed to 60 % from midnight to 05:00."""
        if not self.lamp_burning(t):
            return 0.0
        p = 36 * (0.6 if self.hour(t) < 5 else 1.0)
        if self.faults:
            for kind, _ in self.faults_for("lamp", t):
                if kind == "degraded":
                    p *= DEGRADED
        return p

    def node_up(self, t):
        """False while a "dead" fault has the node switched off (no packs at all)."""
        if not self.faults:
            return True
        for kind, _ in self.faults_for("node", t):
            if kind == "dead":
                return False
        return True

    def lamp_supply(self, t):
        """(volts, amps) at the lamp's 24 V supply, with the cable's drop and driver standby."""
        p = self.lamp_power(t)
        v = 24.2
        i = 0.012
        if p:
            i = p / (v - 0.25 * p / v)
            v = v - 0.25 * i
        return v, i

    def battery(self, t):
        """The node's backup cell, V: charged from the panel by day, drained overnight; with
        sim.supply "lamp", charged while the lamp is on and drained through the day. A
        "drain" fault (its charger dead) takes it down DRAIN_V_PER_H from the fault's start."""
        v = self._battery(t)
        if self.faults:
            hrs = self.hours_since_start(t)
            for c, kind, lo, hi, _ in self.faults:
                if c == "battery" and kind == "drain" and lo <= hrs < hi:
                    start = self._battery(self.start_s + lo * 3600)
                    v = min(v, max(DRAIN_FLOOR_V, start - DRAIN_V_PER_H * (hrs - lo)))
        return v

    def _battery(self, t):
        h = self.hour(t)
        if self.supply == "lamp":
            rise, sets = self.sunrise_h, self.sunset_h
            night = (rise - sets) % 24
            if self.lamp_on(t):
                soc = 0.3 + 0.65 * ((h - sets) % 24) / night
            else:
                soc = 0.95 - 0.65 * ((h - rise) % 24) / (24 - night)
            return 3.4 + 0.75 * min(0.95, max(0.3, soc))
        if 7 <= h < 16:
            soc = 0.3 + 0.65 * (h - 7) / 9
        else:
            soc = 0.95 - 0.65 * ((h - 16) % 24) / 15
        return 3.55 + 0.6 * soc

    # ---------------------------------------------------------------- faults
    def faults_for(self, chip, t):
        """The faults active on `chip` (or on the whole bus: chip "bus") at scenario time t."""
        hrs = self.hours_since_start(t)
        return [(kind, rate) for c, kind, lo, hi, rate in self.faults
                if c == chip and lo <= hrs < hi]

    def lmax_excess(self, n):
        """LAmax above LAeq for the n-th averaging window: passing vehicles, a door, a dog."""
        return 9 + 4 * self.u(K_LMAX, n)
