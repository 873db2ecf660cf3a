"""`lantern release`: Ed25519 release keys and signed update bundles (docs/updates.md).

A bundle is the firmware a node runs (its modules as .mpy, main.py, board files) behind a
CBOR manifest signed as a COSE_Sign1 with EdDSA; the byte layout is in docs/protocol.md
("Update bundle"). The node checks the same bundle with its own code (firmware/node/update.py).
The signature is checked here with OpenSSL, independently of the node's Ed25519; the rules a
manifest and a release key must meet are the node's own, imported from its module, so there
is one set of them.

Exit status: 0 done (verify: the bundle is valid), 1 the bundle is refused (the reason on one
line), 2 a usage or file problem (a key that cannot be read, a file that exists).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import lantern
from lantern.agent.config import check_secret_file
from lantern.agent.errors import ConfigError, LanternError
from lantern.tools.field import provision_steps as ps

# The node's own modules (MicroPython code, untyped): imported by name so that strict mypy
# takes them as Any instead of checking MicroPython code as CPython code.
node_update: Any = importlib.import_module("lantern.firmware.node.update")
node_ed25519: Any = importlib.import_module("lantern.firmware.node.ed25519")

MAGIC: bytes = node_update.MAGIC
HEAD_LEN: int = node_update.HEAD_LEN
ENVELOPE_MIN: int = node_update.ENVELOPE_MIN
ENVELOPE_MAX: int = node_update.ENVELOPE_MAX  # what a node reads into RAM at once
KID_LEN: int = node_update.KID_LEN
FORMAT: int = node_update.FORMAT
M_FORMAT, M_VERSION, M_FLOOR, M_MIN_GATEWAY, M_BOARDS, M_MPY, M_FILES = (
    node_update.M_FORMAT, node_update.M_VERSION, node_update.M_FLOOR,
    node_update.M_MIN_GATEWAY, node_update.M_BOARDS, node_update.M_MPY, node_update.M_FILES)
READ_MAX = 1 << 16  # bytes of a bundle's file `verify` holds at once
# A node decodes at most 256 CBOR items per manifest: 16 + one per board + three per file.
FILES_MAX = 76
BOARDS_MAX = 12
ALG_EDDSA = -8
TAG_SIGN1 = 18
# tag 18, array(4), bstr(13) {1: -8, 4: bstr(8) kid}: the kid follows, then the empty map a0
SIGN1_HEAD = b"\xd2\x84\x4d\xa2\x01\x27\x04\x48"
SIG_HEAD = b"\x58\x40"
OK, REFUSED, USAGE = 0, 1, 2


class ReleaseError(LanternError):
    """A key or firmware tree that cannot make a bundle; the message names the fix."""


class BundleRefused(LanternError):
    """A bundle that does not verify; `reason` is the node's name for it (update.REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: bytes


@dataclass(frozen=True)
class Manifest:
    version: str
    floor: int
    min_gateway: str
    boards: tuple[str, ...]
    mpy: tuple[int, int]
    files: tuple[FileEntry, ...]

    def encode(self) -> bytes:
        """Deterministic CBOR (RFC 8949 §4.2.1; all labels are small ints, so cbor2's
        canonical order is the bytewise one)."""
        flat: list[Any] = []
        for f in self.files:
            flat += [f.path, f.size, f.sha256]
        return cbor2.dumps({M_FORMAT: FORMAT, M_VERSION: self.version, M_FLOOR: self.floor,
                            M_MIN_GATEWAY: self.min_gateway, M_BOARDS: list(self.boards),
                            M_MPY: list(self.mpy), M_FILES: flat}, canonical=True)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """The manifest in data (already authenticated), by the node's own rules
        (parse_manifest, on the node's Manifest); BundleRefused if it breaks one."""
        try:
            m = parse_manifest(data)
        except ValueError as e:
            raise BundleRefused("bad_manifest", f"signed but {e}") from None
        flat = m[M_FILES]
        return cls(m[M_VERSION], m[M_FLOOR], m[M_MIN_GATEWAY], tuple(m[M_BOARDS]),
                   (m[M_MPY][0], m[M_MPY][1]),
                   tuple(FileEntry(*flat[i:i + 3]) for i in range(0, len(flat), 3)))


