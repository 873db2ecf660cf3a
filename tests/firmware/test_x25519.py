"""node/x25519.py: X25519 (RFC 7748) and HKDF-SHA256 (RFC 5869) against the RFCs' vectors and
`cryptography`, on CPython and on the MicroPython unix port (an ESP32-sized heap)."""

import random
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from node import x25519

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"

pytestmark = pytest.mark.fleet

# RFC 7748 §5.2: scalar, u-coordinate, output
RFC7748_52 = [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]
# §5.2's iterated function: k after 1 and after 1,000 iterations
ITERATED = {1: "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079",
            1000: "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"}
# §6.1: Alice's and Bob's private and public keys, their shared secret
ALICE = ("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
         "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB = ("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
       "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"

# RFC 5869 A.1-A.3 (SHA-256): IKM, salt, info, L, OKM
RFC5869 = [
    ("0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x00, 0x50)).hex(), bytes(range(0x60, 0xB0)).hex(),
     bytes(range(0xB0, 0x100)).hex(), 82,
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb"
     "41c65e590e09da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    ("0b" * 22, "", "", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]

H = bytes.fromhex


def test_rfc7748_vectors() -> None:
    for k, u, out in RFC7748_52:
        assert x25519.x25519(H(k), H(u)).hex() == out
    assert x25519.public(H(ALICE[0])).hex() == ALICE[1]
    assert x25519.public(H(BOB[0])).hex() == BOB[1]
    assert x25519.x25519(H(ALICE[0]), H(BOB[1])).hex() == SHARED
    assert x25519.x25519(H(BOB[0]), H(ALICE[1])).hex() == SHARED


def test_rfc7748_iterated() -> None:
    k = u = b"\x09" + bytes(31)
    for i in range(1, 1001):
        k, u = x25519.x25519(k, u), k
        if i in ITERATED:
            assert k.hex() == ITERATED[i], i


def test_agrees_with_cryptography_on_random_keys() -> None:
    rng = random.Random(17)
    for _ in range(40):
        a, b = rng.randbytes(32), rng.randbytes(32)
        pa = X25519PrivateKey.from_private_bytes(a)
        pb = X25519PrivateKey.from_private_bytes(b)
        pub_b = pb.public_key().public_bytes_raw()
        assert x25519.public(a) == pa.public_key().public_bytes_raw()
        assert x25519.x25519(a, pub_b) == pa.exchange(X25519PublicKey.from_public_bytes(pub_b))


def test_u_coordinate_top_bit_and_non_canonical_values() -> None:
    # RFC 7748 §5: the top bit is masked, and u >= p is taken mod p
    k = H(RFC7748_52[0][0])
    u = H(RFC7748_52[0][1])
    assert x25519.x25519(k, u[:31] + bytes((u[31] | 0x80,))) == x25519.x25519(k, u)
    p = 2**255 - 19
    assert x25519.x25519(k, (p + 9).to_bytes(32, "little")) == x25519.public(k)
    # a low-order point gives the all-zero secret that node/rekey.py refuses
    assert x25519.x25519(k, bytes(32)) == bytes(32)
    assert x25519.x25519(k, (1).to_bytes(32, "little")) == bytes(32)


def test_bad_lengths_are_refused() -> None:
    with pytest.raises(ValueError):
        x25519.x25519(bytes(31), bytes(32))
    with pytest.raises(ValueError):
        x25519.x25519(bytes(32), bytes(33))


def test_hkdf_rfc5869_vectors_and_cryptography() -> None:
    for ikm, salt, info, n, okm in RFC5869:
        assert x25519.hkdf(H(ikm), H(salt), H(info), n).hex() == okm
    rng = random.Random(5)
    for n in (1, 31, 32, 33, 64, 100):
        ikm, salt, info = rng.randbytes(32), rng.randbytes(32), rng.randbytes(rng.randrange(40))
        want = HKDF(hashes.SHA256(), n, salt, info).derive(ikm)
        assert x25519.hkdf(ikm, salt, info, n) == want


SCRIPT = """
import sys
from node import x25519
for line in open(sys.argv[1]):
    f = line.split()
    a = [bytes.fromhex(x) for x in f[1:]]
    if f[0] == "x":
        print(x25519.x25519(a[0], a[1]).hex())
    elif f[0] == "h":
        print(x25519.hkdf(a[0], a[1], a[2] if len(a) > 2 else b"", int(f[-1])).hex())
    else:
        k = u = b"\\x09" + bytes(31)
        for i in range(int(f[1])):
            k, u = x25519.x25519(k, u), k
        print(k.hex())
"""


@pytest.mark.micropython
def test_same_answers_on_micropython(tmp_path: Path) -> None:
    rng = random.Random(23)
    pairs = [(H(k), H(u)) for k, u, _ in RFC7748_52]
    pairs += [(H(ALICE[0]), H(BOB[1])), (H(BOB[0]), b"\x09" + bytes(31))]
    pairs += [(rng.randbytes(32), rng.randbytes(32)) for _ in range(12)]
    lines = [f"x {k.hex()} {u.hex()}" for k, u in pairs]
    # "h ikm salt info L" (hex fields may be empty: written as "-" never needed here)
    hk = [(H(i), H(s), H(f), n) for i, s, f, n, _ in RFC5869[:2]]
    lines += [f"h {i.hex()} {s.hex()} {f.hex()} {n}" for i, s, f, n in hk]
    lines.append("i 1000")
    (tmp_path / "cases").write_text("\n".join(lines) + "\n")
    (tmp_path / "run.py").write_text(SCRIPT)
    out = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(tmp_path / "run.py"),
                          str(tmp_path / "cases")], env={"MICROPYPATH": MP_PATH},
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    want = []
    for k, u in pairs:
        key = X25519PrivateKey.from_private_bytes(k)
        u_clear = u[:31] + bytes((u[31] & 0x7F,))
        try:
            want.append(key.exchange(X25519PublicKey.from_public_bytes(u_clear)).hex())
        except ValueError:  # OpenSSL refuses an all-zero result; the ladder gives it
            want.append(bytes(32).hex())
    want += [HKDF(hashes.SHA256(), n, s, f).derive(i).hex() for i, s, f, n in hk]
    want.append(ITERATED[1000])
    assert out == want
    assert out[:2] == [v[2] for v in RFC7748_52] and out[2] == SHARED
