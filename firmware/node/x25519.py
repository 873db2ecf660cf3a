"""X25519 (RFC 7748 §5) and HKDF-SHA256 (RFC 5869), small enough for MicroPython.

Used by node/rekey.py only, loaded with a REKEY command and given back after it.

X25519 is the Montgomery ladder on Python ints. It is *constant-structure*: every scalar bit
runs the same operations in the same order (the conditional swap is arithmetic, not a branch),
and the scalar's bits are read from its bytes, never by a branch on the secret. It is not
constant-time: a big-int product, sum or remainder takes time and allocates memory according
to the size of its operands (a value that happens to have leading zero bits, the swap's
product by 0 or 1), so timing leaks a little about the secret to someone who can measure one
ladder's operations closely. The node runs a ladder once per rekey, on an ephemeral scalar
used once: such a leak cannot be averaged over many runs of the same key.
"""

from .cose import hmac_sha256

_P = 2**255 - 19
_A24 = 121665  # (486662 - 2) / 4, RFC 7748 §5
_BASE = b"\x09" + bytes(31)  # u = 9


def _clamp(k):
    """The scalar of a 32-byte private key, clamped as RFC 7748 §5 decodeScalar25519 says."""
    if len(k) != 32:
        raise ValueError("X25519 scalar must be 32 bytes")
    b = bytearray(k)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return b


def x25519(k, u):
    """X25519(k, u): the 32-byte u-coordinate of k times the point with u-coordinate u."""
    if len(u) != 32:
        raise ValueError("X25519 u-coordinate must be 32 bytes")
    kb = _clamp(k)
    # decodeUCoordinate: the top bit masked; values >= p taken mod p (RFC 7748 §5)
    x1 = (int.from_bytes(u, "little") & ((1 << 255) - 1)) % _P
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    p = _P
    for i in range(254, -1, -1):
        bit = (kb[i >> 3] >> (i & 7)) & 1
        swap ^= bit
        # cswap by arithmetic: d is 0 or the difference, the same operations either way
        d = swap * (x2 - x3)
        x2 -= d
        x3 += d
        d = swap * (z2 - z3)
        z2 -= d
        z3 += d
        swap = bit
        a = x2 + z2
        b = x2 - z2
        aa = a * a % p
        bb = b * b % p
        e = aa - bb
        da = (x3 - z3) * a % p
        cb = (x3 + z3) * b % p
        x3 = (da + cb) ** 2 % p
        z3 = x1 * ((da - cb) ** 2 % p) % p
        x2 = aa * bb % p
        z2 = e * (aa + _A24 * e) % p
    d = swap * (x2 - x3)
    x2 -= d
    d = swap * (z2 - z3)
    z2 -= d
    # z2 ** (p - 2): the inverse (0 for the point at infinity, which gives the all-zero output)
    return (x2 * pow(z2, p - 2, p) % p).to_bytes(32, "little")


def public(k):
    """The X25519 public key of a 32-byte private key."""
    return x25519(k, _BASE)


def hkdf(ikm, salt, info, length):
    """HKDF-SHA256 (RFC 5869): extract with salt, expand to `length` bytes (at most 8160)."""
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 gives at most 8160 bytes")
    prk = hmac_sha256(salt if salt else bytes(32), ikm)
    out = b""
    t = b""
    n = 0
    while len(out) < length:
        n += 1
        t = hmac_sha256(prk, t + info + bytes((n,)))
        out += t
    return out[:length]
