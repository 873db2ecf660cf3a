"""node/ed25519.py and node/sha512.py against RFC 8032's vectors and against `cryptography`.

The same cases run on CPython and on the MicroPython unix port (an ESP32-sized heap): the
firmware verifies what OpenSSL verifies, and refuses what it refuses.
"""

import hashlib
import random
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from node import ed25519, sha512

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"

pytestmark = pytest.mark.ota

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493

# RFC 8032 §7.1 TEST 1, 2, 3: public key, message, signature
RFC8032 = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e"
     "39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f"
     "3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67"
     "f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


def openssl(pub: bytes, msg: bytes, sig: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
    except (InvalidSignature, ValueError):
        return False
    return True


def cases(seed: int, n: int) -> list[tuple[bytes, bytes, bytes]]:
    """Valid signatures of random messages, each followed by a spoiled variant."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        pub = key.public_key().public_bytes_raw()
        msg = rng.randbytes(rng.choice((0, 1, 31, 64, 111, 112, 127, 128, 129, 300)))
        sig = key.sign(msg)
        out.append((pub, msg, sig))
        kind = i % 6
        if kind == 0:  # one bit of R or S
            j = rng.randrange(512)
            spoiled = (pub, msg, _flip_bit(sig, j))
        elif kind == 1:  # the message
            spoiled = (pub, msg + b"\x00", sig)
        elif kind == 2:  # another key
            spoiled = (Ed25519PrivateKey.generate().public_key().public_bytes_raw(), msg, sig)
        elif kind == 3:  # S + L: the same point, a malleable second spelling
            s = int.from_bytes(sig[32:], "little") + _L
            spoiled = (pub, msg, sig[:32] + s.to_bytes(32, "little"))
        elif kind == 4:  # a bit of A's y (often no point at all)
            spoiled = (_flip_bit(pub, rng.randrange(255)), msg, sig)
        else:  # the sign bit of A
            spoiled = (_flip_bit(pub, 255), msg, sig)
        out.append(spoiled)
    return out


def _flip_bit(b: bytes, bit: int) -> bytes:
    a = bytearray(b)
    a[bit // 8] ^= 1 << (bit % 8)
    return bytes(a)


def test_rfc8032_vectors() -> None:
    for pub, msg, sig in RFC8032:
        p, m, s = bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig)
        assert ed25519.verify(p, m, s)
        assert not ed25519.verify(p, m + b"x", s)
        assert not ed25519.verify(p, m, s[:63] + bytes([s[63] ^ 0x10]))


def test_a_message_in_parts_is_their_concatenation() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    pub, msg = key.public_key().public_bytes_raw(), bytes(range(256)) * 3
    sig = key.sign(msg)
    for cut in (0, 1, 127, 128, 129, 700):
        assert ed25519.verify(pub, [msg[:cut], memoryview(msg)[cut:]], sig)
    assert not ed25519.verify(pub, [msg[:100], msg[101:]], sig)


def test_agrees_with_openssl_on_random_and_spoiled_signatures() -> None:
    got = [(ed25519.verify(p, m, s), openssl(p, m, s)) for p, m, s in cases(1, 150)]
    assert [a for a, _ in got] == [b for _, b in got]
    assert sum(a for a, _ in got) == 150  # the valid half, and only it


def test_refuses_malformed_keys_and_signatures() -> None:
    pub, msg, sig = (bytes.fromhex(x) for x in RFC8032[0])
    assert not ed25519.verify(pub[:31], msg, sig)
    assert not ed25519.verify(pub, msg, sig[:63])
    assert not ed25519.verify(b"\xff" * 32, msg, sig)  # y >= p
    # y = 2: x^2 = 3/(4d+1) has no root, so no point has this encoding
    assert ed25519.decode_point((2).to_bytes(32, "little")) is None
    # y = 1 is the neutral element (x = 0); x = 0 with the sign bit set has no point
    assert ed25519.decode_point((1 | 1 << 255).to_bytes(32, "little")) is None
    assert ed25519.encode_point(ed25519.decode_point(pub)) == pub


def test_sha512_matches_hashlib_across_block_boundaries() -> None:
    rng = random.Random(2)
    for n in [*range(0, 260), 1000, 4096]:
        m = rng.randbytes(n)
        h = sha512.sha512()
        cut = rng.randrange(n + 1)
        h.update(m[:cut])
        h.update(m[cut:])
        assert h.digest() == sha512.sha512(m).digest() == hashlib.sha512(m).digest(), n


def test_sha512_constants_are_the_roots_of_the_primes() -> None:
    primes = [p for p in range(2, 410) if all(p % q for q in range(2, p))][:80]

    def root(x: int, k: int) -> int:  # floor of the k-th root of x
        lo, hi = 0, 1 << (x.bit_length() // k + 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if mid**k <= x else (lo, mid - 1)
        return lo

    assert list(sha512._K) == [root(p << 192, 3) & sha512._M for p in primes]
    assert list(sha512._IV) == [root(p << 128, 2) & sha512._M for p in primes[:8]]


SCRIPT = """
import sys
from node import ed25519, sha512
for line in open(sys.argv[1]):
    f = [bytes.fromhex(x) for x in line.split()[1:]] + [b""]
    if line[0] == "v":
        print(1 if ed25519.verify(f[0], f[2], f[1]) else 0)
    else:
        print(sha512.sha512(f[0]).hexdigest())
"""


@pytest.mark.micropython
def test_same_answers_on_micropython(tmp_path: Path) -> None:
    verify = [tuple(bytes.fromhex(x) for x in v) for v in RFC8032] + cases(3, 30)
    rng = random.Random(4)
    digests = [rng.randbytes(n) for n in (0, 3, 111, 112, 128, 129, 255, 256, 700)]
    # "v public signature [message]", "s [message]"
    lines = [f"v {p.hex()} {s.hex()} {m.hex()}" for p, m, s in verify]
    lines += [f"s {m.hex()}" for m in digests]
    (tmp_path / "cases").write_text("\n".join(lines) + "\n")
    (tmp_path / "run.py").write_text(SCRIPT)
    out = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(tmp_path / "run.py"),
                          str(tmp_path / "cases")], env={"MICROPYPATH": MP_PATH},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    want = [str(int(openssl(p, m, s))) for p, m, s in verify]
    want += [hashlib.sha512(m).hexdigest() for m in digests]
    assert out == want
    assert out[:3] == ["1", "1", "1"] and out.count("1") == 3 + 30

