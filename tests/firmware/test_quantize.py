"""Values on the wire (docs/protocol.md §1 "Values"): node.senml.quantize on every VM.

A reading is rounded to its sensor's decimal places, or to float32, and an integral result
becomes an int, so that the same reading gives the same bytes on the unix port (double
floats), the QEMU Cortex-M3 image and an ESP32 (single floats) and CPython. Checked here
against an exact reference (fractions), against an emulated single-precision VM, and on the
MicroPython unix port; hil_tests/test_qemu.py runs the same cases on the QEMU image.
"""

import math
import os
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from node import cbor, drivers, senml

from tests.helpers.quantize import (
    CASES,
    INT_MAX,
    Q_MAX,
    expected_lines,
    from_bits,
    grid,
    nearest_f32,
    reference,
    script_text,
)

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_EXTMOD = ROOT / ".build/micropython/extmod"










def single_vm(x, places):
    """quantize as a single-precision VM computes it: every float operation rounded to
    float32 (IEEE 754: the exact result, rounded to nearest even)."""
    assert math.isnan(x) or math.isinf(x) or nearest_f32(Fraction(x)) == x
    if math.isnan(x) or math.isinf(x):
        return x
    if places is None:
        return int(x) if x == int(x) and abs(x) < INT_MAX else x
    scale = 10**places
    q = round(nearest_f32(Fraction(x) * scale))
    while scale > 1 and abs(q) >= Q_MAX:
        scale //= 10
        q = round(nearest_f32(Fraction(x) * scale))
    if q % scale == 0:
        q //= scale
        return q if abs(q) < INT_MAX else x
    return nearest_f32(Fraction(q) / scale)


def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)













# ------------------------------------------------------------------------------ CPython


def test_cases_cover_every_form():
    forms = {bytes.fromhex(line.split()[2])[0] >> 5 for line in expected_lines()}
    heads = {bytes.fromhex(line.split()[2])[0] for line in expected_lines()}
    assert {0, 1, 7} <= forms  # ints of both signs and floats
    assert {0xF9, 0xFA} <= heads  # half and single
    assert 0xFB not in heads  # never a double: nothing needs one
    assert any(q is not None and abs(from_bits(b)) * 10**q >= Q_MAX for b, q in CASES)


@pytest.mark.parametrize(("bits", "places"), CASES)
def test_quantize_matches_the_exact_reference(bits, places):
    x = from_bits(bits)
    got = senml.quantize(x, places)
    assert same(got, reference(x, places)), (x, places, got)
    assert same(senml.quantize(got), got)  # seal() quantizes again: a no-op
    if places is not None:
        assert same(senml.quantize(got, places), got)


def test_cpython_prints_the_reference(tmp_path):
    out = run_script(tmp_path, [sys.executable], {"PYTHONPATH": str(FIRMWARE)})
    assert out == expected_lines()


FINITE32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
PLACES = st.integers(0, senml.MAX_PLACES)


@settings(max_examples=2000, deadline=None)
@given(FINITE32, st.one_of(st.none(), PLACES))
def test_quantize_properties(x, places):
    got = senml.quantize(x, places)
    assert same(got, reference(x, places))
    if isinstance(got, float):
        assert nearest_f32(Fraction(got)) == got  # a float32: 5 bytes at most on the wire
        assert got != int(got) or abs(got) >= INT_MAX  # integral ones travel as ints
    else:
        assert abs(got) < INT_MAX
    if places is not None and abs(x) * 10**places < Q_MAX:
        step = Fraction(1, 10**places)
        assert abs(Fraction(got) - Fraction(x)) <= step / 2 + Fraction(abs(got)) / 2**24


@settings(max_examples=2000, deadline=None)
@given(st.integers(-(Q_MAX - 1), Q_MAX - 1), PLACES)
def test_a_reading_at_its_resolution_is_the_same_on_a_single_precision_vm(k, places):
    x = grid(k, places)
    assert same(senml.quantize(x, places), single_vm(x, places))


