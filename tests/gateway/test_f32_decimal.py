"""Readings sent as float32 reach upstream as the shortest decimal with the same float32."""

from __future__ import annotations

import contextlib
import math
import struct

import cbor2
from hypothesis import given
from hypothesis import strategies as st

from lantern.agent import protocol
from lantern.agent.protocol import f32_decimal


def f32(v: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", v))[0])


def sig_digits(v: float) -> int:
    """Significant digits of the shortest repr (Python's repr round-trips doubles)."""
    mantissa = repr(abs(v)).split("e")[0].replace(".", "").strip("0")
    return max(1, len(mantissa))


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_lossless_and_shortest(x: float) -> None:
    d = f32_decimal(x)
    assert struct.pack(">f", d) == struct.pack(">f", x)  # nothing lost, bit for bit
    assert type(d) is float
    n = sig_digits(d)
    assert n <= 9
    for k in range(1, n):  # no shorter decimal reads back to the same float32
        shorter = float(f"{x:.{k}g}")
        with contextlib.suppress(OverflowError):  # past float32's largest: not a candidate
            assert f32(shorter) != x or x == 0


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_doubles_pass_unchanged(x: float) -> None:
    if abs(x) < 3.4e38 and f32(x) == x:
        return
    assert f32_decimal(x) == x


def test_what_a_sensor_measured_is_what_upstream_sees() -> None:
    assert f32_decimal(f32(3.4028234e38)) == 3.4028235e38  # max float32: 8 digits, no overflow
    cases = {21.37: 21.37, 1.5107: 1.5107, 5.45: 5.45, 101726.04: 101726.04, 0.1: 0.1,
             23.832: 23.832, 3.0: 3.0}
    for sent, shown in cases.items():
        assert f32(sent) != shown or sent == 3.0  # the wire value is not the decimal...
        assert f32_decimal(f32(sent)) == shown  # ...the reading upstream is
    assert f32_decimal(16777216.0) == 16777216.0
    assert math.isclose(f32_decimal(f32(3.4e38)), 3.4e38)


def test_resolve_pack_presents_float32_values_as_decimals() -> None:
    pack = cbor2.dumps([{0: "temperature", 6: 1764331200, 2: f32(21.37)},
                        {0: "humidity", 2: 0.1},  # a double: kept as sent
                        {0: "co2", 2: 415}], canonical=True)
    recs = protocol.resolve_pack(pack, node="SL-0042")
    assert [r["v"] for r in recs] == [21.37, 0.1, 415]
    assert type(recs[2]["v"]) is int
