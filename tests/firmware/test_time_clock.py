"""The node's clock (firmware/node/clock.py, on CPython): a step back is counted, not hidden."""

from __future__ import annotations

from node.clock import STEP_BACK_MS, Clock


class Rtc:
    """The board's clock at the hardware boundary: what the HAL's rtc_ms reads."""

    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def rtc_ms(self) -> int:
        return self.ms


def test_a_synced_clock_set_back_beyond_the_bound_is_counted() -> None:
    rtc = Rtc()
    clock = Clock(rtc)
    sets: list[int] = []
    clock.on_set = sets.append
    clock.set_ms(rtc.ms + 60_000)  # the first set: a board clock a minute slow
    assert clock.synced and sets == [60_000] and clock.back_steps == 0
    now = clock.now_ms()
    clock.set_ms(now - STEP_BACK_MS)  # within the bound: a fresh ACK's own age
    assert clock.back_steps == 0
    now = clock.now_ms()
    clock.set_ms(now - STEP_BACK_MS - 1)
    clock.set_ms(clock.now_ms() - 3_600_000)
    assert clock.back_steps == 2
    assert clock.now_ms() == now - STEP_BACK_MS - 1 - 3_600_000  # taken, and counted
    assert sets == [60_000]  # on_set only for the first set of a boot
