"""Wire formats shared with the firmware: UART framing, COSE_Mac0, SenML packs, ACKs.

docs/protocol.md is the normative description; tests/vectors holds captured frames.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import struct
from dataclasses import dataclass
from typing import Any

import cbor2
from cobs import cobs

from .errors import AuthError, FrameError
from .units import UNITS

DATA, ACK, STATUS, COMMAND, REPLY = 0x01, 0x02, 0x03, 0x04, 0x05
FRAME_TYPES = frozenset((DATA, ACK, STATUS, COMMAND, REPLY))
MAX_FRAME = 1024
MAX_WIRE = MAX_FRAME + MAX_FRAME // 254 + 2

COSE_MAC0_TAG = 17
H_ALG, H_KID, H_PIV = 1, 4, 6
TAG_LENGTHS = {4: 8, 5: 32}  # HMAC 256/64, HMAC 256/256
ACK_SEQS, ACK_TIME = 1, 2

# SenML CBOR labels (RFC 8428 §6) → SenML-JSON names
SENML_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs",
                0: "n", 1: "u", 2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE, as the firmware computes it (binascii's crc_hqx seeded 0xFFFF)."""
    return binascii.crc_hqx(data, 0xFFFF)


def encode_frame(ftype: int, body: bytes) -> bytes:
    raw = bytes((ftype,)) + body
    raw += crc16(raw).to_bytes(2, "big")
    return b"\x00" + bytes(cobs.encode(raw)) + b"\x00"


def decode_frame(chunk: bytes) -> tuple[int, bytes]:
    """(type, body) of one COBS chunk without delimiters; FrameError with a kind otherwise."""
    if len(chunk) > MAX_WIRE:
        raise FrameError("oversize", f"{len(chunk)} bytes")
    try:
        raw = cobs.decode(chunk)
    except cobs.DecodeError as e:
        raise FrameError("cobs", str(e)) from None
    if len(raw) > MAX_FRAME:
        raise FrameError("oversize", f"{len(raw)} bytes decoded")
    if len(raw) < 3:
        raise FrameError("short", f"{len(raw)} bytes")
    if crc16(raw[:-2]) != int.from_bytes(raw[-2:], "big"):
        raise FrameError("crc")
    if raw[0] not in FRAME_TYPES:
        raise FrameError("type", f"0x{raw[0]:02x}")
    return raw[0], raw[1:-2]


class Deframer:
    """Splits a byte stream at 0x00; an over-long run without a delimiter is reported once."""

    def __init__(self, limit: int = MAX_WIRE) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._overflow = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """Complete chunks found after adding data; None marks a discarded over-long run."""
        out: list[bytes | None] = []
        parts = data.split(b"\x00")
        for part in parts[:-1]:
            if self._overflow:
                self._overflow = False
                self._buf.clear()
                out.append(None)
                continue
            self._buf += part
            if self._buf:
                out.append(bytes(self._buf))
                self._buf.clear()
        tail = parts[-1]
        if not self._overflow:
            if len(self._buf) + len(tail) > self._limit:
                self._overflow = True
                self._buf.clear()
            else:
                self._buf += tail
        return out


def piv(seq: int) -> bytes:
    return seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")


def piv_int(b: bytes) -> int:
    """A frame sequence number: shortest big-endian form, below 2**63 (SQLite's integer)."""
    if not b or (len(b) > 1 and b[0] == 0) or len(b) > 8 or (b[0] & 0x80 and len(b) == 8):
        raise FrameError("cose", "bad partial IV")
    return int.from_bytes(b, "big")


@dataclass(frozen=True)
class Mac0:
    protected: dict[int, Any]
    protected_bytes: bytes
    unprotected: dict[Any, Any]
    payload: bytes
    tag: bytes

    @property
    def kid(self) -> bytes:
        return bytes(self.protected[H_KID])

    @property
    def seq(self) -> int:
        return piv_int(bytes(self.protected[H_PIV]))


# What a peer's CBOR may hold (docs/protocol.md, "What the gateway decodes"): cbor2 decodes
# every tag it knows (bigfloats, decimal fractions, dates, regular expressions, shared
# references...), and some of those raise while decoding or build what no handler expects.
# The protocol uses one tag, COSE_Mac0's 17, on the outermost item of a message; nothing else.
_ARRAY, _MAP, _STR, _INDEF = -2, -3, -4, -5


