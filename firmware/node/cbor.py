"""Small CBOR (RFC 8949) codec with deterministic encoding, for MicroPython and CPython."""

import struct

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


# Limits on what one loads() may build, whatever the input declares. A decoded item costs the
# heap up to ~50 bytes on an ESP32 (~100 on the 64-bit unix port: a one-character string is a
# slice, a str and a list slot). By default an input may build 64 items (~3 KB): an ACK or a
# command needs fewer than 40. The node's own packs, the largest thing it decodes (a
# 25-reading pack is ~130 items, a frame holds ~50 readings), ask for up to 256 (~13 KB).
_MAX_DEPTH = const(16)  # nesting limit; also bounds Python recursion (small C stack on ESP32)
_ITEMS = const(64)  # data items by default (keys, values, elements, tagged items)
_MAX_ITEMS = const(256)  # data items whatever the caller asks for
_MAX_CONTAINERS = const(64)  # arrays, maps and tags in all: the objects that cost most
_UINT64_MAX = const(0xFFFFFFFFFFFFFFFF)
_ARG_FMT = (">B", ">H", ">I", ">Q")  # additional info 24..27


class CBORDecodeError(ValueError):
    """Malformed, truncated or unsupported CBOR input."""


class CBOREncodeError(ValueError):
    """Value that cannot be represented in CBOR by this codec."""


class Tag:
    """A tagged data item; no tag number is interpreted."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __hash__(self):
        # Explicit: CPython drops __hash__ when __eq__ is defined; tags may be map keys.
        return hash((self.tag, self.value))

    def __repr__(self):
        return "Tag(%r, %r)" % (self.tag, self.value)


def _half(h):
    """Decode an IEEE 754 binary16 bit pattern by hand (struct 'e' is not on every port)."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = m * 2.0**-24
    elif e == 31:
        v = float("nan") if m else float("inf")
    else:
        v = (m + 1024) * 2.0 ** (e - 25)
    return -v if h & 0x8000 else v


# MicroPython's str() only checks sequence shape (accepts surrogates, overlongs): detect that.
try:
    str(b"\xed\xa0\x80", "utf-8")
    _LAX_UTF8 = True
except UnicodeError:
    _LAX_UTF8 = False


def _utf8_ok(b):
    """Strict RFC 3629 well-formedness check of a bytes-like object."""
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        lo, hi = 0x80, 0xBF
        if 0xC2 <= c <= 0xDF:
            k = 1
        elif 0xE0 <= c <= 0xEF:
            k = 2
            if c == 0xE0:
                lo = 0xA0  # overlong
            elif c == 0xED:
                hi = 0x9F  # UTF-16 surrogates
        elif 0xF0 <= c <= 0xF4:
            k = 3
            if c == 0xF0:
                lo = 0x90  # overlong
            elif c == 0xF4:
                hi = 0x8F  # above U+10FFFF
        else:
            return False
        if i + k >= n or not lo <= b[i + 1] <= hi:
            return False
        for j in range(i + 2, i + k + 1):
            if not 0x80 <= b[j] <= 0xBF:
                return False
        i += k + 1
    return True


def _head(buf, major, n):
    """Append a head with the shortest argument encoding (RFC 8949 §4.2.1)."""
    mt = major << 5
    if n < 24:
        buf.append(mt | n)
        return
    ai = 24
    while n >> (8 << (ai - 24)):  # widths 1, 2, 4, 8 bytes
        ai += 1
    buf.append(mt | ai)
    buf.extend(struct.pack(_ARG_FMT[ai - 24], n))


