"""Signed update bundles on the node: the release key's manifest first, then every file.

A bundle (docs/protocol.md "Update bundle", docs/updates.md) is

    "LUB1" | uint32 big-endian N | COSE_Sign1 (N bytes, manifest as payload) | file bytes...

The envelope is read by position, in the one layout `lantern release build` writes, and its
Ed25519 signature is checked against the release key provisioned with the node before a byte
of the manifest is decoded. Only then are the manifest's claims (security floor, boards,
bytecode version) and each file's size and SHA-256 checked. Every refusal is a `Refused` with
a reason from REASONS, counted in Verifier.refused and printed once.

`lantern release` (tools/field/release.py) imports this module's rules (Manifest, which
reads a manifest by _scan's rules, path_ok, version_ok, the constants), so what `release
verify` accepts, a node accepts.
"""

import hashlib
import sys

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
_GATHER = const(512)  # OFFER pieces shorter than this are gathered (Pieces.append)

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
_PATH_CHARS = _NAME_CHARS + "/"
_ITEMS = const(240)  # boards and file fields in all: what a manifest may list
_VERSION_CHARS = _ALNUM + ".+-"
# the same sets as bytes, for checking a manifest's text in place
_B_VERSION = _VERSION_CHARS.encode()
_B_NAME = _NAME_CHARS.encode()
_B_PATH = _PATH_CHARS.encode()

REASONS = ("not_bundle", "truncated", "bad_envelope", "other_key", "bad_signature",
           "bad_manifest", "below_floor", "other_board", "other_mpy", "bad_size", "bad_hash",
           "bad_rotation")

# A key-rotation record's payload, {1: 2, 2: bstr(32) new key, 3: bstr(8) its kid}, in its one
# deterministic spelling: format 2 keeps it apart from a manifest (format 1, seven labels)
ROTATION = const(2)
_ROT_HEAD = b"\xa3\x01\x02\x02\x58\x20"
_ROT_KID = b"\x03\x48"
_ROT_LEN = const(48)  # bytes of that payload


class Refused(ValueError):
    """A bundle the node will not install; reason is one of REASONS."""

    def __init__(self, reason, detail):
        super().__init__("%s: %s" % (reason, detail))
        self.reason = reason
        self.detail = detail


def envelope_len(head):
    """N from a bundle's first 8 bytes (Refused, uncounted, if they are not a bundle's): no
    key and no Ed25519 needed, so an OFFER's first piece loads neither."""
    if len(head) < HEAD_LEN:
        raise Refused("truncated", "%d bytes, a bundle starts with 8" % len(head))
    if bytes(head[:4]) != MAGIC:
        raise Refused("not_bundle", "no LUB1 magic")
    n = int.from_bytes(bytes(head[4:HEAD_LEN]), "big")
    if not ENVELOPE_MIN <= n <= ENVELOPE_MAX:
        raise Refused("bad_envelope", "envelope of %d bytes" % n)
    return n


def key_id(public):
    """The kid a release key's signatures carry."""
    return hashlib.sha256(bytes(public)).digest()[:KID_LEN]


def _this_mpy():
    v = getattr(sys.implementation, "_mpy", None)
    return None if v is None else (v & 0xFF, v >> 8 & 3)


class Pieces:
    """Bytes held as the pieces they arrived in, read as one run from `base` on: a bundle's
    head comes in OFFER pieces and is never copied into one buffer, since a node's heap may
    have no free block that large (docs/updates.md, "Memory")."""

    def __init__(self, parts=None, base=0, size=-1):
        self.parts = parts if parts is not None else []
        self.base = base
        total = 0
        for b in self.parts:
            total += len(b)
        self.n = total - base if size < 0 else size

    def append(self, piece):
        """Keep piece; short ones are gathered into bytearrays of up to _GATHER bytes, so
        many tiny pieces cannot cost many times their size in object headers."""
        last = self.parts[-1] if self.parts else None
        if len(piece) < _GATHER:
            if isinstance(last, bytearray) and len(last) + len(piece) <= _GATHER:
                last.extend(piece)
            else:
                self.parts.append(bytearray(piece))
        else:
            self.parts.append(piece)
        self.n += len(piece)

    def __len__(self):
        return self.n

    def _find(self, i):
        """(piece index, offset in it) of byte i."""
        i += self.base
        for k, b in enumerate(self.parts):
            if i < len(b):
                return k, i
            i -= len(b)
        raise IndexError("past the end")

    def at(self, i):
        if not 0 <= i < self.n:
            raise ValueError("undecodable: truncated input")
        k, o = self._find(i)
        return self.parts[k][o]

    def views(self, i, j):
        """memoryviews over bytes i..j, piece by piece (for hashing: no copy)."""
        out = []
        if i >= j:
            return out
        k, o = self._find(i)
        left = j - i
        while left:
            mv = memoryview(self.parts[k])[o:o + left]
            out.append(mv)
            left -= len(mv)
            k, o = k + 1, 0
        return out

    def get(self, i, j):
        """Bytes i..j as one bytes object (short runs only: a path, a digest)."""
        if not 0 <= i <= j <= self.n:
            raise ValueError("undecodable: truncated input")
        vs = self.views(i, j)
        if len(vs) == 1:
            return bytes(vs[0])
        return b"".join([bytes(v) for v in vs])  # MicroPython's join takes no memoryview

    def sub(self, i, j):
        return Pieces(self.parts, self.base + i, j - i)


