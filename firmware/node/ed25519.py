"""Ed25519 signature verification (RFC 8032 §5.1.7), small enough for MicroPython.

Verification only: the node never signs. Everything here is public (the key, the message,
the signature), so plain big-int arithmetic is fine: no secret flows through a branch.
"""

import hashlib

from . import sha512 as _sha512

# CPython's hashlib (OpenSSL) when it has it; MicroPython's has sha256 only
sha512 = getattr(hashlib, "sha512", _sha512.sha512)

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
_D2 = 0x2406D9DC56DFFCE7198E80F2EEF3D13000E0149A8283B156EBD69B9426B2F159  # 2*d mod p
_D = 0x52036CEE2B6FFE738CC740797779E89800700A4D4141D8AB75EB4DCA135978A3  # -121665/121666
_SQRT_M1 = 0x2B8324804FC1DF0B2B4D00993DFBD7A72F431806AD2FE478C4EE1B274A0EA0B0  # 2^((p-1)/4)
# The base point B in extended coordinates (X, Y, Z, T), T = XY/Z.
_B = (0x216936D3CD6E53FEC0A4E231FDD6DC5C692CC7609525A7B2C9562D608F25D51A,
      0x6666666666666666666666666666666666666666666666666666666666666658, 1,
      0x67875F0FD78B766566EA4E8E64ABE37D20F09F80775152F56DDE8AB3A5B7DDA3)


def _add(p, q):
    """p + q in extended coordinates (RFC 8032 §5.1.4; complete: also doubles)."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = t1 * _D2 * t2 % _P
    d = 2 * z1 * z2 % _P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _double(p):
    """2p in extended coordinates (RFC 8032 §5.1.4's dedicated doubling: 4 squares, 4 mults)."""
    x1, y1, z1, _ = p
    a = x1 * x1 % _P
    b = y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = a + b
    s = x1 + y1
    e = h - s * s % _P
    g = a - b
    f = c + g
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def decode_point(s):
    """The point whose 32-byte encoding is s (RFC 8032 §5.1.3), or None if there is none."""
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:  # a second spelling of the same point
        return None
    yy = y * y % _P
    u = yy - 1
    v = _D * yy + 1
    v3 = v * v * v % _P
    x = u * v3 * pow(u * v3 * v3 * v % _P, (_P - 5) // 8, _P) % _P
    vxx = v * x * x % _P
    if vxx == u % _P:
        pass
    elif vxx == -u % _P:
        x = x * _SQRT_M1 % _P
    else:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def check_public(public):
    """Raise ValueError unless public is a usable Ed25519 public key.

    A key whose point has small order ([8]A is the neutral element: 32 zero bytes, the
    neutral element's own encoding 01 00..00, and six more) makes [k]A take at most 8 values
    whatever the message: anyone can then forge a signature in a few tries, and RFC 8032's
    verification (and OpenSSL's) accepts it. No key made by a real key generation is one.
    """
    if len(public) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes, not %d" % len(public))
    a = decode_point(public)
    if a is None:
        raise ValueError("not an Ed25519 public key: the bytes encode no curve point")
    x, y, z, _ = _double(_double(_double(a)))
    if x == 0 and y == z:
        raise ValueError("an Ed25519 public key of small order: anyone can sign for it")


def encode_point(p):
    """The 32-byte encoding of p (RFC 8032 §5.1.2)."""
    x, y, z, _ = p
    zi = pow(z, _P - 2, _P)
    x = x * zi % _P
    y = y * zi % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _combo(s, k, a):
    """[s]B + [k]a by one shared double-and-add pass over the bits (Straus-Shamir)."""
    ba = _add(_B, a)
    table = (None, _B, a, ba)
    r = (0, 1, 1, 0)  # the neutral element
    i = 253  # s and k are below L < 2^253 (MicroPython ints have no bit_length())
    while i:
        i -= 1
        r = _double(r)
        j = (s >> i & 1) | (k >> i & 1) << 1
        if j:
            r = _add(r, table[j])
    return r


def verify(public, msg, sig):
    """True if sig is public's Ed25519 signature of msg (RFC 8032 §5.1.7), else False.

    msg may be a list of bytes-like parts, signed as their concatenation: a large message
    (a release manifest in its Sig_structure) need not be copied into one buffer.

    The check is the cofactorless [S]B = R + [k]A, by comparing the encoding of
    [S]B - [k]A with R's bytes; S >= L and non-canonical encodings of A are refused.
    """
    if len(public) != 32 or len(sig) != 64:
        return False
    a = decode_point(public)
    if a is None:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:  # the malleable second spelling of S
        return False
    h = sha512(bytes(sig[:32]))
    h.update(public)
    for part in msg if isinstance(msg, list) else (msg,):
        h.update(part)
    k = int.from_bytes(h.digest(), "little") % _L
    neg_a = (_P - a[0], a[1], 1, _P - a[3])
    return encode_point(_combo(s, k, neg_a)) == bytes(sig[:32])
