"""Firmware tests: the `clock` fixture (a virtual MicroPython clock, tests/helpers/clock.py)."""

from tests.helpers.clock import clock_fixture

__all__ = ["clock_fixture"]
