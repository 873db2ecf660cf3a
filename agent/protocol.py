"""Wire formats shared with the firmware: UART framing, COSE_Mac0, SenML packs, ACKs.

docs/protocol.md is the normative description; tests/vectors holds captured frames.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import math
from dataclasses import dataclass
from typing import Any

import cbor2
from cobs import cobs

from .errors import AuthError, FrameError

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


def _loads(data: bytes) -> Any:
    """Exactly one CBOR item: cbor2.loads alone would ignore trailing bytes."""
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise FrameError("cbor", str(e)) from None
    if fp.tell() != len(data):
        raise FrameError("cbor", f"{len(data) - fp.tell()} trailing bytes")
    if obj is cbor2.break_marker or obj is cbor2.undefined:  # type: ignore[attr-defined]
        raise FrameError("cbor", "a lone break or undefined is not a value")
    return obj


def parse_mac0(data: bytes) -> Mac0:
    """Structure of a tagged COSE_Mac0 with alg, kid and Partial IV; no MAC check yet."""
    msg = _loads(data)
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


def _number(v: Any) -> bool:
    # CBOR's own integer range; bignums (tags 2/3) beyond it are not SenML numbers
    if isinstance(v, int) and not isinstance(v, bool):
        return -(1 << 64) <= v < 1 << 64
    return isinstance(v, float) and math.isfinite(v)


# value label → the Python type its value must have
_VALUE_TYPES: dict[int, type] = {3: str, 4: bool, 8: bytes}


def resolve_pack(payload: bytes) -> list[dict[str, Any]]:
    """A SenML CBOR pack → resolved SenML-JSON records (absolute n and t, RFC 8428 §4.6).

    Every field is type-checked here, so whatever passes can be stored as JSON.
    """
    pack = _loads(payload)
    if not isinstance(pack, list) or not pack:
        raise FrameError("senml", "pack is not a non-empty array")
    out: list[dict[str, Any]] = []
    bn: Any = ""
    bt: Any = 0
    bu: Any = None
    for rec in pack:
        if not isinstance(rec, dict) or any(k not in SENML_LABELS for k in rec):
            raise FrameError("senml", "record is not a map of known labels")
        bn = rec.get(-2, bn)
        bt = rec.get(-3, bt)
        bu = rec.get(-4, bu)
        n = rec.get(0, "")
        if not isinstance(bn, str) or not isinstance(n, str) or not bn + n:
            raise FrameError("senml", "name and base name must be text, and not both empty")
        name = bn + n
        t = rec.get(6, 0)
        if not _number(bt) or not _number(t):
            raise FrameError("senml", f"{name}: time is not a number")
        r: dict[str, Any] = {"n": name, "t": bt + t}
        unit = rec.get(1, bu)
        if unit is not None:
            if not isinstance(unit, str):
                raise FrameError("senml", f"{name}: unit is not text")
            r["u"] = unit
        values = [lbl for lbl in (2, 3, 4, 8) if lbl in rec]
        if len(values) != 1:
            raise FrameError("senml", f"{name}: a record needs exactly one value")
        lbl = values[0]
        val = rec[lbl]
        ok = _number(val) if lbl == 2 else isinstance(val, _VALUE_TYPES[lbl])
        if not ok:
            raise FrameError("senml", f"{name}: {SENML_LABELS[lbl]} has the wrong type or is "
                             "not finite")
        r[SENML_LABELS[lbl]] = (base64.urlsafe_b64encode(val).rstrip(b"=").decode()
                                if lbl == 8 else val)
        out.append(r)
    return out
