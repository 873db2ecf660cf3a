"""The node's clock: the board's own (RTC) until the gateway's time sets it (docs/time.md).

Until then `synced` is False and the node seals no absolute time (node/untimed.py): an ESP32
after a power cut counts from the port's epoch, and its readings would say 1970/2000.
"""

import time

# A set that moves a synced clock back further than this is counted (`back_steps`): a fresh ACK's
# time is at most node/window.py TIME_FRESH_MS old, so a step back beyond it is the board's
# clock running fast (an ESP32's RTC oscillator drifts) or the gateway's clock stepping back.
STEP_BACK_MS = 15000
# Ports whose epoch is 2000-01-01 (esp32, qemu) are shifted to the Unix epoch.
_EPOCH_MS = 946684800000 if time.gmtime(0)[0] == 2000 else 0


class Clock:
    """`hal` may keep the time in a clock that outlives this boot (ESP32: the RTC runs on
    through deep sleep): its set_clock(ms) and clock_synced() then hold it, not an offset.
    A HAL with rtc_ms() gives the board's clock in Unix ms (the unix board's clock-at-epoch
    option); else it is the port's time."""

    def __init__(self, hal=None):
        self._offset_ms = 0
        self._set = getattr(hal, "set_clock", None)
        self._rtc = getattr(hal, "rtc_ms", None)
        synced = getattr(hal, "clock_synced", None)
        self.synced = bool(synced and synced())  # set from a gateway (or a tool)
        self._known = getattr(hal, "clock_known", None)
        # how far setting the clock moved it since this boot (ms): a time read before the
        # first set plus this is the gateway's time of that instant (node/untimed.py)
        self.shift_ms = 0
        self.on_set = None  # called with shift_ms after the first set of this boot
        self.first_shift_ms = None  # shift_ms then (for a hold loaded after it: node/hold.py)
        self.back_steps = 0  # sets that moved the synced clock back more than STEP_BACK_MS

    @property
    def known(self):
        """The time is right: set from a gateway, or a board clock that holds the true time
        without one (the unix board's is the host's)."""
        return self.synced or bool(self._known is not None and self._known())

    def _local_ms(self):
        if self._rtc is not None:
            return self._rtc()
        return time.time_ns() // 1000000 + _EPOCH_MS

    def set_ms(self, epoch_ms):
        """Adopt the gateway's clock (Unix epoch, milliseconds)."""
        first = not self.synced
        step = epoch_ms - self.now_ms()
        if not first and step < -STEP_BACK_MS:
            self.back_steps += 1
            if self.back_steps == 1:  # (later ones only counted)
                print("clock: set back %d ms (the board's clock ran fast, or the gateway's "
                      "stepped back)" % -step)
        self.shift_ms += step
        if self._set is not None:
            try:
                self._set(epoch_ms)
                self._offset_ms = 0
                self._adopted(first)
                return
            except (OSError, ValueError) as e:  # the RTC refused: keep an offset instead
                print("clock: RTC not set: %r" % (e,))
        self._offset_ms = epoch_ms - self._local_ms()
        self._adopted(first)

    def _adopted(self, first):
        self.synced = True
        if first:
            self.first_shift_ms = self.shift_ms
            if self.on_set is not None:
                self.on_set(self.shift_ms)

    def now_ms(self):
        return self._local_ms() + self._offset_ms

    def now(self):
        """Unix epoch seconds as an int: exact on single-precision float ports (ESP32)."""
        return self.now_ms() // 1000