def _head_table() -> list[int]:
    """Per initial byte: the whole item's length in bytes (a number, a short string, false,
    true, null, a float), or how to read it; 0: refused (a tag, another simple value, a
    break out of place, a reserved head)."""
    table = [0] * 256
    for ib in range(256):
        mt, ai = ib >> 5, ib & 0x1F
        if mt <= 1:
            table[ib] = 1 if ai < 24 else 1 + (1 << (ai - 24)) if ai < 28 else 0
        elif mt <= 3:
            table[ib] = 1 + ai if ai < 24 else _STR if ai < 28 else _INDEF if ai == 31 else 0
        elif mt <= 5:
            table[ib] = (_ARRAY if mt == 4 else _MAP) if ai < 28 else _INDEF if ai == 31 else 0
    table[0xF4] = table[0xF5] = table[0xF6] = 1  # false, true, null
    table[0xF9], table[0xFA], table[0xFB] = 3, 5, 9  # half, single, double
    return table


_HEADS = _head_table()


def _refused(data: bytes, i: int) -> str:
    """Why the head at data[i] is refused."""
    ib = data[i]
    mt, ai = ib >> 5, ib & 0x1F
    if ai > 27 and not (ai == 31 and mt == 7):
        return f"malformed head 0x{ib:02x} at byte {i}"
    if mt == 6:
        arg = ai if ai < 24 else int.from_bytes(data[i + 1:i + 1 + (1 << (ai - 24))], "big")
        return f"tag {arg} at byte {i}: the protocol uses no CBOR tag there"
    if ib == 0xFF:
        return f"a break out of place at byte {i}"
    return f"simple value 0x{ib:02x} at byte {i}: not used by the protocol"


def check_cbor(data: bytes, top_tag: int | None = None) -> None:
    """FrameError("cbor") unless `data` is exactly one well-formed CBOR item (RFC 8949 §3,
    appendix F) made of what the protocol sends: integers, byte and text strings, arrays,
    maps, false, true, null and floats — no tag (but `top_tag` on the outermost item), no
    other simple value — with no count larger than the bytes left.

    Only heads are read and nothing is built, so any decoder sees only bytes checked here.
    One counter of the items still owed does the nesting; a stack only for indefinite ones.
    """
    n = len(data)
    i = 0
    heads = _HEADS
    if top_tag is not None and n and data[0] >> 5 == 6:
        ai = data[0] & 0x1F
        i = 1 + ((1 << (ai - 24)) if 24 <= ai < 28 else 0)
        tag = ai if ai < 24 else int.from_bytes(data[1:i], "big")
        if ai > 27 or tag != top_tag or i > n:
            raise FrameError("cbor", _refused(data, 0))
    need = 1  # items still owed: 1 for the whole, plus every count read since
    stack: list[list[int]] = []  # indefinite items: [need outside it, items in it, major]
    while True:
        if not need:
            if not stack:
                break
            if i >= n:
                raise FrameError("cbor", "truncated")
            entry = stack[-1]
            ib = data[i]
            if ib == 0xFF:  # the break that ends it
                if entry[2] == 5 and entry[1] & 1:
                    raise FrameError("cbor", "an indefinite map ends after a key")
                i += 1
                need = entry[0]
                stack.pop()
                continue
            if entry[2] < 4 and (ib >> 5 != entry[2] or ib & 0x1F == 31):
                raise FrameError("cbor", "an indefinite string holds a chunk of another kind")
            entry[1] += 1
            need = 1
        if i >= n:
            raise FrameError("cbor", "truncated")
        ib = data[i]
        step = heads[ib]
        need -= 1
        if step > 0:
            i += step
            continue
        if step in (_ARRAY, _MAP, _STR):
            ai = ib & 0x1F
            if ai < 24:
                arg = ai
                i += 1
            else:
                end = i + 1 + (1 << (ai - 24))
                arg = int.from_bytes(data[i + 1:end], "big")
                i = end
            if step == _STR:
                i += arg
                continue
            need += arg * 2 if step == _MAP else arg
            if need > n - i:  # every item owed takes a byte at least
                raise FrameError("cbor", f"{need} items owed in {max(n - i, 0)} bytes")
            continue
        if step == _INDEF:
            i += 1
            stack.append([need, 0, ib >> 5])
            need = 0
            continue
        raise FrameError("cbor", _refused(data, i))
    if i != n:
        raise FrameError("cbor", "truncated" if i > n else f"{n - i} trailing bytes")