def pieces(data):
    return data if isinstance(data, Pieces) else Pieces([data])


class Manifest:
    """What a verified manifest says, read in place: the manifest's bytes (in the bundle's
    head) stay the only copy, with a 2-byte index per file. file(i) is (path, size, sha256)."""

    def __init__(self, payload, envelope_len):
        payload = pieces(payload)
        # image: the index of the app image entry (image/NAME.bin), -1 without one
        self.image, at, self.version, self.floor, self.min_gateway, self.boards, self.mpy = \
            _scan(payload)
        self._p = payload
        self._at = at  # where file i's path starts in the payload: 2 bytes per file
        self.count = len(at) // 2
        self.data_start = HEAD_LEN + envelope_len  # offset of the first file in the bundle
        total = 0
        for i in range(self.count):
            total += self.file(i)[1]
        self.size = self.data_start + total

    def file(self, i):
        p = self._p
        j = self._at[2 * i] << 8 | self._at[2 * i + 1]
        _, k, j = _head(p, j)
        path = str(p.get(j, j + k), "ascii")
        _, size, j = _head(p, j + k)
        return path, size, p.get(j + 2, j + 34)  # bstr(32): a 2-byte head

    @property
    def files(self):
        return [self.file(i) for i in range(self.count)]

    def offset(self, index):
        """Where file index starts in the bundle (a transfer resumes from there)."""
        at = self.data_start
        for i in range(index):
            at += self.file(i)[1]
        return at


def _head(p, i):
    """(major type, argument, next offset) of the data item head at p[i]; ValueError unless it
    is definite-length and shortest-form (RFC 8949 §4.2.1)."""
    ib = p.at(i)
    ai = ib & 0x1F
    if ai < 24:
        return ib >> 5, ai, i + 1
    if ai > 27:
        raise ValueError("not in deterministic CBOR")
    k = 1 << (ai - 24)
    if i + 1 + k > len(p):
        raise ValueError("undecodable: truncated input")
    v = 0
    for j in range(i + 1, i + 1 + k):
        v = v << 8 | p.at(j)
    if v < (24 if k == 1 else 1 << (4 * k)):  # 24, 256, 65536, 2^32
        raise ValueError("not in deterministic CBOR")
    return ib >> 5, v, i + 1 + k


def _text(p, i, allowed, most):
    """(text, next offset) of a text string of 1..most characters, each in allowed."""
    major, k, i = _head(p, i)
    if major != 3 or not 0 < k <= most:
        raise ValueError(_SHAPE)
    b = p.get(i, i + k)
    for c in b:
        if c not in allowed:  # allowed is bytes: ASCII only
            raise ValueError(_SHAPE)
    return str(b, "ascii"), i + k


def _version(p, i):
    v, i = _text(p, i, _B_VERSION, 32)
    if v[0] not in _ALNUM:
        raise ValueError(_SHAPE)
    return v, i


def _uint(p, i):
    major, v, i = _head(p, i)
    if major:
        raise ValueError(_SHAPE)
    return v, i


def _array(p, i):
    major, n, i = _head(p, i)
    if major != 4:
        raise ValueError(_SHAPE)
    return n, i


_SHAPE = "not a format-1 manifest"


