"""A simulated climate sensor for the unix board: a deterministic diurnal scenario.

Stands in until the register-level sensor simulators land; values depend only on the
node id and the time, so a test can recompute them.
"""

import math


class SimClimate:
    def __init__(self, seed=0):
        self._phase = (seed % 97) / 97.0

    def read(self, now_s):
        """Canonical measurement names to values, rounded as a real sensor reports them."""
        day = (now_s % 86400) / 86400.0
        wave = math.sin(2 * math.pi * (day - 0.375 + self._phase * 0.1))
        jitter = math.sin(now_s * 0.7 + self._phase * 10.0)
        temperature = round(12.0 + 6.0 * wave + 0.3 * jitter, 2)
        humidity = round(65.0 - 15.0 * wave + 2.0 * jitter, 1)
        return {"temperature": temperature, "humidity": humidity}