def _loads(data: bytes, top_tag: int | None = None) -> Any:
    """Exactly one CBOR item from a peer, checked first (check_cbor), then decoded.

    The one place peer bytes are decoded: whatever the decoder raises becomes a FrameError.
    """
    check_cbor(data, top_tag)
    try:
        return cbor2.loads(data)
    except Exception as e:  # (a decoder's surprise is still the peer's bad bytes)
        raise FrameError("cbor", f"{type(e).__name__}: {e}") from None


def _bstr_at(data: bytes, i: int) -> tuple[int, int] | None:
    """(start, end) of the byte string whose head is at i, if it has a definite length."""
    if i >= len(data):
        return None
    b = data[i]
    if 0x40 <= b <= 0x57:
        start, n = i + 1, b - 0x40
    elif 0x58 <= b <= 0x5A:
        size = 1 << (b - 0x58)
        start = i + 1 + size
        n = int.from_bytes(data[i + 1:start], "big")
    else:
        return None
    return (start, start + n) if start + n <= len(data) else None


def _parse_mac0_usual(data: bytes) -> Mac0 | None:
    """parse_mac0 for the layout the firmware sends (empty unprotected header, protected
    {1: alg, 4: kid, 6: piv} in that order), by hand; None for anything else."""
    data = bytes(data)  # (a bytearray from a link: kid and payload must be bytes, as cbor2's)
    if data[:2] != b"\xd1\x84":
        return None
    prot = _bstr_at(data, 2)
    if prot is None or prot[1] >= len(data) or data[prot[1]] != 0xA0:
        return None
    pay = _bstr_at(data, prot[1] + 1)
    if pay is None:
        return None
    tag = _bstr_at(data, pay[1])
    if tag is None or tag[1] != len(data):
        return None
    p = data[prot[0]:prot[1]]
    if p[:2] != b"\xa3\x01" or len(p) < 4 or p[2] not in TAG_LENGTHS or p[3] != H_KID:
        return None
    alg = p[2]
    kid = _bstr_at(p, 4)
    if kid is None or kid[1] >= len(p) or p[kid[1]] != H_PIV:
        return None
    iv = _bstr_at(p, kid[1] + 1)
    if iv is None or iv[1] != len(p) or tag[1] - tag[0] != TAG_LENGTHS[alg]:
        return None
    return Mac0({H_ALG: alg, H_KID: p[kid[0]:kid[1]], H_PIV: p[iv[0]:iv[1]]}, p, {},
                data[pay[0]:pay[1]], data[tag[0]:tag[1]])


def parse_mac0(data: bytes) -> Mac0:
    """Structure of a tagged COSE_Mac0 with alg, kid and Partial IV; no MAC check yet."""
    usual = _parse_mac0_usual(data)
    return usual if usual is not None else _parse_mac0_any(data)


def _parse_mac0_any(data: bytes) -> Mac0:
    if data and data[0] >> 5 == 6 and data[0] != 0xD1:  # another tag: a COSE mistake
        raise FrameError("cose", "not a tagged COSE_Mac0")
    msg = _loads(data, COSE_MAC0_TAG)
    if not isinstance(msg, cbor2.CBORTag) or msg.tag != COSE_MAC0_TAG:
        raise FrameError("cose", "not a tagged COSE_Mac0")
    v = msg.value
    if (not isinstance(v, list) or len(v) != 4 or not isinstance(v[0], bytes)
            or not isinstance(v[1], dict) or not isinstance(v[2], bytes)
            or not isinstance(v[3], bytes)):
        raise FrameError("cose", "COSE_Mac0 must be [bstr, map, bstr, bstr]")
    protected = _loads(v[0]) if v[0] else {}
    if not isinstance(protected, dict):
        raise FrameError("cose", "protected header is not a map")
    alg = protected.get(H_ALG)
    if type(alg) is not int or alg not in TAG_LENGTHS or len(v[3]) != TAG_LENGTHS[alg]:
        raise FrameError("cose", f"unsupported alg {alg!r} or tag length {len(v[3])}")
    if not isinstance(protected.get(H_KID), bytes) or not isinstance(protected.get(H_PIV), bytes):
        raise FrameError("cose", "protected header needs kid and Partial IV")
    return Mac0(protected, v[0], v[1], v[2], v[3])


