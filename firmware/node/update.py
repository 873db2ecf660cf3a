"""Signed update bundles on the node: the release key's manifest first, then every file.

A bundle (docs/protocol.md "Update bundle", docs/updates.md) is

    "LUB1" | uint32 big-endian N | COSE_Sign1 (N bytes, manifest as payload) | file bytes...

The envelope is read by position, in the one layout `lantern release build` writes, and its
Ed25519 signature is checked against the release key provisioned with the node before a byte
of the manifest is decoded. Only then are the manifest's claims (security floor, boards,
bytecode version) and each file's size and SHA-256 checked. Every refusal is a `Refused` with
a reason from REASONS, counted in Verifier.refused and printed once.

`lantern release` (tools/field/release.py) imports this module's rules (parse_manifest,
path_ok, version_ok, the constants), so what `release verify` accepts, a node accepts.
"""

import hashlib
import sys

from . import cbor

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


MAGIC = b"LUB1"
HEAD_LEN = const(8)  # magic and the envelope's length
ENVELOPE_MAX = const(8192)  # bytes of COSE_Sign1 a node reads into RAM at once
# the layout's fixed parts (17), the longest payload head (3) and the signature (66)
ENVELOPE_MIN = const(86)
KID_LEN = const(8)  # a release key's id: the first 8 bytes of SHA-256 of its 32 raw bytes
_CHUNK = const(512)  # file bytes hashed per read

# manifest labels (docs/protocol.md)
M_FORMAT = const(1)
M_VERSION = const(2)
M_FLOOR = const(3)
M_MIN_GATEWAY = const(4)
M_BOARDS = const(5)
M_MPY = const(6)
M_FILES = const(7)
FORMAT = const(1)

# tag 18, array(4), bstr(13) {1: -8 (EdDSA), 4: bstr(8) kid}; the kid follows, then a0
_SIGN1_HEAD = b"\xd2\x84\x4d\xa2\x01\x27\x04\x48"
_SIG_HEAD = b"\x58\x40"  # bstr(64): the signature, last in the envelope
_SIG1_CONTEXT = b"\x84\x6aSignature1"  # array(4), tstr "Signature1": Sig_structure's start

_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NAME_CHARS = _ALNUM + "._-"
_VERSION_CHARS = _ALNUM + ".+-"

REASONS = ("not_bundle", "truncated", "bad_envelope", "other_key", "bad_signature",
           "bad_manifest", "below_floor", "other_board", "other_mpy", "bad_size", "bad_hash")


class Refused(ValueError):
    """A bundle the node will not install; reason is one of REASONS."""

    def __init__(self, reason, detail):
        super().__init__("%s: %s" % (reason, detail))
        self.reason = reason
        self.detail = detail


def key_id(public):
    """The kid a release key's signatures carry."""
    return hashlib.sha256(bytes(public)).digest()[:KID_LEN]


def _this_mpy():
    v = getattr(sys.implementation, "_mpy", None)
    return None if v is None else (v & 0xFF, v >> 8 & 3)


class Manifest:
    """What a verified manifest says; files are (path, size, sha256) in bundle order."""

    def __init__(self, m, envelope_len):
        self.version = m[M_VERSION]
        self.floor = m[M_FLOOR]
        self.min_gateway = m[M_MIN_GATEWAY]
        self.boards = m[M_BOARDS]
        self.mpy = tuple(m[M_MPY])
        f = m[M_FILES]
        self.files = [(f[i], f[i + 1], f[i + 2]) for i in range(0, len(f), 3)]
        self.data_start = HEAD_LEN + envelope_len  # offset of the first file in the bundle
        self.size = self.data_start + sum(s for _, s, _ in self.files)

    def offset(self, index):
        """Where file index starts in the bundle (a transfer resumes from there)."""
        return self.data_start + sum(s for _, s, _ in self.files[:index])


def _chars_ok(s, allowed, most):
    """True if s is text of 1 to most characters, each in allowed (ASCII: one byte each)."""
    if not isinstance(s, str) or not 0 < len(s) <= most:
        return False
    for c in s:
        if c not in allowed:
            return False
    return True


def version_ok(v):
    """A release or gateway version: [0-9A-Za-z][0-9A-Za-z.+-]{0,31}."""
    return _chars_ok(v, _VERSION_CHARS, 32) and v[0] in _ALNUM