def _float(buf, x):
    """Append x in preferred serialization: shortest width that round-trips exactly."""
    if x != x:
        buf.extend(b"\xf9\x7e\x00")  # one canonical NaN, payload and sign dropped
        return
    for fmt, ib in ((">e", 0xF9), (">f", 0xFA)):
        try:
            b = struct.pack(fmt, x)
        except (OverflowError, ValueError):  # CPython refuses out-of-range; 'e' may be missing
            continue
        # Halves checked with our own decoder: MicroPython packs some out-of-range ones as NaN.
        y = _half(b[0] << 8 | b[1]) if ib == 0xF9 else struct.unpack(fmt, b)[0]
        if y == x:
            buf.append(ib)
            buf.extend(b)
            return
    buf.append(0xFB)
    buf.extend(struct.pack(">d", x))


def _enc(buf, obj, depth):
    """Append the deterministic encoding of obj to buf."""
    if obj is None:
        buf.append(0xF6)
    elif obj is True or obj is False:  # before int: bool subclasses int
        buf.append(0xF5 if obj else 0xF4)
    elif isinstance(obj, int):
        if obj > _UINT64_MAX or obj < -_UINT64_MAX - 1:
            raise CBOREncodeError("int out of 64-bit range")
        if obj >= 0:
            _head(buf, 0, obj)
        else:
            _head(buf, 1, -1 - obj)
    elif isinstance(obj, float):
        _float(buf, obj)
    elif isinstance(obj, str):
        try:
            b = obj.encode("utf-8")
        except UnicodeError:  # lone surrogates on CPython
            raise CBOREncodeError("str is not valid Unicode") from None
        _head(buf, 3, len(b))
        buf.extend(b)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        if getattr(obj, "itemsize", 1) != 1 or getattr(obj, "ndim", 1) != 1:
            obj = bytes(obj)  # CPython views of non-byte items: len() would count items
        _head(buf, 2, len(obj))
        buf.extend(obj)
    else:
        if depth >= _MAX_DEPTH:
            raise CBOREncodeError("nesting too deep")  # also stops reference cycles
        depth += 1
        if isinstance(obj, (list, tuple)):
            _head(buf, 4, len(obj))
            for v in obj:
                _enc(buf, v, depth)
        elif isinstance(obj, dict):
            # Only keys get temporary buffers (sorting needs their bytes); values go straight in.
            items = []
            for k in obj:
                kb = bytearray()
                _enc(kb, k, depth)
                items.append((bytes(kb), k))
            items.sort(key=lambda it: it[0])
            _head(buf, 5, len(items))
            prev = None
            for kb, k in items:
                if kb == prev:  # e.g. two distinct NaN objects as keys
                    raise CBOREncodeError("map keys with equal encodings")
                prev = kb
                buf.extend(kb)
                _enc(buf, obj[k], depth)
        elif isinstance(obj, Tag):
            t = obj.tag
            if not isinstance(t, int) or t is True or t is False or not 0 <= t <= _UINT64_MAX:
                raise CBOREncodeError("bad tag number")
            _head(buf, 6, t)
            _enc(buf, obj.value, depth)
        else:
            raise CBOREncodeError("unsupported type: %s" % type(obj).__name__)


def dumps(obj):
    """Encode obj as deterministic CBOR (RFC 8949 §4.2.1) and return bytes."""
    buf = bytearray()
    _enc(buf, obj, 0)
    return bytes(buf)


