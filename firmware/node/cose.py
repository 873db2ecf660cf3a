"""COSE_Mac0 (RFC 9052 §6.2) with HMAC-SHA256 (RFC 9053 §3.1), small enough for MicroPython."""

import hashlib

from . import cbor

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


ALG_HMAC_256_64 = 4
ALG_HMAC_256_256 = 5
H_ALG = 1
H_KID = 4
H_PIV = 6
TAG_MAC0 = 17

# Tag length in bytes per algorithm; HMAC 256/64 is the full HMAC truncated to its first 8 bytes.
_TAG_LEN = {ALG_HMAC_256_64: 8, ALG_HMAC_256_256: 32}
_BLOCK = 64  # SHA-256 block size, fixed by RFC 2104 for this hash
_KID_MAX = const(64)  # bytes of kid a peer's envelope may hold (node ids are far shorter)
_PIV_MAX = const(8)  # a Partial IV of a 64-bit counter


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
    """(protected, unprotected, payload) of a COSE_Mac0 whose tag matches under key.

    The general path: it decodes the envelope before the MAC is known to match. Bytes from a
    peer go through mac0_open instead, which reads nothing but fixed positions before that.
    """
    pbstr, prot, unprot, payload, tag = _parse(data)
    want = _mac(key, pbstr, payload, len(tag))
    # Accumulate over every byte so the time taken does not reveal where a forgery diverges.
    diff = 0
    for a, b in zip(want, tag):
        diff |= a ^ b
    if diff:
        raise BadTag("MAC mismatch")
    return prot, unprot, payload


# -- the node's receive path: Lantern's fixed layout, read by position ----------------------
#
#   d1 84                      tag 17, array(4)
#   bstr(a3 01 alg 04 bstr(kid) 06 bstr(piv))   protected header, keys in deterministic order
#   a0                         empty unprotected header
#   bstr(payload)
#   bstr(tag)                  8 bytes for alg 4, 32 for alg 5
#
# This is all a gateway or a tool ever sends a node (agent/protocol.py NodeKey.ack,
# tools/field/nodelink.py seal): anything else is refused before a byte of it is decoded, so
# unauthenticated input allocates nothing but the slices it is made of.


def _bstr_at(b, p, limit):
    """(start, end) of the definite, shortest-form byte string whose head is at b[p]."""
    n = len(b)
    if p >= n or b[p] >> 5 != 2:
        raise CoseError("byte string expected at %d" % p)
    ai = b[p] & 0x1F
    if ai < 24:
        k = ai
        p += 1
    elif ai == 24 and p + 1 < n and b[p + 1] >= 24:
        k = b[p + 1]
        p += 2
    elif ai == 25 and p + 2 < n and b[p + 1]:
        k = b[p + 1] << 8 | b[p + 2]
        p += 3
    else:
        raise CoseError("byte string head not in Lantern's form at %d" % p)
    if k > limit or k > n - p:
        raise CoseError("byte string of %d bytes at %d" % (k, p))
    return p, p + k


def mac0_peek(body, algs=(ALG_HMAC_256_64,)):
    """(protected, kid, seq, payload, tag) of a COSE_Mac0 in Lantern's fixed layout.

    Nothing is verified yet: kid and seq only say who it claims to be. CoseError if the bytes
    are not laid out exactly as a gateway or a tool sends them.
    """
    n = len(body)
    if n < 2 or body[0] != 0xD1 or body[1] != 0x84:
        raise CoseError("not a tagged 4-element COSE_Mac0")
    p0, p1 = _bstr_at(body, 2, 4 + _KID_MAX + 2 + _PIV_MAX + 4)
    if p1 - p0 < 7 or body[p0] != 0xA3 or body[p0 + 1] != H_ALG or body[p0 + 3] != H_KID:
        raise CoseError("protected header is not {1: alg, 4: kid, 6: piv}")
    alg = body[p0 + 2]
    if alg not in algs:
        raise CoseError("unsupported alg %d" % alg)
    k0, k1 = _bstr_at(body, p0 + 4, _KID_MAX)
    if k1 >= p1 or body[k1] != H_PIV:
        raise CoseError("protected header is not {1: alg, 4: kid, 6: piv}")
    v0, v1 = _bstr_at(body, k1 + 1, _PIV_MAX)
    if v1 != p1:
        raise CoseError("protected header is not {1: alg, 4: kid, 6: piv}")
    if p1 >= n or body[p1] != 0xA0:
        raise CoseError("unprotected header must be empty")
    q0, q1 = _bstr_at(body, p1 + 1, n)
    t0, t1 = _bstr_at(body, q1, _TAG_LEN[alg])
    if t1 - t0 != _TAG_LEN[alg] or t1 != n:
        raise CoseError("tag length does not match alg, or bytes follow it")
    seq = piv_int(bytes(body[v0:v1]))
    return (bytes(body[p0:p1]), bytes(body[k0:k1]), seq, bytes(body[q0:q1]),
            bytes(body[t0:t1]))


def mac0_check(key, protected, payload, tag, aad=b""):
    """BadTag unless tag is the MAC of ["MAC0", protected, aad, payload] under key."""
    want = hmac_sha256(key, cbor.dumps(["MAC0", protected, aad, payload]))
    # Every byte, so the time taken does not show where a forgery diverges.
    diff = 0
    for i in range(len(tag)):
        diff |= want[i] ^ tag[i]
    if diff:
        raise BadTag("MAC mismatch")


def mac0_open(key, body, aad=b"", algs=(ALG_HMAC_256_64,)):
    """(kid, seq, payload) of a COSE_Mac0 in Lantern's layout whose tag matches under key.

    The payload comes back undecoded: only now that it is authentic may it be decoded.
    """
    protected, kid, seq, payload, tag = mac0_peek(body, algs)
    mac0_check(key, protected, payload, tag, aad)
    return kid, seq, payload