@settings(max_examples=2000, deadline=None)
@given(FINITE32, st.one_of(st.none(), PLACES))
def test_any_reading_is_the_same_on_a_single_precision_vm_unless_at_a_tie(x, places):
    if places is not None:
        # the single VM rounds x·10**places to float32 first: within that error of a
        # half-way point, the two VMs may round apart (docs/protocol.md §1 "Values")
        for p in range(places, -1, -1):
            y = Fraction(x) * 10**p
            if abs(abs(y - math.floor(y)) - Fraction(1, 2)) <= abs(y) / 2**23 + Fraction(1, 2**40):
                return
    assert same(senml.quantize(x, places), single_vm(x, places))


@pytest.mark.parametrize("value", [0, -7, 2**64 - 1, True, False, "ok", b"\x00", None])
def test_non_floats_pass_unchanged(value):
    assert senml.quantize(value, 2) is value
    assert senml.quantize(value) is value


@pytest.mark.parametrize(("x", "places", "want"), [
    (101662.17, 0, 101662),          # BME280 pressure, whole Pa
    (47.0, 1, 47),                   # LAeq at an integral dB
    (21.37, 2, nearest_f32(Fraction(2137, 100))),
    (48.25, 2, 48.25),               # exact in half precision: 3 bytes
    (0.0, 1, 0),
    (-0.0, None, 0),
    (-5.25, 2, -5.25),
    (1.5107, 4, nearest_f32(Fraction(15107, 10**4))),
    (23.82125, 5, nearest_f32(Fraction(2382125, 10**5))),
    (36.5, 5, nearest_f32(Fraction(73, 2))),  # 3650000 steps, still below 2**22
    (45.12346, 5, nearest_f32(Fraction(451235, 10**4))),  # 2**22 or more: one place less
    (0.1, None, nearest_f32(Fraction(0.1))),
])
def test_examples(x, places, want):
    assert same(senml.quantize(x, places), want)


def test_encodings_of_the_examples():
    assert cbor.dumps(senml.quantize(101662.17, 0)) == bytes.fromhex("1a00018d1e")
    assert cbor.dumps(senml.quantize(21.37, 2)) == bytes.fromhex("fa41aaf5c3")
    assert cbor.dumps(senml.quantize(48.25, 2)) == bytes.fromhex("f95208")
    assert cbor.dumps(senml.quantize(47.0, 1)) == bytes.fromhex("182f")
    assert cbor.dumps(senml.quantize(0.1)) == bytes.fromhex("fa3dcccccd")


# The drivers' resolutions: every float measurement has one, within what quantize handles.
@pytest.mark.parametrize("chip", sorted(drivers.CHIPS))
def test_driver_places(chip):
    cls_name, _, _, names = drivers.CHIPS[chip]
    mod = __import__("node.drivers." + chip, None, None, [cls_name])
    cls = getattr(mod, cls_name)
    places = getattr(cls, "PLACES", None)
    if chip.startswith("ina"):
        places = {"lamp_voltage": 3, "lamp_current": 4, "lamp_power": 4}  # set per instance
    elif chip == "pms5003":
        assert places is None  # integers from the chip
        return
    assert set(places) == set(names), chip
    assert all(0 <= p <= senml.MAX_PLACES for p in places.values())


@pytest.mark.parametrize(("step", "want"), [(1e-4, 4), (2e-4, 4), (5e-5, 5), (20 * 1e-4, 3),
                                            (25 * 1e-4, 4), (25 * 2e-4, 3), (1.0, 0), (0.5, 1),
                                            (1e-9, 8)])
def test_places_of_a_step(step, want):
    assert drivers.places(step) == want


# --------------------------------------------------------------------------- MicroPython


def run_script(tmp_path, argv, env):
    path = tmp_path / "quantize_cases.py"
    path.write_text(script_text(), encoding="utf-8")
    r = subprocess.run([*argv, str(path)], env={"PATH": os.environ.get("PATH", ""), **env},
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout.splitlines()


@pytest.mark.micropython
def test_micropython_unix_prints_the_reference(tmp_path):
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    out = run_script(tmp_path, [str(MICROPYTHON), "-X", "heapsize=110K"],
                     {"MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}"})
    want = expected_lines()
    assert len(out) == len(want)
    assert [a for a, b in zip(out, want, strict=True) if a != b] == []
