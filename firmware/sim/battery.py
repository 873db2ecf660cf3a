"""The battery divider on an ADC pin: pin voltage = cell voltage / divider, with ADC noise."""

from .scenario import K_CHIP


class Model:
    CRC = False

    def __init__(self, sc, chip, options=None):
        self.sc = sc
        self.chip = chip
        self.divider = float((options or {}).get("divider", 2.0))
        self.n = 0
        self.frozen = None

    def power_on(self):
        pass

    def read_uv(self):
        sc = self.sc
        for kind, _ in sc.faults_for(self.chip, sc.t()):
            if kind == "stuck" and self.frozen:
                return self.frozen
        self.n += 1
        volts = sc.battery(sc.t()) / self.divider + 0.003 * sc.gauss(K_CHIP, self.n)
        self.frozen = int(volts * 1e6)
        return self.frozen
