"""Wall clock set from the gateway's ACKs; until then the board's own RTC is used."""

import time

# Ports whose epoch is 2000-01-01 (older esp32 builds) are shifted to the Unix epoch.
_EPOCH_MS = 946684800000 if time.gmtime(0)[0] == 2000 else 0


class Clock:
    def __init__(self):
        self._offset_ms = 0
        self.synced = False

    def _local_ms(self):
        return time.time_ns() // 1000000 + _EPOCH_MS

    def set_ms(self, epoch_ms):
        """Adopt the gateway's clock (Unix epoch, milliseconds)."""
        self._offset_ms = epoch_ms - self._local_ms()
        self.synced = True

    def now_ms(self):
        return self._local_ms() + self._offset_ms

    def now(self):
        """Unix epoch seconds as an int: exact on single-precision float ports (ESP32)."""
        return self.now_ms() // 1000
