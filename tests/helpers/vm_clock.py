"""A virtual clock with MicroPython's time API that runs on the MicroPython VM itself.

tests/helpers/clock.py is the CPython fixture; this one is for scripts that run the same way
on the unix port and on CPython (put tests/helpers on MICROPYPATH / PYTHONPATH): no
annotations, no typing, nothing CPython-only.
"""

PERIOD = 1 << 30

# every firmware/sim module that imports `time` and a scripted street run touches
TIMED = ("node.sampler", "node.drivers.scd4x", "node.drivers.sps30", "node.drivers.bh1750",
         "node.drivers.pms5003", "sim.scenario", "sim.bus")


class Clock:
    def __init__(self, ms=1764288000000):  # a midnight, UTC
        self.ms = ms

    def ticks_ms(self):
        return self.ms % PERIOD

    def ticks_add(self, t, d):
        return (t + d) % PERIOD

    def ticks_diff(self, a, b):
        return ((a - b + PERIOD // 2) % PERIOD) - PERIOD // 2

    def sleep_ms(self, ms):
        self.ms += ms

    def time_ns(self):
        return self.ms * 1000000


def install(clock):
    """Make every timed module read `clock` instead of the VM's time."""
    for name in TIMED:
        mod = __import__(name, None, None, ["time"])
        mod.time = clock
    return clock
