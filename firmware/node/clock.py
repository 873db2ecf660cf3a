"""Wall clock set from the gateway's ACKs; until then the board's own RTC is used."""

import time

# Ports whose epoch is 2000-01-01 (esp32, qemu) are shifted to the Unix epoch.
_EPOCH_MS = 946684800000 if time.gmtime(0)[0] == 2000 else 0


class Clock:
    """`hal` may keep the time in a clock that outlives this boot (ESP32: the RTC runs on
    through deep sleep): its set_clock(ms) and clock_synced() then hold it, not an offset."""

    def __init__(self, hal=None):
        self._offset_ms = 0
        self._set = getattr(hal, "set_clock", None)
        synced = getattr(hal, "clock_synced", None)
        self.synced = bool(synced and synced())

    def _local_ms(self):
        return time.time_ns() // 1000000 + _EPOCH_MS

    def set_ms(self, epoch_ms):
        """Adopt the gateway's clock (Unix epoch, milliseconds)."""
        if self._set is not None:
            try:
                self._set(epoch_ms)
                self._offset_ms = 0
                self.synced = True
                return
            except (OSError, ValueError) as e:  # the RTC refused: keep an offset instead
                print("clock: RTC not set: %r" % (e,))
        self._offset_ms = epoch_ms - self._local_ms()
        self.synced = True

    def now_ms(self):
        return self._local_ms() + self._offset_ms

    def now(self):
        """Unix epoch seconds as an int: exact on single-precision float ports (ESP32)."""
        return self.now_ms() // 1000