def _mac(key: bytes, protected_bytes: bytes, payload: bytes, alg: int) -> bytes:
    structure = cbor2.dumps(["MAC0", protected_bytes, b"", payload])
    return hmac.new(key, structure, hashlib.sha256).digest()[: TAG_LENGTHS[alg]]


def verify_mac0(key: bytes, m: Mac0) -> None:
    if not hmac.compare_digest(_mac(key, m.protected_bytes, m.payload, m.protected[H_ALG]), m.tag):
        raise AuthError("mac", f"bad tag from {m.kid!r}")


def create_mac0(key: bytes, kid: bytes, seq: int, payload: bytes, alg: int = 4) -> bytes:
    protected_bytes = cbor2.dumps({H_ALG: alg, H_KID: kid, H_PIV: piv(seq)}, canonical=True)
    tag = _mac(key, protected_bytes, payload, alg)
    return bytes(cbor2.dumps(cbor2.CBORTag(COSE_MAC0_TAG, [protected_bytes, {}, payload, tag])))


def encode_ack(key: bytes, kid: bytes, seqs: list[int], now_ms: int) -> bytes:
    """An ACK frame: authenticated with the node key so only the gateway can make it forget."""
    payload = cbor2.dumps({ACK_SEQS: seqs, ACK_TIME: now_ms}, canonical=True)
    return encode_frame(ACK, create_mac0(key, kid, max(seqs), payload))


# ---- the gateway's hot path: the same bytes as above, built by hand
# (tests/gateway/test_protocol_lean.py proves them equal to cbor2's and pycose's for many inputs)


