"""Signed update bundles on the node: the release key's manifest first, then every file.

A bundle (docs/protocol.md "Update bundle", docs/updates.md) is

    "LUB1" | uint32 big-endian N | COSE_Sign1 (N bytes, manifest as payload) | file bytes...

The envelope is read by position, in the one layout `lantern release build` writes, and its
Ed25519 signature is checked against the release key provisioned with the node before a byte
of the manifest is decoded. Only then are the manifest's claims (security floor, boards,
bytecode version) and each file's size and SHA-256 checked. Every refusal is a `Refused` with
a reason from REASONS, counted in Verifier.refused and printed once.
"""

import hashlib
import sys

from . import cbor, ed25519

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


MAGIC = b"LUB1"
HEAD_LEN = const(8)  # magic and the envelope's length
ENVELOPE_MAX = const(8192)  # bytes of COSE_Sign1 a node reads into RAM at once
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


def _path_ok(p):
    if not isinstance(p, str) or not 0 < len(p) <= 64 or p[0] == "/" or "\\" in p:
        return False
    for part in p.split("/"):
        if part in ("", ".", ".."):
            return False
    return True


def _shape_ok(m):
    """True if the decoded manifest has every field, of the right type."""
    if not isinstance(m, dict) or m.get(M_FORMAT) != FORMAT or len(m) != 7:
        return False
    if not isinstance(m.get(M_VERSION), str) or not isinstance(m.get(M_MIN_GATEWAY), str):
        return False
    floor = m.get(M_FLOOR)
    if type(floor) is not int or floor < 0:
        return False
    boards = m.get(M_BOARDS)
    if not isinstance(boards, list) or not boards:
        return False
    for b in boards:
        if not isinstance(b, str):
            return False
    mpy = m.get(M_MPY)
    if not isinstance(mpy, list) or len(mpy) != 2 or type(mpy[0]) is not int:
        return False
    f = m.get(M_FILES)
    if not isinstance(f, list) or not f or len(f) % 3:
        return False
    seen = set()
    for i in range(0, len(f), 3):
        p, s, d = f[i], f[i + 1], f[i + 2]
        if not _path_ok(p) or p in seen or type(s) is not int or s < 0:
            return False
        if not isinstance(d, bytes) or len(d) != 32:
            return False
        seen.add(p)
    return True


class Verifier:
    """Checks bundles against one release key, for one board, above one security floor."""

    def __init__(self, release_key, board, floor=0, mpy=-1):
        if len(release_key) != 32:
            raise ValueError("a release key is 32 bytes")
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
        if not 0 < n <= ENVELOPE_MAX:
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
        if (n < p0 + KID_LEN + 4 + 66 or bytes(env[:p0]) != _SIGN1_HEAD
                or env[p0 + KID_LEN] != 0xA0):
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
        if not ed25519.verify(self.key, signed, env[n - 64:]):
            raise self._refuse("bad_signature", "manifest signature does not verify")
        try:
            m = cbor.loads(env[p:p + k], max_items=256)
        except cbor.CBORDecodeError as e:
            raise self._refuse("bad_manifest", "signed but undecodable: %s" % e) from None
        if not _shape_ok(m):
            raise self._refuse("bad_manifest", "signed but not a format-1 manifest")
        man = Manifest(m, n)
        if man.floor < self.floor:
            raise self._refuse("below_floor", "release %s has security floor %d, node is at %d"
                               % (man.version, man.floor, self.floor))
        if self.board not in man.boards:
            raise self._refuse("other_board", "release %s is for %s, not %s"
                               % (man.version, ",".join(man.boards), self.board))
        if self.mpy is not None and man.mpy != tuple(self.mpy):
            raise self._refuse("other_mpy", "bytecode v%d.%d, node runs v%d.%d"
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

    def check_stream(self, f):
        """The Manifest of the whole bundle readable from f, every file checked on the way."""
        head = f.read(HEAD_LEN)
        n = self.envelope_len(head)
        man = self.manifest(head + f.read(n))
        buf = bytearray(_CHUNK)
        mv = memoryview(buf)
        for path, size, digest in man.files:
            h = hashlib.sha256()
            left = size
            while left:
                got = f.readinto(mv[:min(left, _CHUNK)])
                if not got:
                    raise self._refuse("truncated", "%s: %d bytes missing" % (path, left))
                h.update(mv[:got])
                left -= got
            if h.digest() != digest:
                raise self._refuse("bad_hash", "%s: SHA-256 differs from the manifest" % path)
        if f.read(1):
            raise self._refuse("bad_size", "bytes after the last file")
        return man


def _hex(b):
    return "".join("%02x" % c for c in b)