def parse_manifest(payload: bytes) -> dict[int, Any]:
    """The manifest map in an authenticated payload; ValueError if it breaks a rule of
    docs/protocol.md (deterministic CBOR, every label, each field's type and form). The rules
    are the node's: its Manifest reads the same bytes in place (node/update.py _scan)."""
    man = node_update.Manifest(payload, 0)
    flat: list[Any] = []
    for i in range(man.count):
        flat += man.file(i)
    return {M_FORMAT: FORMAT, M_VERSION: man.version, M_FLOOR: man.floor,
            M_MIN_GATEWAY: man.min_gateway, M_BOARDS: man.boards, M_MPY: list(man.mpy),
            M_FILES: flat}


def key_id(public: Ed25519PublicKey) -> bytes:
    """The kid a key's signatures carry: the first 8 bytes of SHA-256 of its raw 32 bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KID_LEN]


def protected_header(public: Ed25519PublicKey) -> bytes:
    return cbor2.dumps({1: ALG_EDDSA, 4: key_id(public)}, canonical=True)


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 §4.4 Sig_structure for COSE_Sign1, empty external AAD."""
    return cbor2.dumps(["Signature1", protected, b"", payload], canonical=True)


def sign1(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """Tagged COSE_Sign1 of payload, EdDSA, kid in the protected header."""
    protected = protected_header(key.public_key())
    sig = key.sign(sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(TAG_SIGN1, [protected, {}, payload, sig]), canonical=True)


def rotation(key: Ed25519PrivateKey, new: Ed25519PublicKey) -> bytes:
    """A key-rotation record: the COSE_Sign1, by the current release key, of
    {1: 2, 2: the new key's 32 bytes, 3: its kid} (docs/protocol.md, "Update transfer")."""
    raw = new.public_bytes_raw()
    if raw == key.public_key().public_bytes_raw():
        raise ReleaseError("--new is the current key: a rotation names another key")
    payload = cbor2.dumps({1: node_update.ROTATION, 2: raw, 3: key_id(new)}, canonical=True)
    return sign1(key, payload)


def bundle(key: Ed25519PrivateKey, version: str, floor: int, min_gateway: str,
           boards: list[str], mpy: tuple[int, int], files: list[tuple[str, bytes]]) -> bytes:
    """A complete bundle: header, signed manifest, then the files in manifest order."""
    for v in (version, min_gateway):
        if not node_update.version_ok(v):
            raise ReleaseError(f"version {v!r}: a letter or digit, then letters, digits and "
                               ".+- (at most 32 in all), e.g. 1.4.0")
    if floor < 0:
        raise ReleaseError("--security-floor must be 0 or more")
    if not files or len(files) > FILES_MAX:
        raise ReleaseError(f"{len(files)} files: a bundle holds 1 to {FILES_MAX}")
    for path, _ in files:
        if not node_update.path_ok(path):
            raise ReleaseError(f"file path {path!r}: main.py, boards/NAME.json or "
                               "node/.../NAME.mpy, in ASCII letters, digits and ._-/, at most "
                               "64 bytes")
    if len({p.lower() for p, _ in files}) != len(files):
        raise ReleaseError("a path appears twice (letter case aside: FAT does not tell them "
                           "apart)")
    if not boards or len(boards) > BOARDS_MAX:
        raise ReleaseError(f"{len(boards)} boards: a bundle names 1 to {BOARDS_MAX}")
    man = Manifest(version, floor, min_gateway, tuple(boards), mpy,
                   tuple(FileEntry(p, len(b), hashlib.sha256(b).digest()) for p, b in files))
    payload = man.encode()
    try:
        parse_manifest(payload)  # what a node would say of it
    except ValueError as e:
        raise ReleaseError(f"a node would refuse this manifest: {e}") from None
    envelope = sign1(key, payload)
    if len(envelope) > ENVELOPE_MAX:
        raise ReleaseError(f"signed manifest of {len(envelope)} bytes: a node reads at most "
                           f"{ENVELOPE_MAX}; ship fewer files or boards")
    return (MAGIC + len(envelope).to_bytes(4, "big") + envelope
            + b"".join(b for _, b in files))


def _bstr_head(b: bytes, p: int) -> tuple[int, int]:
    """(start, length) of the shortest-form byte string whose head is at b[p]."""
    ai = b[p] ^ 0x40 if p < len(b) else 0xFF
    if ai < 24:
        return p + 1, ai
    if ai == 24 and p + 1 < len(b) and b[p + 1] >= 24:
        return p + 2, b[p + 1]
    if ai == 25 and p + 2 < len(b) and b[p + 1]:
        return p + 3, b[p + 1] << 8 | b[p + 2]
    raise BundleRefused("bad_envelope", "payload is not a shortest-form bstr")


def open_bundle(data: bytes, public: Ed25519PublicKey) -> tuple[Manifest, list[bytes]]:
    """The manifest and files of a bundle signed by public; BundleRefused(reason) if not."""
    return read_bundle(io.BytesIO(data), public, keep=True)


def _read(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes of f, fewer only at its end."""
    parts, left = [], n
    while left:
        b = f.read(left)
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def read_bundle(f: BinaryIO, public: Ed25519PublicKey,
                keep: bool = False) -> tuple[Manifest, list[bytes]]:
    """The manifest (and with keep, the files) of the bundle read from f, signed by public;
    BundleRefused(reason) if not.

    Every read is bounded: the 8-byte head, at most ENVELOPE_MAX bytes of envelope, each
    file's signed size (READ_MAX at a time), then one byte to find the end. A huge or endless
    input costs no more than the bundle it starts with. The envelope is read by position, in
    the one layout `bundle` writes, as the node reads it: what this accepts, a node accepts.
    """
    head = _read(f, HEAD_LEN)
    if len(head) < HEAD_LEN:
        raise BundleRefused("truncated", f"{len(head)} bytes, a bundle starts with 8")
    if head[:4] != MAGIC:
        raise BundleRefused("not_bundle", "no LUB1 magic: not a Lantern update bundle")
    n = int.from_bytes(head[4:8], "big")
    if not ENVELOPE_MIN <= n <= ENVELOPE_MAX:
        raise BundleRefused("bad_envelope", f"envelope of {n} bytes")
    env = _read(f, n)
    if len(env) < n:
        raise BundleRefused("truncated", f"envelope cut at {len(env)} of {n} bytes")
    p = len(SIGN1_HEAD) + KID_LEN
    if not env.startswith(SIGN1_HEAD) or env[p:p + 1] != b"\xa0":
        raise BundleRefused("bad_envelope", "not a COSE_Sign1 in Lantern's layout")
    start, size = _bstr_head(env, p + 1)
    if start + size + 66 != n or env[n - 66:n - 64] != SIG_HEAD:
        raise BundleRefused("bad_envelope", "lengths do not add up")
    payload = env[start:start + size]
    kid = env[len(SIGN1_HEAD):p]
    if kid != key_id(public):
        raise BundleRefused("other_key", f"signed by key {kid.hex()}, not {key_id(public).hex()}")
    try:
        public.verify(env[n - 64:], sig_structure(env[3:p], payload))
    except InvalidSignature:
        raise BundleRefused("bad_signature", "manifest signature does not verify") from None
    man = Manifest.decode(payload)
    files = []
    for e in man.files:
        h, left, kept = hashlib.sha256(), e.size, []
        while left:
            chunk = _read(f, min(left, READ_MAX))
            if not chunk:
                raise BundleRefused("truncated", f"{e.path}: {left} bytes missing")
            h.update(chunk)
            if keep:
                kept.append(chunk)
            left -= len(chunk)
        if h.digest() != e.sha256:
            raise BundleRefused("bad_hash", f"{e.path}: SHA-256 differs from the manifest")
        files.append(b"".join(kept))
    if f.read(1):
        raise BundleRefused("bad_size", "bytes after the last file")
    return man, files


# ---- the firmware tree ----

def board_names(boards: list[str] | None) -> list[str]:
    known = sorted(p.stem for p in lantern.BOARDS.glob("*.json") if p.stem != "board.schema")
    for b in boards or []:
        if b not in known:
            raise ReleaseError(f"unknown board {b!r}; known: {', '.join(known)}")
    return sorted(set(boards)) if boards else known


def firmware_files(mpy_cross: str, boards: list[str]) -> list[tuple[str, bytes]]:
    """node/**/*.mpy compiled by mpy_cross, main.py, and boards/<name>.json per board."""
    out: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory(prefix="lantern-release-") as tmp:
        for src in ps.firmware_sources(lantern.FIRMWARE):
            rel = src.relative_to(lantern.FIRMWARE)
            dst = Path(tmp) / "out.mpy"
            try:
                subprocess.run([mpy_cross, "-O2", "-o", str(dst), "-s", str(rel), str(src)],
                               check=True, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                err = getattr(e, "stderr", "") or str(e)
                raise ReleaseError(f"mpy-cross {rel}: {err.strip()}; pass --mpy-cross of the "
                                   "nodes' MicroPython version") from None
            out.append((rel.with_suffix(".mpy").as_posix(), dst.read_bytes()))
    out.append(("main.py", (lantern.FIRMWARE / "main.py").read_bytes()))
    out += [(f"boards/{b}.json", (lantern.BOARDS / f"{b}.json").read_bytes()) for b in boards]
    return out


IMAGE_PATH = "image/app.bin"  # the manifest entry of kind "image" (node/update.py is_image)
ESP_IMAGE_MAGIC = 0xE9  # the first byte of every ESP32 image, app or bootloader (esptool's format)
# ESP-IDF's esp_app_desc_t opens the first (DROM) segment of every app image, so its magic word
# ESP_APP_DESC_MAGIC_WORD is at sizeof(esp_image_header_t) + sizeof(esp_image_segment_header_t)
# = 24 + 8 (docs "App Image Format", "Application Description"), little-endian as the chip is
APP_DESC_MAGIC = (0xABCD5432).to_bytes(4, "little")
APP_DESC_AT = 24 + 8


def app_image(path: Path, boards: list[str]) -> bytes:
    """The ESP32 app image at path, for boards that must all be ESP32 ones."""
    other = [b for b in boards if not node_update.all_esp32([b])]
    if other or not boards:
        raise ReleaseError(f"--image is for ESP32 boards only (esp32*), not "
                           f"{', '.join(other) or 'none'}: pass --board esp32-...")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ReleaseError(f"--image {path}: {e.strerror}") from None
    if not data or data[0] != ESP_IMAGE_MAGIC:
        raise ReleaseError(f"--image {path}: not an ESP32 app image (it starts with 0xE9: "
                           "the micropython.bin of an ESP-IDF build)")
    if data[APP_DESC_AT:APP_DESC_AT + 4] != APP_DESC_MAGIC:
        raise ReleaseError(f"--image {path}: not an ESP32 app image, not the bootloader or a "
                           "whole-flash dump (no app description, magic 0xABCD5432, at offset "
                           f"{APP_DESC_AT}): pass the app alone, micropython.bin of the build, "
                           "not the download page's firmware.bin")
    return data


# ---- keys ----

def load_private(path: Path) -> Ed25519PrivateKey:
    """The release key in path; refused if other users can read the file (as keys.toml is)."""
    try:
        pem = check_secret_file(path, "release key")
    except ConfigError as e:
        raise ReleaseError(str(e)) from None
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as e:
        raise ReleaseError(f"{path}: not a readable PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: not an Ed25519 key; make one with `lantern release keygen`")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{path}: not a readable PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{path}: not an Ed25519 public key")
    try:
        node_ed25519.check_public(key.public_bytes_raw())  # the node refuses the same keys
    except ValueError as e:
        raise ReleaseError(f"{path}: {e}; make the release key with `lantern release "
                           "keygen`") from None
    return key


def create(path: Path, data: bytes, mode: int, exists: str) -> None:
    """Write data to a new file at path, created with mode. Refused (ReleaseError, `exists`
    as the fix) if anything is at path, a symbolic link too, dangling or not: nothing is
    overwritten, and nothing is written through a link. A failed write leaves no file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise ReleaseError(f"{path} exists: {exists}") from None
    except OSError as e:
        raise ReleaseError(f"{path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        path.unlink()  # ours: O_EXCL created it
        raise ReleaseError(f"{path}: {e.strerror}") from None


def keygen(name: str) -> tuple[Path, Path]:
    """Write NAME.pem (PKCS#8, mode 0600) and NAME.pub.pem; never overwrite either."""
    priv, pub = Path(f"{name}.pem"), Path(f"{name}.pub.pem")
    never = "a release key is never overwritten (choose another --out, or move the old key " \
            "away first)"
    for p in (priv, pub):
        if os.path.lexists(p):
            raise ReleaseError(f"{p} exists: {never}")
    key = Ed25519PrivateKey.generate()
    create(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), 0o600, never)
    try:
        create(pub, key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            0o644, never)
    except ReleaseError:
        priv.unlink()  # a private key without its public half is no release key
        raise
    return priv, pub


# ---- command line ----

def add_parser(sub: Any) -> None:
    r = sub.add_parser("release", help="release keys and signed update bundles",
                       description="Make the release key, build a signed update bundle of "
                       "the node firmware, check a bundle (docs/updates.md).")
    rs = r.add_subparsers(dest="action", required=True)
    k = rs.add_parser("keygen", help="write NAME.pem (private, 0600) and NAME.pub.pem")
    k.add_argument("--out", required=True, metavar="NAME")
    b = rs.add_parser("build", help="compile the firmware and sign it into a bundle")
    b.add_argument("--key", type=Path, required=True, help="the release key (NAME.pem)")
    b.add_argument("--version", required=True, help="the release's version, e.g. 1.4.0")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--board", action="append", help="a target board (repeat; default: all)")
    b.add_argument("--security-floor", type=int, default=0, metavar="N",
                   help="nodes that install this refuse any bundle with a lower floor")
    b.add_argument("--min-gateway", default=lantern.__version__,
                   help="oldest gateway version that may transfer it (default: this one)")
    b.add_argument("--mpy-cross", help="mpy-cross of the nodes' MicroPython version")
    b.add_argument("--image", type=Path, metavar="APP.bin",
                   help="an ESP32 app image (the build's micropython.bin) to carry as well, "
                   "written by the node into its next OTA partition; ESP32 boards only "
                   "(default: esp32*)")
    t = rs.add_parser("rotate", help="sign a rotation of the nodes' release key to a new one")
    t.add_argument("--key", type=Path, required=True, help="the current release key (OLD.pem)")
    t.add_argument("--new", type=Path, required=True, help="the new key's public half "
                   "(NEW.pub.pem, from `lantern release keygen`)")
    t.add_argument("--out", type=Path, required=True)
    v = rs.add_parser("verify", help="exit 0 if the bundle is valid under the public key")
    v.add_argument("file", type=Path)
    v.add_argument("--pubkey", type=Path, required=True, help="NAME.pub.pem")


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "keygen":
            priv, pub = keygen(args.out)
            print(f"wrote {priv} (private: keep it offline) and {pub} (give it to nodes)")
        elif args.action == "build":
            return _build(args)
        elif args.action == "rotate":
            return _rotate(args)
        else:
            return _verify(args)
    except ReleaseError as e:
        print(f"lantern release {args.action}: {e}", file=sys.stderr)
        return USAGE
    return OK


def _build(args: argparse.Namespace) -> int:
    if os.path.lexists(args.out):
        raise ReleaseError(f"{args.out} exists: choose another --out")
    key = load_private(args.key)
    boards = board_names(args.board)
    image: list[tuple[str, bytes]] = []
    if getattr(args, "image", None) is not None:
        if not args.board:
            boards = [b for b in boards if b.startswith("esp32")]
        image = [(IMAGE_PATH, app_image(args.image, boards))]
    tool = args.mpy_cross or ps.find_mpy_cross()
    found = ps.mpy_cross_version(tool)
    if found is None:
        raise ReleaseError(f"{tool}: not an mpy-cross that states its version; pass --mpy-cross")
    data = bundle(key, args.version, args.security_floor, args.min_gateway, boards, found[1],
                  image + firmware_files(tool, boards))
    create(args.out, data, 0o644, "choose another --out")
    print(f"wrote {args.out}: release {args.version} for {', '.join(boards)}, {len(data)} "
          f"bytes, MicroPython {found[0]} bytecode v{found[1][0]}.{found[1][1]}, signed by key "
          f"{key_id(key.public_key()).hex()}")
    return OK


def _rotate(args: argparse.Namespace) -> int:
    if os.path.lexists(args.out):
        raise ReleaseError(f"{args.out} exists: choose another --out")
    key = load_private(args.key)
    new = load_public(args.new)
    create(args.out, rotation(key, new), 0o644, "choose another --out")
    print(f"wrote {args.out}: release key {key_id(key.public_key()).hex()} hands over to "
          f"{key_id(new).hex()}; nodes keep both until a bundle signed by the new key verifies")
    return OK


def _verify(args: argparse.Namespace) -> int:
    public = load_public(args.pubkey)
    try:
        with open(args.file, "rb") as f:
            man, _ = read_bundle(f, public)
    except OSError as e:
        raise ReleaseError(f"{args.file}: {e.strerror}") from None
    except BundleRefused as e:
        print(f"{args.file}: refused: {e}", file=sys.stderr)
        return REFUSED
    print(f"{args.file}: valid: release {man.version} (security floor {man.floor}) for "
          f"{', '.join(man.boards)}, {len(man.files)} files, bytecode v{man.mpy[0]}."
          f"{man.mpy[1]}, gateway >= {man.min_gateway}")
    return OK
