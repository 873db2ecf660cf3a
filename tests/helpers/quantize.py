"""The exact reference for values on the wire (docs/protocol.md §1 "Values") and its cases."""

from __future__ import annotations

import math
import random
import struct
from fractions import Fraction

from node import cbor

Q_MAX = 1 << 22


INT_MAX = 1 << 24


def f32_bits(x):
    return struct.pack(">f", x).hex()


def from_bits(h):
    return struct.unpack(">f", bytes.fromhex(h))[0]


def nearest_f32(r):
    """The float32 nearest to the rational r, ties to the even significand, exactly."""
    if r == 0:
        return 0.0
    bits = struct.unpack(">I", struct.pack(">f", float(r)))[0]
    best = None
    for b in (bits - 1, bits, bits + 1):
        if (b >> 23) & 0xFF == 0xFF:  # Inf/NaN patterns are never nearest to a finite r here
            continue
        c = struct.unpack(">f", struct.pack(">I", b & 0xFFFFFFFF))[0]
        key = (abs(Fraction(c) - r), b & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


def reference(x, places):
    """What quantize must return on a double VM, with the float32 step done exactly."""
    if math.isnan(x) or math.isinf(x):
        return x
    if places is None:
        y = nearest_f32(Fraction(x))
        return int(y) if y == int(y) and abs(y) < INT_MAX else y
    p = places
    q = round(x * 10**p)
    while p and abs(q) >= Q_MAX:
        p -= 1
        q = round(x * 10**p)
    if q % 10**p == 0:
        q //= 10**p
        return q if abs(q) < INT_MAX else nearest_f32(Fraction(x))
    return nearest_f32(Fraction(q, 10**p))


def grid(k, places):
    """A sensor's reading of k steps of 10**-places, as a float32 VM holds it."""
    return nearest_f32(Fraction(k, 10**places))


def _cases():
    """(float32 bits, places): what the VMs must agree on byte for byte."""
    rng = random.Random(8428)
    out = []
    ks = [0, 1, -1, 5, -5, 15, 25, 99, 100, 101, 1234, -1234, 65504, 99999, 2135, 4825,
          Q_MAX - 1, -(Q_MAX - 1), Q_MAX + 7, 3 * Q_MAX + 1, INT_MAX + 5]
    ks += [rng.randrange(-Q_MAX + 1, Q_MAX) for _ in range(60)]
    ks += [rng.randrange(-20000, 20000) for _ in range(40)]
    for i, k in enumerate(ks):
        for p in (0, 1, 2, 3, 4, 6, 8) if i < 21 else (rng.choice((0, 1, 2, 3, 5, 6)),):
            out.append((f32_bits(grid(k, p)), p))
    # exact half-way values: rounding half to even on every VM
    for x in (0.5, 1.5, 2.5, -2.5, 0.125, 0.375, 12.25, 1048575.5):
        out.append((f32_bits(x), 0 if x == int(x) + 0.5 else 2))
    # float32 without places: arbitrary bits, integral values, extremes, and specials
    for _ in range(60):
        b = rng.getrandbits(32)
        if (b >> 23) & 0xFF != 0xFF:
            out.append((f"{b:08x}", None))
    for x in (0.0, -0.0, 47.0, -47.0, 1.0 * (INT_MAX - 1), 1.0 * INT_MAX, 1.0 * (INT_MAX + 2),
              1e30, 3.4028234663852886e38, 1.401298464324817e-45, 1.1754943508222875e-38,
              0.1, 21.5, 65504.0, 65520.0):
        out.append((f32_bits(x), None))
    for x in (float("inf"), float("-inf"), float("nan")):
        out += [(f32_bits(x), None), (f32_bits(x), 2)]
    # beyond a sensor's places: large values with places lose decimals, never accuracy
    for x in (1e30, -3e20, 5e7, 16777215.0):
        out.append((f32_bits(x), 3))
    return out


CASES = _cases()


# Runs on MicroPython and on CPython: one line per case, the CBOR of quantize's result and of
# the second pass the node's seal() applies.
SCRIPT = '''\
import binascii
import struct

from node import cbor, senml

for bits, places in CASES:
    x = struct.unpack(">f", binascii.unhexlify(bits))[0]
    y = senml.quantize(x, places)
    z = senml.quantize(y)
    print(bits, places, binascii.hexlify(cbor.dumps(y)).decode(),
          binascii.hexlify(cbor.dumps(z)).decode())
'''


def script_text():
    return f"CASES = {CASES!r}\n\n{SCRIPT}"


def expected_lines():
    """The lines every VM must print, from the exact reference."""
    lines = []
    for bits, places in CASES:
        want = cbor.dumps(reference(from_bits(bits), places)).hex()
        lines.append(f"{bits} {places} {want} {want}")
    return lines