def path_ok(p):
    """A bundle file's path: main.py, boards/NAME.json or node/.../NAME.mpy, at most 64
    ASCII letters, digits and ._-/ with no empty, "." or ".." part."""
    if not _chars_ok(p, _NAME_CHARS + "/", 64):
        return False
    parts = p.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            return False
    name = parts[-1]
    if parts[0] == "boards":
        return len(parts) == 2 and name.endswith(".json") and len(name) > 5
    return p == "main.py" or (parts[0] == "node" and len(parts) > 1
                              and name.endswith(".mpy") and len(name) > 4)


def _uints_ok(xs):
    for x in xs:
        if type(x) is not int or x < 0:  # True is a bool, not an int, on MicroPython too
            return False
    return True


def _shape_ok(m):
    """True if the decoded manifest has every field, of the right type and form."""
    if not isinstance(m, dict) or len(m) != 7:
        return False
    for k in m:
        if type(k) is not int:  # True == 1: a key True would pass for label 1
            return False
    mpy = m.get(M_MPY)
    if not isinstance(mpy, list) or len(mpy) != 2:
        return False
    if not _uints_ok(mpy + [m.get(M_FORMAT), m.get(M_FLOOR)]) or m[M_FORMAT] != FORMAT:
        return False
    if not version_ok(m.get(M_VERSION)) or not version_ok(m.get(M_MIN_GATEWAY)):
        return False
    boards = m.get(M_BOARDS)
    if not isinstance(boards, list) or not boards:
        return False
    for b in boards:
        if not _chars_ok(b, _NAME_CHARS, 32):
            return False
    f = m.get(M_FILES)
    if not isinstance(f, list) or not f or len(f) % 3:
        return False
    seen = set()
    for i in range(0, len(f), 3):
        p, s, d = f[i], f[i + 1], f[i + 2]
        # one name to a case-insensitive file system (FAT) is one file
        if not path_ok(p) or p.lower() in seen or not _uints_ok((s,)):
            return False
        if not isinstance(d, bytes) or len(d) != 32:
            return False
        seen.add(p.lower())
    return True


def parse_manifest(payload):
    """The manifest map in an authenticated payload; ValueError if it breaks a rule of
    docs/protocol.md (deterministic CBOR, every label, each field's type and form)."""
    try:
        m = cbor.loads(payload, max_items=256)
    except cbor.CBORDecodeError as e:
        raise ValueError("undecodable: %s" % e) from None
    if not _shape_ok(m):
        raise ValueError("not a format-1 manifest")
    if cbor.dumps(m) != payload:  # one manifest, one spelling: what was signed is what is read
        raise ValueError("not in deterministic CBOR")
    return m


