"""What a node's pack holds at scenario time t, straight from the street's functions.

The chip models (and the real drivers over them) make a node's readings one register at a
time; a gateway-side test over a simulated week needs only what arrives: canonical names →
values at the drivers' resolution, with the chips' noise and the sampler's quality flags
(`<name>.q`, docs/measurements.md). Every value is a pure function of (seed, node, interval
number), like the rest of the street, and the scenario's faults act on it as on the chips:
a `stuck` chip repeats its outputs (flagged `stuck` by the node after 6 intervals for the
chips whose noise makes that impossible), a `nack`/`unplug`/`slow` chip sends only flags
(`failed`, then `absent` from the third interval), a dead node sends nothing.
"""

from .scenario import K_CHIP

# chip → the measurements it publishes here, and their resolution (the drivers' PLACES)
CHIPS = {
    "bme280": (("temperature", 2), ("humidity", 2), ("pressure", 0)),
    "scd4x": (("co2", 0),),
    "sps30": (("pm2_5", 0), ("pm10", 0)),
    "bh1750": (("illuminance", 1),),
    "pcba_dbm": (("LAeq", 1), ("LAmax", 0)),
    "ina219": (("lamp_voltage", 3), ("lamp_current", 4), ("lamp_power", 2)),
    "battery": (("battery", 3),),
}
NODE_STUCK = ("bme280", "scd4x", "sps30")  # chips whose outputs the node checks for repeats
STUCK_AFTER = 6  # intervals of identical outputs before the node sets the flag
FLAG_STUCK = 8
FLAG_NACK = 32
FLAG_TIMEOUT = 64
FLAG_FAILED = 128
FLAG_ABSENT = 256
ABSENT_AFTER = 3  # failed intervals before the sampler calls a sensor absent


def _round(v, places):
    return int(round(v)) if places == 0 else round(v, places)


class Reporter:
    """A node's packs, one every `interval_s` of scenario time from `t0` (interval n at
    t0 + n * interval_s)."""

    def __init__(self, sc, interval_s=300.0, t0=None):
        self.sc = sc
        self.interval_s = float(interval_s)
        self.t0 = sc.start_s if t0 is None else float(t0)

    def time(self, n):
        return self.t0 + n * self.interval_s

    def _first(self, hours):
        """The first interval at or after `hours` since the scenario start."""
        t = self.sc.start_s + hours * 3600
        k = (t - self.t0) / self.interval_s
        n = int(k)
        return n if n == k else n + 1

    def values(self, n):
        """Every chip's healthy readings at interval n (no faults applied)."""
        sc = self.sc
        t = self.time(n)

        def g(i):
            return sc.gauss(K_CHIP + 40 + i, n)

        volts, amps = sc.lamp_supply(t)
        volts += 0.005 * g(0)
        amps += 0.0005 * g(1)
        laeq = sc.laeq(t) + 0.4 * g(2)
        pm = sc.pm2_5(t) * (1 + 0.03 * g(3)) + 0.3 * g(4)
        raw = {
            "temperature": sc.temperature(t) + 0.02 * g(5),
            "humidity": sc.humidity(t) + 0.1 * g(6),
            "pressure": sc.pressure(t) + 1.5 * g(7),
            "co2": sc.co2(t) + 6 * g(8),
            "pm2_5": max(0.0, pm),
            "pm10": max(0.0, pm * 1.3 + 0.5 * g(9)),
            "illuminance": sc.daylight(t) * (1 + 0.01 * g(10)),
            "LAeq": laeq,
            "LAmax": laeq + sc.lmax_excess(n),
            "lamp_voltage": volts,
            "lamp_current": amps,
            "lamp_power": volts * amps,
            "battery": sc.battery(t) + 0.003 * g(11),
        }
        out = {}
        for chip in CHIPS:
            for name, places in CHIPS[chip]:
                out[name] = _round(raw[name], places)
        return out

    def pack(self, n):
        """(t, readings) of interval n as the gateway stores them, or None: the node is off."""
        sc = self.sc
        t = self.time(n)
        if not sc.node_up(t):
            return None
        out = self.values(n)
        hrs = sc.hours_since_start(t)
        for chip, kind, lo, hi, _ in sc.faults:
            if chip not in CHIPS or not lo <= hrs < hi:
                continue
            names = CHIPS[chip]
            first = self._first(lo)
            if kind == "stuck":
                frozen = self.values(first)
                for name, _ in names:
                    out[name] = frozen[name]
                if chip in NODE_STUCK and n - first >= STUCK_AFTER - 1:
                    for name, _ in names:
                        out[name + ".q"] = FLAG_STUCK
            elif kind in ("nack", "unplug", "slow"):
                flags = FLAG_FAILED | (FLAG_TIMEOUT if kind == "slow" else FLAG_NACK)
                if n - first >= ABSENT_AFTER - 1:
                    flags |= FLAG_ABSENT
                for name, _ in names:
                    del out[name]
                    out[name + ".q"] = flags
        return t, out
