"""SenML packs (RFC 8428) with the CBOR integer labels of RFC 8428 §6."""

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


def base_name(node_id):
    """Base name of every record a node sends: its device URN (RFC 8428 §5.1 and RFC 9039)."""
    return "urn:dev:lantern:" + node_id + ":"


def record(name, value, unit=None, t=None):
    """One SenML record with integer labels; a bool becomes vb, a str vs, a bytes vd."""
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
    """A pack: base name and base time go on the first record (RFC 8428 §4.1)."""
    out = []
    for i, r in enumerate(records):
        if i == 0:
            r = dict(r)
            r[BN] = bn
            r[BT] = bt
        out.append(r)
    return out
