"""A virtual clock with MicroPython's time API, for drivers, sampler and the street on CPython
(the tests are in tests/firmware/test_drivers_clock.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

_PERIOD = 1 << 30


# every firmware/sim module that imports `time`
TIMED = ("node.drivers.scd4x", "node.drivers.sps30", "node.drivers.bh1750",
         "node.drivers.pms5003", "node.sampler", "sim.scenario", "sim.bus")


class VirtualClock:
    """MicroPython's time functions over a clock in milliseconds that tests advance."""

    def __init__(self, start_ms: int = 1_764_288_000_000) -> None:  # a midnight, UTC
        self.ms = start_ms
        self.slept = 0

    def advance(self, ms: float) -> None:
        self.ms += ms

    # MicroPython's time module
    def ticks_ms(self) -> int:
        return int(self.ms) % _PERIOD

    @staticmethod
    def ticks_add(t: int, delta: int) -> int:
        return (t + delta) % _PERIOD

    @staticmethod
    def ticks_diff(a: int, b: int) -> int:
        return ((a - b + _PERIOD // 2) % _PERIOD) - _PERIOD // 2

    def sleep_ms(self, ms: int) -> None:
        self.slept += ms
        self.ms += ms

    def time_ns(self) -> int:
        return int(self.ms * 1_000_000)


def install(clock: VirtualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    for name in TIMED:
        monkeypatch.setattr(importlib.import_module(name), "time", clock)


@pytest.fixture(name="clock")
def clock_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualClock]:
    c = VirtualClock()
    install(c, monkeypatch)
    yield c


def street(board: dict[str, Any], clock: VirtualClock, node: str = "SL-0001",
           **sim: Any) -> tuple[Any, Any, Any]:
    """(buses, chip time scale, scenario) for a board on the simulated street, on the clock."""
    from sim import street as st

    return st.build(board, sim, node, wall_ms=int(clock.ms))


def one_chip(chip: str, bus: str = "i2c", **spec: Any) -> dict[str, Any]:
    """A board with one sensor on a bus named after its kind."""
    board: dict[str, Any] = {"name": "t", "hal": "unix", bus: {bus: {}},
                             "sensors": [{"chip": chip, "bus": bus, **spec}]}
    return board