def _scan(p):
    """Check a manifest's bytes against docs/protocol.md by position, building nothing but the
    fields a node reads: (index, at, version, floor, min gateway, boards, bytecode)."""
    major, n, i = _head(p, 0)
    if major != 5 or n != 7:
        raise ValueError(_SHAPE)
    for label in range(1, 8):  # integer keys 1..7: deterministic order is this order
        if p.at(i) != label:
            raise ValueError(_SHAPE)
        i += 1
        if label == M_FORMAT:
            fmt, i = _uint(p, i)
            if fmt != FORMAT:
                raise ValueError(_SHAPE)
        elif label == M_VERSION:
            version, i = _version(p, i)
        elif label == M_FLOOR:
            floor, i = _uint(p, i)
        elif label == M_MIN_GATEWAY:
            gateway, i = _version(p, i)
        elif label == M_BOARDS:
            nb, i = _array(p, i)
            if not 0 < nb <= _ITEMS:
                raise ValueError(_SHAPE)
            boards = []
            for _ in range(nb):
                b, i = _text(p, i, _B_NAME, 32)
                boards.append(b)
        elif label == M_MPY:
            k, i = _array(p, i)
            if k != 2:
                raise ValueError(_SHAPE)
            major, i = _uint(p, i)
            minor, i = _uint(p, i)
        else:
            nf, i = _array(p, i)
            if not nf or nf % 3 or nf + nb > _ITEMS:
                raise ValueError(_SHAPE)
            at = bytearray(2 * (nf // 3))
            seen = set()
            image = -1
            for f in range(nf // 3):
                at[2 * f] = i >> 8
                at[2 * f + 1] = i & 0xFF
                path, i = _text(p, i, _B_PATH, 64)
                # one name to a case-insensitive file system (FAT) is one file
                if not path_ok(path) or path.lower() in seen:
                    raise ValueError(_SHAPE)
                seen.add(path.lower())
                if is_image(path):
                    # one app image, for ESP32 boards only (esp32.Partition)
                    if image >= 0 or not all_esp32(boards):
                        raise ValueError(_SHAPE)
                    image = f
                _, i = _uint(p, i)
                kind, k, i = _head(p, i)
                if kind != 2 or k != 32:
                    raise ValueError(_SHAPE)
                i += 32
            if i > len(p):
                raise ValueError("undecodable: truncated input")
    if i != len(p):
        raise ValueError("undecodable: trailing bytes")
    return image, at, version, floor, gateway, boards, (major, minor)


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


def is_image(path):
    """Whether a manifest entry is an app image (kind "image": written to the next OTA
    partition, not to a file), which its path says: image/NAME.bin."""
    return path.startswith("image/")


def all_esp32(boards):
    """Whether every board is an ESP32 one (esp32*): an app image is only for those."""
    for b in boards:
        if not b.startswith("esp32"):
            return False
    return True


def path_ok(p):
    """A bundle file's path: main.py, boards/NAME.json, node/.../NAME.mpy or an app image
    image/NAME.bin, at most 64 ASCII letters, digits and ._-/ with no empty, "." or ".."
    part."""
    if not _chars_ok(p, _PATH_CHARS, 64):
        return False
    parts = p.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            return False
    name = parts[-1]
    if parts[0] == "boards":
        return len(parts) == 2 and name.endswith(".json") and len(name) > 5
    if parts[0] == "image":
        return len(parts) == 2 and name.endswith(".bin") and len(name) > 4
    return p == "main.py" or (parts[0] == "node" and len(parts) > 1
                              and name.endswith(".mpy") and len(name) > 4)


class Verifier:
    """Checks bundles against one release key, for one board, above one security floor."""

    def __init__(self, release_key, board, floor=0, mpy=-1, next_key=None):
        """next_key: a rotation's new key, not yet proved by a bundle (node/ota.py): bundles
        signed by either key verify; a rotation record only by release_key."""
        from . import ed25519  # loaded for the check only: node/ota.py unloads it after

        for k in (release_key, next_key):
            try:
                if k is not None:
                    ed25519.check_public(k)
            except ValueError as e:
                raise ValueError("release key refused: %s" % e) from None
        self.key = bytes(release_key)
        self.kid = key_id(self.key)
        self.next = None if next_key is None else bytes(next_key)
        self.next_kid = None if next_key is None else key_id(self.next)
        self.signer = None  # the kid of the last signature that verified
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
        try:
            return envelope_len(head)
        except Refused as e:
            raise self._refuse(e.reason, e.detail) from None

    def manifest(self, head):
        """The Manifest of a bundle whose first 8 + N bytes are head (bytes, or the Pieces
        an OFFER arrived in), once it is authentic."""
        head = pieces(head)
        n = self.envelope_len(head.get(0, min(HEAD_LEN, len(head))))
        if len(head) < HEAD_LEN + n:
            raise self._refuse("truncated", "envelope cut at %d of %d bytes"
                               % (len(head) - HEAD_LEN, n))
        payload = self._open(head.sub(HEAD_LEN, HEAD_LEN + n), n, True)
        try:
            man = Manifest(payload, n)
        except ValueError as e:
            raise self._refuse("bad_manifest", "signed but %s" % e) from None
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

    def _open(self, env, n, bundle):
        """The payload of the COSE_Sign1 env (Pieces, n bytes, Lantern's layout) once its
        signature verifies: under the release key, or for a bundle the pending next key."""
        p0 = len(_SIGN1_HEAD)
        if env.get(0, p0) != _SIGN1_HEAD or env.at(p0 + KID_LEN) != 0xA0:
            raise self._refuse("bad_envelope", "not a COSE_Sign1 in Lantern's layout")
        kid = env.get(p0, p0 + KID_LEN)
        p = p0 + KID_LEN + 1
        q = p  # the payload's bstr head: Sig_structure encodes the payload the same way
        ai = env.at(p) ^ 0x40
        if ai < 24:
            k, p = ai, p + 1
        elif ai == 24 and env.at(p + 1) >= 24:
            k, p = env.at(p + 1), p + 2
        elif ai == 25 and env.at(p + 1):
            k, p = env.at(p + 1) << 8 | env.at(p + 2), p + 3
        else:
            raise self._refuse("bad_envelope", "payload is not a shortest-form bstr")
        if p + k + 66 != n or env.get(p + k, p + k + 2) != _SIG_HEAD:
            raise self._refuse("bad_envelope", "lengths do not add up")
        if kid == self.kid:
            key = self.key
        elif bundle and kid == self.next_kid:
            key = self.next
        else:
            raise self._refuse("other_key", "signed by key %s" % _hex(kid))
        # Sig_structure ["Signature1", protected, h'', payload], in parts: no copy of payload
        signed = [_SIG1_CONTEXT, env.get(2, p0 + KID_LEN), b"\x40"] + env.views(q, p + k)
        from . import ed25519

        if not ed25519.verify(key, signed, env.get(n - 64, n)):
            raise self._refuse("bad_signature", "signature does not verify")
        self.signer = kid
        return env.sub(p, p + k)

    def rotation(self, record):
        """The new release key in a key-rotation record (a COSE_Sign1, docs/protocol.md) that
        the current release key signed; Refused otherwise."""
        n = len(record)
        if not ENVELOPE_MIN <= n <= ENVELOPE_MAX:
            raise self._refuse("bad_envelope", "record of %d bytes" % n)
        payload = self._open(Pieces([record]), n, False)
        if len(payload) != _ROT_LEN:
            raise self._refuse("bad_rotation", "signed, but not {1: 2, 2: key, 3: its kid}")
        new = payload.get(6, 38)
        if (payload.get(0, 6) != _ROT_HEAD or payload.get(38, 40) != _ROT_KID
                or payload.get(40, 48) != key_id(new)):
            raise self._refuse("bad_rotation", "signed, but not {1: 2, 2: key, 3: its kid}")
        from . import ed25519

        try:
            ed25519.check_public(new)
        except ValueError as e:
            raise self._refuse("bad_rotation", "signed, but %s" % e) from None
        if new == self.key:
            raise self._refuse("bad_rotation", "the new key is the current one")
        return new

    def check_file(self, man, index, data):
        """Refused unless data is file index of man, byte for byte."""
        path, size, digest = man.file(index)
        if len(data) != size:
            raise self._refuse("bad_size", "%s: %d bytes, manifest says %d"
                               % (path, len(data), size))
        if hashlib.sha256(data).digest() != digest:
            raise self._refuse("bad_hash", "%s: SHA-256 differs from the manifest" % path)

    def check_part(self, man, index, f):
        """Refused unless the next bytes of f are file index of man, read 512 at a time: a
        staged file is checked from flash without ever being whole in RAM (node/ota.py)."""
        path, size, digest = man.file(index)
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
        for i in range(man.count):
            self.check_part(man, i, f)
        if f.read(1):
            raise self._refuse("bad_size", "bytes after the last file")
        return man


def _hex(b):
    return "".join("%02x" % c for c in b)