def cbor_head(major: int, n: int) -> bytes:
    """A CBOR head in its shortest form (RFC 8949 §3, §4.2.1): major type and argument."""
    mt = major << 5
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return bytes((mt | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((mt | 26,)) + n.to_bytes(4, "big")
    return bytes((mt | 27,)) + n.to_bytes(8, "big")


def mac_structure_head(protected: bytes, payload_len: int) -> bytes:
    """MAC_structure (RFC 9052 §6.3) up to the payload: ["MAC0", protected, h'', payload]."""
    return (b"\x84\x64MAC0" + cbor_head(2, len(protected)) + protected + b"\x40"
            + cbor_head(2, payload_len))


def key_id(key: bytes) -> bytes:
    """A node key's fingerprint (8 bytes), kept with the node's replay window: never the key,
    and not a hash that anything else computes from it (a label comes first)."""
    return hashlib.sha256(b"lantern replay window key\x00" + key).digest()[:8]


class NodeKey:
    """One node's key, keyed into HMAC-SHA-256 once; every message MACs on a copy of it.

    Keying costs two SHA-256 blocks and a Python object; a copy of the keyed state is cheaper.
    """

    __slots__ = ("_ack_head", "_h", "key_id", "kid", "node")

    def __init__(self, key: bytes, kid: bytes) -> None:
        self._h = hmac.new(key, digestmod=hashlib.sha256)
        self.key_id = key_id(key)
        self.kid = kid
        self.node = kid.decode("utf-8", "replace")
        # an ACK's protected header up to its Partial IV: {1: 4, 4: kid, 6: ...} (1 < 4 < 6)
        self._ack_head = b"\xa3\x01\x04\x04" + cbor_head(2, len(kid)) + kid + b"\x06"

    def tag(self, protected: bytes, payload: bytes, alg: int = 4) -> bytes:
        h = self._h.copy()
        h.update(mac_structure_head(protected, len(payload)))
        h.update(payload)
        return h.digest()[: TAG_LENGTHS[alg]]

    def verify(self, m: Mac0) -> None:
        if not hmac.compare_digest(self.tag(m.protected_bytes, m.payload, m.protected[H_ALG]),
                                   m.tag):
            raise AuthError("mac", f"bad tag from {m.kid!r}")

    def ack(self, seqs: list[int], now_ms: int) -> bytes:
        """encode_ack(key, kid, seqs, now_ms), byte for byte."""
        p = piv(max(seqs))
        protected = self._ack_head + cbor_head(2, len(p)) + p
        payload = b"".join((b"\xa2\x01", cbor_head(4, len(seqs)),
                            *(cbor_head(0, s) for s in seqs), b"\x02", cbor_head(0, now_ms)))
        body = b"".join((b"\xd1\x84", cbor_head(2, len(protected)), protected, b"\xa0",
                         cbor_head(2, len(payload)), payload, b"\x48",
                         self.tag(protected, payload)))
        return encode_frame(ACK, body)


def pack_size(payload: bytes) -> int:
    """Records in a SenML pack, read from its array head, once its CBOR is checked.

    The ACK path's look at a pack: CBOR that is not well-formed or holds what the protocol
    never sends (a tag: check_cbor) is refused here (FrameError "cbor"), and so is a pack
    that is not an array whose first item is a map ("senml"); SenML itself is checked when
    the pack is resolved on its way upstream (resolve_pack: ~8 times the cost).
    """
    check_cbor(payload)
    if len(payload) < 2 or payload[0] >> 5 != 4:
        raise FrameError("senml", "pack is not an array")
    info = payload[0] & 0x1F
    if info < 24:
        n, i = info, 1
    elif info < 28:
        i = 1 + (1 << (info - 24))
        n = int.from_bytes(payload[1:i], "big")
    elif info == 31:  # indefinite length: valid CBOR, never sent by the firmware; count it
        pack = _loads(payload)
        if not isinstance(pack, list) or not pack or not isinstance(pack[0], dict):
            raise FrameError("senml", "pack is not a non-empty array of maps")
        return len(pack)
    else:
        raise FrameError("senml", "pack is not an array")
    if n == 0 or i >= len(payload) or payload[i] >> 5 != 5:
        raise FrameError("senml", "pack is not a non-empty array of maps")
    if n > len(payload) - i:  # every record takes a byte at least
        raise FrameError("senml", f"pack announces {n} records in {len(payload)} bytes")
    return n


def _number(v: Any) -> bool:
    # CBOR's own integer range; bignums (tags 2/3) beyond it are not SenML numbers
    if isinstance(v, int) and not isinstance(v, bool):
        return -(1 << 64) <= v < 1 << 64
    return isinstance(v, float) and math.isfinite(v)


# value label → the Python type its value must have
_VALUE_TYPES: dict[int, type] = {3: str, 4: bool, 8: bytes}
_LABELS = frozenset(SENML_LABELS)
_F32 = struct.Struct(">f")


_F32_CACHE_MAX = 8192
_f32_shown: dict[float, float] = {}  # wire value → f32_decimal of it (resolve_pack's cache)


def f32_decimal(v: float) -> float:
    """A single-precision value as the shortest decimal that reads back to the same float32.

    Nodes send readings as float32 (docs/protocol.md §4: an ESP32's floats are single), so
    21.37 °C arrives as 21.3700008392334; a city platform should see the 21.37 the sensor
    measured. Nothing is lost: float32(result) is the wire value, bit for bit. A value that
    needs double precision was sent as one and is returned unchanged.
    """
    try:
        wire = _F32.pack(v)
    except OverflowError:
        return v
    if _F32.unpack(wire)[0] != v:
        return v
    # A normal float32 holds 7+ digits, so a decimal of 6 or fewer that reads back to it is what
    # rounding it to 6 gives; subnormals (below 2**-126) hold fewer: try every length.
    for digits in (6, 7, 8) if abs(v) >= 1.1754943508222875e-38 else range(1, 9):
        d = float(f"{v:.{digits}g}")
        try:
            if _F32.pack(d) == wire:
                return d
        except OverflowError:  # rounded past float32's largest value
            continue
    return float(f"{v:.9g}")


LANTERN_URN = "urn:dev:lantern:"
# what a date can say (Python's datetime, NGSI-LD's DateTime): years 1 to 9999, in Unix seconds
TIME_MIN, TIME_MAX = -62135596800, 253402300799


def base_name(node: str) -> str:
    """The base name of a node's readings, urn:dev:lantern:<node id>: (RFC 9039 style)."""
    return f"{LANTERN_URN}{node}:"


def _canonical_unit(name: str, prefix: str | None) -> str | None:
    """The unit agent/units.py gives the measurement a resolved Lantern name ends in."""
    if prefix is not None:
        return UNITS.get(name[len(prefix):])
    if name.startswith(LANTERN_URN):
        return UNITS.get(name[len(LANTERN_URN):].partition(":")[2])
    return None


def resolve_pack(payload: bytes, *, node: str | None = None) -> list[dict[str, Any]]:
    """A SenML CBOR pack → resolved SenML-JSON records (absolute n and t, RFC 8428 §4.6).

    node is the sender's id from the verified COSE kid (docs/protocol.md §1): a pack without
    bn gets base_name(node), every resolved name must lie under it (one node cannot speak for
    another), and a canonical name without u gets its unit from agent/units.py. Without node
    the pack must carry its bn. Every field is type-checked here, so whatever passes can be
    stored as JSON.
    """
    pack = _loads(payload)
    if type(pack) is not list or not pack:
        raise FrameError("senml", "pack is not a non-empty array")
    # One pass, plain type checks: this runs for every frame on its way out (docs/performance.md)
    labels, units, isfinite, f32, f32_cache = _LABELS, UNITS, math.isfinite, f32_decimal, _f32_shown
    out: list[dict[str, Any]] = []
    prefix = None if node is None else base_name(node)
    plen = 0 if prefix is None else len(prefix)
    bn: Any = prefix
    bt: Any = 0
    bu: Any = None
    for rec in pack:
        if type(rec) is not dict or not labels.issuperset(rec):
            raise FrameError("senml", "record is not a map of known labels")
        if -2 in rec:
            bn = rec[-2]
        if -3 in rec:
            bt = rec[-3]
        if -4 in rec:
            bu = rec[-4]
        n = rec.get(0, "")
        if bn is None:
            raise FrameError("senml", "no base name, and no node id (COSE kid) to imply one")
        if type(bn) is not str or type(n) is not str or not bn + n:
            raise FrameError("senml", "name and base name must be text, and not both empty")
        name = bn + n
        if prefix is not None and (len(name) <= plen or not name.startswith(prefix)):
            raise FrameError("senml", f"{name!r} is not a reading of node {node!r} (the COSE "
                             f"kid): names must start with {prefix!r}")
        t = rec.get(6, 0)
        if not (_number(bt) and _number(t)):
            raise FrameError("senml", f"{name!r}: time is not a number")
        r: dict[str, Any] = {"n": name, "t": bt + t}
        if not TIME_MIN <= r["t"] <= TIME_MAX:  # (two finite times can even sum to inf)
            raise FrameError("senml", f"{name!r}: time {r['t']!r} is outside years 1 to 9999")
        unit = rec.get(1, bu)
        if unit is None:
            unit = units.get(name[plen:]) if prefix is not None else _canonical_unit(name, None)
        if unit is not None:
            if type(unit) is not str:
                raise FrameError("senml", f"{name!r}: unit is not text")
            r["u"] = unit
        val: Any
        if 2 in rec and not (3 in rec or 4 in rec or 8 in rec):  # the common case: a number
            val = rec[2]
            tv = type(val)
            if tv is float and isfinite(val):
                # readings repeat (a sensor's resolution is coarse): shown from a small cache;
                # zero never is, since -0.0 == 0.0 would share an entry and lose its sign
                shown = f32_cache.get(val) if val else None
                if shown is None:
                    shown = f32(val)
                    if val:
                        if len(f32_cache) >= _F32_CACHE_MAX:
                            f32_cache.clear()
                        f32_cache[val] = shown
                r["v"] = shown
            elif tv is int and -(1 << 64) <= val < 1 << 64:
                r["v"] = val
            else:
                raise FrameError("senml", f"{name!r}: v has the wrong type or is not finite")
            out.append(r)
            continue
        values = [lbl for lbl in (2, 3, 4, 8) if lbl in rec]
        if len(values) != 1:
            raise FrameError("senml", f"{name!r}: a record needs exactly one value")
        lbl = values[0]
        val = rec[lbl]
        if not isinstance(val, _VALUE_TYPES[lbl]):
            raise FrameError("senml", f"{name!r}: {SENML_LABELS[lbl]} has the wrong type or is "
                             "not finite")
        if lbl == 8:
            val = base64.urlsafe_b64encode(rec[8]).rstrip(b"=").decode()
        r[SENML_LABELS[lbl]] = val
        out.append(r)
    return out
