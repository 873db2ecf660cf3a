"""A virtual clock with MicroPython's time API, for running drivers, sampler and sim on CPython.

The drivers call time.ticks_ms/ticks_diff/ticks_add/sleep_ms (MicroPython) and the simulated
street reads time.time_ns; here all of them read one virtual clock that only moves when a test
(or a driver's sleep) moves it, so chip timing, warm-ups and conversion periods are exact and
the tests never sleep. The same driver code runs on the real MicroPython VM in
test_drivers_on_micropython.
"""

from __future__ import annotations

from tests.helpers.clock import (
    _PERIOD,
    VirtualClock,
)


def test_ticks_wrap_like_micropython() -> None:
    c = VirtualClock(start_ms=_PERIOD - 5)
    t0 = c.ticks_ms()
    c.advance(10)
    t1 = c.ticks_ms()
    assert t1 < t0  # wrapped
    assert c.ticks_diff(t1, t0) == 10
    assert c.ticks_diff(t0, t1) == -10
    assert c.ticks_add(t0, 10) == t1


def test_sleep_moves_the_clock(clock: VirtualClock) -> None:
    from node.drivers import scd4x

    before = clock.ms
    scd4x.time.sleep_ms(500)
    assert clock.ms == before + 500 and clock.slept == 500