class _Decoder:
    """Cursor over the input (as bytes: a slice is then the decoded byte string itself).

    Deterministic encoding (RFC 8949 §4.2.1) is all the node ever reads: its own packs, and
    ACKs and commands its gateway and tools encode canonically. So indefinite lengths are
    refused outright, map keys are never floats (a NaN key is not even equal to itself), and
    every count is checked against the bytes left and the limits above before anything is
    built: hostile input costs at most the limits, and ends in CBORDecodeError.
    """

    def __init__(self, data, max_items):
        self.d = data if isinstance(data, bytes) else bytes(data)
        self.n = len(self.d)
        self.p = 0
        self.items = 0
        self.max_items = max_items
        self.containers = 0
        self.max_containers = min(max_items, _MAX_CONTAINERS)

    def take(self, k):
        """Reserve k bytes and return their offset."""
        p = self.p
        if k > self.n - p:
            raise CBORDecodeError("truncated input")
        self.p = p + k
        return p

    def arg(self, ai):
        """Read the argument for additional info ai (big-endian, no temporary objects)."""
        if ai < 24:
            return ai
        if ai > 27:
            raise CBORDecodeError("reserved additional information")
        p = self.take(1 << (ai - 24))
        d = self.d
        v = d[p]
        for i in range(p + 1, self.p):
            v = v << 8 | d[i]
        return v

    def chunk(self, major, k):
        """Read one definite-length byte or text string."""
        if k == 0:
            return b"" if major == 2 else ""
        p = self.take(k)
        raw = self.d[p : p + k]
        if major == 2:
            return raw
        try:
            s = str(raw, "utf-8")
        except UnicodeError:
            raise CBORDecodeError("invalid UTF-8") from None
        if _LAX_UTF8 and len(s) != k and not _utf8_ok(raw):  # len differs only if non-ASCII
            raise CBORDecodeError("invalid UTF-8")
        return s

    def simple(self, ai):
        """Major type 7: simple values and floats."""
        if 20 <= ai <= 23:
            return (False, True, None, None)[ai - 20]  # undefined has no Python counterpart
        if ai == 25:
            return _half(self.arg(25))
        if ai == 26:
            return struct.unpack_from(">f", self.d, self.take(4))[0]
        if ai == 27:
            return struct.unpack_from(">d", self.d, self.take(8))[0]
        if ai == 31:
            raise CBORDecodeError("unexpected break")
        raise CBORDecodeError("unsupported simple value")

    def count(self, k):
        """Account for k more data items; refuse before building them if over the limit."""
        self.items += k
        if self.items > self.max_items:
            raise CBORDecodeError("more than %d data items" % self.max_items)

    def item(self, depth):
        """Decode one data item."""
        ib = self.d[self.take(1)]
        major = ib >> 5
        ai = ib & 0x1F
        if major == 7:
            return self.simple(ai)
        if ai == 31:
            raise CBORDecodeError("indefinite length (not deterministic encoding)")
        k = self.arg(ai)
        if major == 0:
            return k
        if major == 1:
            return -1 - k
        if major < 4:
            return self.chunk(major, k)
        if depth >= _MAX_DEPTH:
            raise CBORDecodeError("nesting too deep")
        depth += 1
        self.containers += 1
        if self.containers > self.max_containers:
            raise CBORDecodeError("more than %d arrays, maps and tags" % self.max_containers)
        if major == 6:
            self.count(1)
            return Tag(k, self.item(depth))
        # Each item takes >= 1 byte: reject absurd counts before looping or allocating.
        if k > (self.n - self.p) // (major - 3):
            raise CBORDecodeError("truncated input")
        self.count(k * (major - 3))
        if major == 4:
            if not k:
                return []
            out = [None] * k  # one allocation of the declared (now bounded) size
            for i in range(k):
                out[i] = self.item(depth)
            return out
        out = {}
        for _ in range(k):
            key = self.item(depth)
            if isinstance(key, float):
                # never in deterministic data from a node, gateway or tool; NaN != NaN would
                # also let one map hold many "different" NaN keys
                raise CBORDecodeError("float map key")
            try:
                hash(key)  # MicroPython skips hashing when probing an empty dict
            except TypeError:
                raise CBORDecodeError("unhashable map key") from None
            if key in out:
                raise CBORDecodeError("duplicate map key")
            out[key] = self.item(depth)
        return out


def loads(data, max_items=_ITEMS):
    """Decode exactly one CBOR data item from a bytes-like object; CBORDecodeError if not.

    max_items bounds the data items this input may build (64 by default, 256 at most): only
    a caller decoding something large it trusts (the node's own pack) asks for more.
    """
    dec = _Decoder(data, min(max_items, _MAX_ITEMS))
    dec.count(1)
    obj = dec.item(0)
    if dec.p != dec.n:
        raise CBORDecodeError("trailing bytes")
    return obj