class Verifier:
    """Checks bundles against one release key, for one board, above one security floor."""

    def __init__(self, release_key, board, floor=0, mpy=-1):
        from . import ed25519  # loaded for the check only: node/ota.py unloads it after

        try:
            ed25519.check_public(release_key)
        except ValueError as e:
            raise ValueError("release key refused: %s" % e) from None
        self.key = bytes(release_key)
        self.kid = key_id(self.key)
        self.board = board
        self.floor = floor
        self.mpy = _this_mpy() if mpy == -1 else mpy  # None: any bytecode version
        self.refused = {}
        for r in REASONS:
            self.refused[r] = 0

    def _refuse(self, reason, detail):
        self.refused[reason] += 1
        print("update refused: %s (%s)" % (reason, detail))
        return Refused(reason, detail)

    def envelope_len(self, head):
        """N from a bundle's first 8 bytes: how many bytes manifest() needs after them."""
        if len(head) < HEAD_LEN:
            raise self._refuse("truncated", "%d bytes, a bundle starts with 8" % len(head))
        if bytes(head[:4]) != MAGIC:
            raise self._refuse("not_bundle", "no LUB1 magic")
        n = int.from_bytes(bytes(head[4:HEAD_LEN]), "big")
        if not ENVELOPE_MIN <= n <= ENVELOPE_MAX:
            raise self._refuse("bad_envelope", "envelope of %d bytes" % n)
        return n

    def manifest(self, head):
        """The Manifest of a bundle whose first 8 + N bytes are head, once it is authentic."""
        n = self.envelope_len(head)
        if len(head) < HEAD_LEN + n:
            raise self._refuse("truncated", "envelope cut at %d of %d bytes"
                               % (len(head) - HEAD_LEN, n))
        env = memoryview(head)[HEAD_LEN:HEAD_LEN + n]
        p0 = len(_SIGN1_HEAD)
        if bytes(env[:p0]) != _SIGN1_HEAD or env[p0 + KID_LEN] != 0xA0:
            raise self._refuse("bad_envelope", "not a COSE_Sign1 in Lantern's layout")
        kid = bytes(env[p0:p0 + KID_LEN])
        p = p0 + KID_LEN + 1
        q = p  # the payload's bstr head: Sig_structure encodes the payload the same way
        ai = env[p] ^ 0x40
        if ai < 24:
            k, p = ai, p + 1
        elif ai == 24 and env[p + 1] >= 24:
            k, p = env[p + 1], p + 2
        elif ai == 25 and env[p + 1]:
            k, p = env[p + 1] << 8 | env[p + 2], p + 3
        else:
            raise self._refuse("bad_envelope", "payload is not a shortest-form bstr")
        if p + k + 66 != n or bytes(env[p + k:p + k + 2]) != _SIG_HEAD:
            raise self._refuse("bad_envelope", "lengths do not add up")
        if kid != self.kid:
            raise self._refuse("other_key", "signed by key %s" % _hex(kid))
        # Sig_structure ["Signature1", protected, h'', payload], in parts: no copy of payload
        signed = [_SIG1_CONTEXT, env[2:p0 + KID_LEN], b"\x40", env[q:p + k]]
        from . import ed25519

        if not ed25519.verify(self.key, signed, env[n - 64:]):
            raise self._refuse("bad_signature", "manifest signature does not verify")
        try:
            m = parse_manifest(env[p:p + k])
        except ValueError as e:
            raise self._refuse("bad_manifest", "signed but %s" % e) from None
        man = Manifest(m, n)
        # %s throughout: a refusal's own message must never be what fails
        if man.floor < self.floor:
            raise self._refuse("below_floor", "release %s has security floor %s, node is at %s"
                               % (man.version, man.floor, self.floor))
        if self.board not in man.boards:
            raise self._refuse("other_board", "release %s is for %s, not %s"
                               % (man.version, ",".join(man.boards), self.board))
        if self.mpy is not None and man.mpy != tuple(self.mpy):
            raise self._refuse("other_mpy", "bytecode v%s.%s, node runs v%s.%s"
                               % (man.mpy + tuple(self.mpy)))
        return man

    def check_file(self, man, index, data):
        """Refused unless data is file index of man, byte for byte."""
        path, size, digest = man.files[index]
        if len(data) != size:
            raise self._refuse("bad_size", "%s: %d bytes, manifest says %d"
                               % (path, len(data), size))
        if hashlib.sha256(data).digest() != digest:
            raise self._refuse("bad_hash", "%s: SHA-256 differs from the manifest" % path)

    def check_part(self, man, index, f):
        """Refused unless the next bytes of f are file index of man, read 512 at a time: a
        staged file is checked from flash without ever being whole in RAM (node/ota.py)."""
        path, size, digest = man.files[index]
        h = hashlib.sha256()
        buf = bytearray(_CHUNK)
        mv = memoryview(buf)
        left = size
        while left:
            got = f.readinto(mv[:min(left, _CHUNK)])
            if not got:
                raise self._refuse("truncated", "%s: %d bytes missing" % (path, left))
            h.update(mv[:got])
            left -= got
        if h.digest() != digest:
            raise self._refuse("bad_hash", "%s: SHA-256 differs from the manifest" % path)

    def check_stream(self, f):
        """The Manifest of the whole bundle readable from f, every file checked on the way."""
        head = f.read(HEAD_LEN)
        n = self.envelope_len(head)
        man = self.manifest(head + f.read(n))
        for i in range(len(man.files)):
            self.check_part(man, i, f)
        if f.read(1):
            raise self._refuse("bad_size", "bytes after the last file")
        return man


def _hex(b):
    return "".join("%02x" % c for c in b)
