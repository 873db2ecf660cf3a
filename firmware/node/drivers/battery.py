"""Battery voltage through a resistor divider on an ADC pin (machine.ADC.read_uv)."""

from . import SensorError


class Battery:
    WARMUP_MS = 0
    PERIOD_MS = 0
    OVERSAMPLE = 5  # single ADC conversions are noisy: the median of five
    RANGES = {"battery": (2.5, 4.35)}  # a 1S lithium cell
    PLACES = {"battery": 3}  # mV
    STUCK = ()  # a resting cell holds its voltage to the millivolt

    def __init__(self, adc, address=None, divider=2.0):
        self.adc = adc
        self.divider = divider
        self.read()  # probe

    def read(self):
        """Battery voltage (V): the pin voltage times the divider ratio."""
        try:
            uv = self.adc.read_uv()
        except OSError as e:
            raise SensorError("battery adc: %r" % (e,))
        return {"battery": round(uv * self.divider / 1e6, 3)}
