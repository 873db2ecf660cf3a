"""SenML packs (RFC 8428) with the CBOR integer labels of RFC 8428 §6; values as sent.

docs/protocol.md §1: the base name is implied by the COSE kid and canonical names carry no
unit (the gateway restores both); every number is an int or a single-precision float that
is the same on every VM (quantize).
"""

import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


BVER = const(-1)
BN = const(-2)
BT = const(-3)
BU = const(-4)
BV = const(-5)
BS = const(-6)
N = const(0)
U = const(1)
V = const(2)
VS = const(3)
VB = const(4)
S = const(5)
T = const(6)
UT = const(7)
VD = const(8)

MAX_PLACES = const(8)  # 10**8 < 2**29: the double rounding in _ratio cannot go wrong
_Q_MAX = const(0x400000)  # 2**22: below it, a value rounded to its places gives the same q on
# single- and double-precision VMs (its float32 error times 10**places stays far below 0.5)
_INT_MAX = const(0x1000000)  # 2**24: integral values below it travel as CBOR ints


def base_name(node_id):
    """A node's base name: its device URN (RFC 8428 §5.1 and RFC 9039); implied, not sent."""
    return "urn:dev:lantern:" + node_id + ":"


def f32(x):
    """The float32 nearest to x (ties to even); x itself on a single-precision VM."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # CPython beyond float32's range (MicroPython gives inf)
        return x


def _ratio(q, scale):
    # q / scale correctly rounded to float32. A double VM rounds twice (to double, then to
    # float32): harmless here, since with |q| < 2**24 and scale <= 10**8 the quotient is never
    # within half a double ulp of a float32 midpoint. A single VM divides two exact float32s,
    # which IEEE 754 rounds correctly (libgcc's soft float on Cortex-M, the ESP32's FPU).
    return f32(q / scale)


def quantize(x, places=None):
    """x as it goes on the wire: the same number on every VM (docs/protocol.md §1 "Values").

    A float is rounded to `places` decimals (its sensor's resolution; fewer if it has more
    than 6 significant digits) or, without places, to float32; an integral result below 2**24
    becomes an int. Ints, bools, text and bytes are returned unchanged, as are NaN and ±Inf.
    """
    if not isinstance(x, float) or x - x != 0:  # NaN - NaN and Inf - Inf are NaN
        return x
    if places is None:
        y = f32(x)
        if -_INT_MAX < y < _INT_MAX and y == int(y):
            return int(y)
        return y
    scale = 10**places
    q = round(x * scale)  # half to even, as CPython and MicroPython both round
    while scale > 1 and not -_Q_MAX < q < _Q_MAX:
        scale //= 10  # more digits than a float32 holds: one decimal less, rounded from x
        q = round(x * scale)
    if q % scale == 0:
        q //= scale
        return q if -_INT_MAX < q < _INT_MAX else f32(x)
    return _ratio(q, scale)


def record(name, value, unit=None, t=None):
    """One SenML record with integer labels; a bool becomes vb, a str vs, a bytes vd.

    Leave unit out for a canonical measurement name (agent/units.py restores it); give it
    for any other name that has one.
    """
    r = {N: name}
    if unit:
        r[U] = unit
    if value is True or value is False:
        r[VB] = value
    elif isinstance(value, str):
        r[VS] = value
    elif isinstance(value, (bytes, bytearray)):
        r[VD] = bytes(value)
    else:
        r[V] = value
    if t:
        r[T] = t
    return r


def pack(bn, bt, records):
    """A pack: base time (and a base name, if given) on the first record (RFC 8428 §4.1).

    Lantern nodes pass bn=None: the gateway takes the base name from the COSE kid.
    """
    out = []
    for i, r in enumerate(records):
        if i == 0:
            r = dict(r)
            if bn:
                r[BN] = bn
            r[BT] = bt
        out.append(r)
    return out
