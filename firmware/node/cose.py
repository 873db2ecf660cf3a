"""COSE_Mac0 (RFC 9052 §6.2) with HMAC-SHA256 (RFC 9053 §3.1), small enough for MicroPython."""

import hashlib

from . import cbor

ALG_HMAC_256_64 = 4
ALG_HMAC_256_256 = 5
H_ALG = 1
H_KID = 4
H_PIV = 6
TAG_MAC0 = 17

# Tag length in bytes per algorithm; HMAC 256/64 is the full HMAC truncated to its first 8 bytes.
_TAG_LEN = {ALG_HMAC_256_64: 8, ALG_HMAC_256_256: 32}
_BLOCK = 64  # SHA-256 block size, fixed by RFC 2104 for this hash


class CoseError(ValueError):
    """A message that is malformed, unsupported or fails verification."""


class BadTag(CoseError):
    """The MAC tag does not match the message under the given key."""


def hmac_sha256(key, msg):
    """HMAC-SHA256 (RFC 2104); MicroPython has hashlib but no hmac module."""
    key = bytes(key)
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key + bytes(_BLOCK - len(key))
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    inner.update(msg)
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    outer.update(inner.digest())
    return outer.digest()


def piv(seq):
    """Partial IV bytes of a sequence number: big-endian, shortest form, 0 -> b'\\x00'."""
    if not isinstance(seq, int) or seq < 0:
        raise CoseError("piv needs a non-negative int")
    out = b""
    while seq:
        out = bytes((seq & 0xFF,)) + out
        seq >>= 8
    return out or b"\x00"


def piv_int(b):
    """Sequence number of a Partial IV; only the shortest encoding is accepted."""
    if not isinstance(b, (bytes, bytearray)) or not b:
        raise CoseError("empty partial IV")
    # A second spelling of the same number would let a replayed message look new.
    if len(b) > 1 and b[0] == 0:
        raise CoseError("partial IV has a leading zero")
    return int.from_bytes(b, "big")


def _tag_len(hdr):
    # A float 4.0 equals 4 and would be found in _TAG_LEN: only a real int names an alg.
    alg = hdr.get(H_ALG)
    n = _TAG_LEN.get(alg) if type(alg) is int else None
    if n is None:
        raise CoseError("unsupported alg %r" % (alg,))
    return n


def _bucket(protected):
    # RFC 9052 §3: an empty protected map is sent as a zero-length bstr, not as h'a0'.
    return cbor.dumps(protected) if protected else b""


def _labels(prot, unprot):
    # RFC 9052 §3: labels are int or tstr, so 1.0 or True (equal to 1 in a dict) cannot pose as
    # alg; a label in both buckets is an error, else an on-path party could add a second kid.
    for k in prot:
        if type(k) is not int and type(k) is not str:
            raise CoseError("bad label %r" % (k,))
    for k in unprot:
        if (type(k) is not int and type(k) is not str) or k in prot:
            raise CoseError("bad or repeated label %r" % (k,))


def _to_mac(pbstr, payload):
    # MAC_structure with empty external_aad; the protected bytes are MACed exactly as sent.
    return cbor.dumps(["MAC0", pbstr, b"", payload])


def _mac(key, pbstr, payload, n):
    return hmac_sha256(key, _to_mac(pbstr, payload))[:n]


def mac0_create(key, payload, protected, unprotected=None):
    """Tagged COSE_Mac0 bytes; the alg comes from protected[1]."""
    unprotected = {} if unprotected is None else unprotected
    if not isinstance(protected, dict) or not isinstance(unprotected, dict):
        raise CoseError("header buckets must be dicts")
    if not isinstance(payload, (bytes, bytearray)):
        raise CoseError("payload must be bytes")
    n = _tag_len(protected)
    _labels(protected, unprotected)
    pbstr = _bucket(protected)
    tag = _mac(key, pbstr, payload, n)
    return cbor.dumps(cbor.Tag(TAG_MAC0, [pbstr, unprotected, payload, tag]))


def _loads(data):
    try:
        return cbor.loads(data)
    except cbor.CBORDecodeError as e:
        raise CoseError("bad CBOR: %s" % e) from None


def _parse(data):
    obj = _loads(data)
    if not isinstance(obj, cbor.Tag) or obj.tag != TAG_MAC0:
        raise CoseError("not a tagged COSE_Mac0")
    v = obj.value
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise CoseError("COSE_Mac0 must be a 4-element array")
    pbstr, unprot, payload, tag = v
    if not isinstance(pbstr, bytes) or not isinstance(unprot, dict):
        raise CoseError("bad header buckets")
    # A nil (detached) payload is valid COSE but never used here, so it is refused.
    if not isinstance(payload, bytes) or not isinstance(tag, bytes):
        raise CoseError("payload and tag must be bstr")
    prot = _loads(pbstr) if pbstr else {}
    if not isinstance(prot, dict):
        raise CoseError("protected header is not a map")
    _labels(prot, unprot)
    # Only a protected alg counts: an unprotected one can be rewritten by anyone on the path.
    if len(tag) != _tag_len(prot):
        raise CoseError("tag length does not match alg")
    return pbstr, prot, unprot, payload, tag


def mac0_parse(data):
    """(protected, unprotected, payload, tag) after structural checks only; nothing is verified."""
    return _parse(data)[1:]


def mac0_verify(key, data):
    """(protected, unprotected, payload) of a COSE_Mac0 whose tag matches under key."""
    pbstr, prot, unprot, payload, tag = _parse(data)
    want = _mac(key, pbstr, payload, len(tag))
    # Accumulate over every byte so the time taken does not reveal where a forgery diverges.
    diff = 0
    for a, b in zip(want, tag):
        diff |= a ^ b
    if diff:
        raise BadTag("MAC mismatch")
    return prot, unprot, payload
