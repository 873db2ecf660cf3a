"""Third review: signed updates (issue 16) attacked as a stolen gateway, a man in the middle and
a hostile release would: the node's check (firmware/node/update.py, ed25519.py) and
`lantern release` (tools/field/release.py).

A stolen gateway or a man in the middle controls every byte of a bundle but holds no release
key. A compromised-but-valid release (a buggy build, a stolen signing laptop) can make any
manifest the key signs: the node may refuse it, but must refuse it (counted), never crash.
The tool's `open_bundle` says "what this accepts, a node accepts": the two are compared.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import subprocess
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from node import ed25519, update

from lantern.agent.cli import main as cli
from lantern.tools.field import release
from lantern.tools.street.sim import MICROPYTHON, MP_EXTMOD

pytestmark = [pytest.mark.ota]

ROOT = Path(__file__).resolve().parents[2]
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(7, 39)))
PUB = KEY.public_key().public_bytes_raw()
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(40, 72)))
MPY = (6, 3)  # the unix port's bytecode (MicroPython 1.25)
BODY = b"import x\n"
H = hashlib.sha256(BODY).digest()
H0 = hashlib.sha256(b"").digest()
BASE: dict[int, Any] = {1: 1, 2: "2.0.0", 3: 2, 4: "0.1.0", 5: ["unix-sim"], 6: [6, 3],
                        7: ["main.py", 9, H]}


def manifest(changes: dict[int, Any] | None = None) -> bytes:
    """BASE with some labels replaced, in deterministic CBOR (as `release build` writes it)."""
    return cbor2.dumps({**BASE, **(changes or {})}, canonical=True)


def wrap(env: bytes, files: bytes = BODY) -> bytes:
    return release.MAGIC + len(env).to_bytes(4, "big") + env + files


def signed(payload: bytes, files: bytes = BODY, key: Ed25519PrivateKey = KEY) -> bytes:
    """A bundle whose manifest the release key really signed, whatever the manifest says."""
    return wrap(release.sign1(key, payload), files)


def sign1_raw(protected: dict[int, Any], payload: bytes, unprotected: dict[int, Any] | None = None,
              context: str = "Signature1", aad: bytes = b"") -> bytes:
    """A COSE_Sign1 signed by the release key, with headers and Sig_structure of our choice."""
    prot = cbor2.dumps(protected, canonical=True)
    sig = KEY.sign(cbor2.dumps([context, prot, aad, payload], canonical=True))
    return cbor2.dumps(cbor2.CBORTag(18, [prot, unprotected or {}, payload, sig]), canonical=True)


def verifier(pub: bytes = PUB) -> update.Verifier:
    return update.Verifier(pub, "unix-sim", floor=0, mpy=MPY)


def node_outcome(data: bytes) -> str:
    try:
        verifier().check_stream(io.BytesIO(data))
    except update.Refused as e:
        return e.reason
    return "ok"


def tool_outcome(data: bytes) -> str:
    try:
        release.open_bundle(data, KEY.public_key())
    except release.BundleRefused as e:
        return e.reason
    return "ok"


def small_envelope(k: int, kid: bytes) -> bytes:
    """A COSE_Sign1 in Lantern's layout whose payload is k bytes: N = 84 + k."""
    return (b"\xd2\x84\x4d\xa2\x01\x27\x04\x48" + kid + b"\xa0" + bytes([0x40 + k])
            + b"\xa0" * k + b"\x58\x40" + bytes(64))


# ---- a signed manifest that breaks the node's refusal path -------------------------------

@pytest.mark.parametrize("minor", ["3", None, [3]], ids=["str", "null", "array"])
def test_a_signed_manifest_with_a_non_integer_bytecode_minor_is_refused_not_a_crash(
        minor: Any) -> None:
    """[6, "3"] passes _shape_ok (only mpy[0]'s type is checked); formatting the other_mpy
    refusal with %d then raises TypeError: not a Refused, not counted, a dead transfer task."""
    v = verifier()
    with pytest.raises(update.Refused) as e:
        v.check_stream(io.BytesIO(signed(manifest({6: [6, minor]}))))
    assert e.value.reason == "bad_manifest" and v.refused["bad_manifest"] == 1


# ---- a release key of small order: anyone can sign -----------------------------------------

SMALL_ORDER = {"all-zero": bytes(32), "identity": (1).to_bytes(32, "little")}


def forged_bundle(pub: bytes) -> bytes:
    """A bundle "signed" by a small-order key without any private key: R = [S]B - [j]A for a
    guessed j = k mod 8 ([k]A only depends on it). Nobody in the world can sign for such a key."""
    a = ed25519.decode_point(pub)
    assert a is not None
    neg_a = (ed25519._P - a[0], a[1], 1, ed25519._P - a[3])
    payload = manifest({2: "6.6.6", 3: 99})
    prot = cbor2.dumps({1: -8, 4: update.key_id(pub)}, canonical=True)
    msg = release.sig_structure(prot, payload)
    for s in range(1, 200):
        for j in range(8):
            sig = ed25519.encode_point(ed25519._combo(s, j, neg_a)) + s.to_bytes(32, "little")
            if ed25519.verify(pub, msg, sig):
                Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)  # OpenSSL agrees
                env = cbor2.dumps(cbor2.CBORTag(18, [prot, {}, payload, sig]), canonical=True)
                return wrap(env)
    raise AssertionError("no forgery found")


@pytest.mark.parametrize("name", sorted(SMALL_ORDER))
def test_the_node_does_not_take_a_small_order_release_key(name: str) -> None:
    """An unprovisioned or zeroed release.pub (32 zero bytes) decodes to a point of order 4:
    with it, a stolen gateway forges a bundle in a few tries and the node installs it."""
    pub = SMALL_ORDER[name]
    data = forged_bundle(pub)
    try:
        v = verifier(pub)
    except ValueError:
        return  # refused as a release key: the fix
    with pytest.raises(update.Refused):
        man = v.check_stream(io.BytesIO(data))
        raise AssertionError(f"forged release {man.version} (floor {man.floor}) accepted "
                             f"under release key {pub.hex()}")


def test_release_verify_does_not_take_a_small_order_public_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pem = Ed25519PublicKey.from_public_bytes(bytes(32)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "zero.pub.pem").write_bytes(pem)
    (tmp_path / "forged.lub").write_bytes(forged_bundle(bytes(32)))
    rc = cli(["release", "verify", str(tmp_path / "forged.lub"),
              "--pubkey", str(tmp_path / "zero.pub.pem")])
    assert rc != release.OK, capsys.readouterr().out


# ---- the tool and the node on the same bytes -------------------------------------------------

# bundles the release key signed, each hostile in one way; the tool and the node must agree
SIGNED = {
    "valid": lambda: signed(manifest()),
    "path ../main.py": lambda: signed(manifest({7: ["../main.py", 9, H]})),
    "absolute path": lambda: signed(manifest({7: ["/main.py", 9, H]})),
    "negative floor": lambda: signed(manifest({3: -1})),
    "floor true": lambda: signed(manifest({3: True})),
    "no boards": lambda: signed(manifest({5: []})),
    "no files": lambda: signed(manifest({7: []}), files=b""),
    "size true": lambda: signed(manifest({7: ["main.py", True, hashlib.sha256(b"i").digest()]}),
                                files=b"i"),
    # a negative size walks the tool back: three files over the bytes of one
    "overlapping files": lambda: signed(manifest({7: ["a.py", 9, H, "b.py", -9, H0,
                                                     "c.py", 9, H]})),
    # the same manifest, not in deterministic encoding (floor as a 4-byte uint)
    "non-shortest floor": lambda: signed(manifest().replace(b"\x03\x02\x04", b"\x03\x1a\x00\x00"
                                                            b"\x00\x02\x04", 1)),
    "key true for 1": lambda: signed(cbor2.dumps({True: 1, **{k: v for k, v in BASE.items()
                                                              if k != 1}}, canonical=True)),
    # header lies, all validly signed: refused by both (held)
    "alg ES256": lambda: wrap(sign1_raw({1: -7, 4: update.key_id(PUB)}, manifest())),
    "no alg": lambda: wrap(sign1_raw({4: update.key_id(PUB)}, manifest())),
    "crit header": lambda: wrap(sign1_raw({1: -8, 2: [99], 4: update.key_id(PUB)}, manifest())),
    "alg unprotected": lambda: wrap(sign1_raw({1: -8, 4: update.key_id(PUB)}, manifest(),
                                              unprotected={1: -7})),
    "context Signature": lambda: wrap(sign1_raw({1: -8, 4: update.key_id(PUB)}, manifest(),
                                                context="Signature")),
    "external aad": lambda: wrap(sign1_raw({1: -8, 4: update.key_id(PUB)}, manifest(),
                                           aad=b"x")),
    "other key": lambda: signed(manifest(), key=OTHER),
    "trailing byte": lambda: signed(manifest()) + b"\x00",
}
# what a stolen gateway or a man in the middle can make without any key
UNSIGNED = {
    f"N={84 + k} {which} kid": (lambda k=k, kid=kid: wrap(small_envelope(k, kid), b""))
    for k in (0, 1) for which, kid in (("release", update.key_id(PUB)), ("other", bytes(8)))
}


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_release_verify_and_the_node_agree_on_every_signed_manifest(name: str) -> None:
    """`release verify` is the release manager's check (and the gateway's courtesy check to
    come): "valid" there must mean every node of the board installs it, and the reverse."""
    data = SIGNED[name]()
    tool, node = tool_outcome(data), node_outcome(data)
    assert tool == node, f"release verify: {tool}; the node: {node}"


@pytest.mark.parametrize("name", sorted(UNSIGNED))
def test_release_verify_and_the_node_give_the_same_reason_for_a_short_envelope(
        name: str) -> None:
    """The node refuses N < 86 as bad_envelope before the kid; the tool has no such minimum
    and says other_key or bad_signature: the counters and the reports disagree."""
    data = UNSIGNED[name]()
    tool, node = tool_outcome(data), node_outcome(data)
    assert tool == node, f"release verify: {tool}; the node: {node}"


def test_release_verify_reports_a_signed_manifest_with_non_text_boards_without_a_traceback(
        tmp_path: Path) -> None:
    (tmp_path / "k.pub.pem").write_bytes(KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "b.lub").write_bytes(signed(manifest({5: [7]})))
    rc = cli(["release", "verify", str(tmp_path / "b.lub"), "--pubkey",
              str(tmp_path / "k.pub.pem")])
    assert rc == release.REFUSED


# ---- paths that one flash file system sees as one file, or longer than documented -----------

@pytest.mark.parametrize("path", ["main.py\x00", "node/app\x00.mpy", "é" * 33, "main.py\n"],
                         ids=["NUL", "NUL inside", "66 bytes", "newline"])
def test_the_node_refuses_paths_outside_the_documented_rules(path: str) -> None:
    """MicroPython's open() stops at a NUL (open("main.py\\x00", "w") creates main.py), so
    "main.py" and "main.py\\x00" pass the duplicate check and are one file to an installer.
    docs/protocol.md: at most 64 bytes; the node counts characters."""
    files = ["main.py", 9, H, path, 9, H] if "\x00" in path else [path, 9, H]
    data = signed(manifest({7: files}), files=BODY * (len(files) // 3))
    node = node_outcome(data)
    assert node == "bad_manifest", f"the node: {node} for a manifest listing {files[::3]!r}"


# ---- the same bytes on the MicroPython unix port --------------------------------------------

MP_SCRIPT = """
import os, sys
from node import update
v = update.Verifier(bytes.fromhex(sys.argv[2]), "unix-sim", floor=0, mpy=(6, 3))
for name in sorted(os.listdir(sys.argv[1])):
    with open(sys.argv[1] + "/" + name, "rb") as f:
        try:
            v.check_stream(f)
            r = "ok"
        except update.Refused as e:
            r = e.reason
        except Exception as e:
            r = "CRASH:" + type(e).__name__
    print("RESULT", name, r)
"""


def cpython_node(data: bytes) -> str:
    try:
        return node_outcome(data)
    except Exception as e:  # recorded, compared, asserted absent below
        return "CRASH:" + type(e).__name__


@pytest.mark.micropython
def test_the_node_on_micropython_gives_cpythons_outcome_and_never_crashes(
        tmp_path: Path) -> None:
    corpus = {n.replace(" ", "_").replace("/", "_"): f() for n, f in {**SIGNED, **UNSIGNED}.items()}
    corpus["mpy_minor_str"] = signed(manifest({6: [6, "3"]}))
    corpus["mpy_minor_null"] = signed(manifest({6: [6, None]}))
    d = tmp_path / "bundles"
    d.mkdir()
    for name, data in corpus.items():
        (d / name).write_bytes(data)
    (tmp_path / "run.py").write_text(MP_SCRIPT)
    p = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(tmp_path / "run.py"),
                        str(d), PUB.hex()], env={"MICROPYPATH": f"{ROOT / 'firmware'}:{MP_EXTMOD}"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = {f[1]: f[2] for f in (line.split() for line in p.stdout.splitlines())
           if f[0] == "RESULT"}
    assert got == {name: cpython_node(data) for name, data in corpus.items()}
    assert not {n: r for n, r in got.items() if r.startswith("CRASH")}


# ---- the command line's files ----------------------------------------------------------------

def test_keygen_does_not_write_through_a_symlink_at_the_public_key_path(tmp_path: Path) -> None:
    """`keygen` "never overwrites either file": Path.exists() follows a dangling symlink, and
    write_bytes then creates (or, in a race, overwrites) the file it points to."""
    elsewhere = tmp_path / "someone-else" / "victim"
    elsewhere.parent.mkdir()
    (tmp_path / "rk.pub.pem").symlink_to(elsewhere)
    rc = cli(["release", "keygen", "--out", str(tmp_path / "rk")])
    assert not elsewhere.exists(), f"keygen exited {rc} and wrote {elsewhere}"


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("review3")
    assert cli(["release", "keygen", "--out", str(d / "rk")]) == release.OK
    return d / "rk"


def test_build_does_not_write_through_a_symlink_at_out(key_pair: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "someone-else" / "victim"
    elsewhere.parent.mkdir()
    (tmp_path / "fw.lub").symlink_to(elsewhere)
    rc = cli(["release", "build", "--key", f"{key_pair}.pem", "--version", "1.0.0", "--out",
              str(tmp_path / "fw.lub"), "--board", "unix-sim"])
    assert not elsewhere.exists(), f"build exited {rc} and wrote {elsewhere}"


def test_build_does_not_quietly_sign_with_a_key_others_can_read(
        key_pair: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The release key is the whole update trust: a world-readable copy (cp without -p, a
    shared folder) should be refused or at least named, as ssh does for its keys."""
    key = tmp_path / "copy.pem"
    key.write_bytes(Path(f"{key_pair}.pem").read_bytes())
    os.chmod(key, 0o644)
    assert stat.S_IMODE(key.stat().st_mode) & 0o077
    capsys.readouterr()
    rc = cli(["release", "build", "--key", str(key), "--version", "1.0.0", "--out",
              str(tmp_path / "fw.lub"), "--board", "unix-sim"])
    err = capsys.readouterr().err
    assert rc != release.OK or str(key) in err, "signed with a group/world-readable key, silently"


def test_verify_with_the_private_key_as_pubkey_is_a_usage_error_that_shows_no_key(
        key_pair: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Held: the private PEM is not taken as a public key, and its bytes are not echoed."""
    bundle = signed(manifest())
    (tmp_path / "b.lub").write_bytes(bundle)
    capsys.readouterr()
    assert cli(["release", "verify", str(tmp_path / "b.lub"), "--pubkey",
                f"{key_pair}.pem"]) == release.USAGE
    out = capsys.readouterr()
    secret = Path(f"{key_pair}.pem").read_text().splitlines()[1]
    assert secret not in out.err + out.out


def test_refusals_of_a_man_in_the_middle_need_no_signature_arithmetic(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Held: a wrong kid and a broken layout are refused before Ed25519 runs (cheap to refuse,
    so a flood of junk costs the node little); a forged kid costs one verification."""
    calls = []
    real = ed25519.verify

    def counting(*a: Any) -> bool:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(ed25519, "verify", counting)
    assert node_outcome(signed(manifest(), key=OTHER)) == "other_key"
    assert node_outcome(wrap(small_envelope(0, update.key_id(PUB)))) == "bad_envelope"
    assert not calls
    b = bytearray(signed(manifest(), key=OTHER))
    b[16:24] = update.key_id(PUB)
    assert node_outcome(bytes(b)) == "bad_signature" and len(calls) == 1


def test_seeded_fuzz_release_verify_and_the_node_agree_on_mutated_bundles() -> None:
    """Held: what a man in the middle can do to a genuine bundle (and to another key's): bit
    flips, cuts, insertions, deletions, a rewritten N. Same reason from both, never a crash."""
    rng = random.Random(16)
    files = [("node/app.mpy", bytes(range(200))), ("main.py", BODY)]
    sources = [release.bundle(k, "2.0.0", 2, "0.1.0", ["unix-sim"], MPY, files)
               for k in (KEY, OTHER)]
    seen = set()
    for _ in range(400):
        d = bytearray(rng.choice(sources))
        op = rng.randrange(5)
        j = rng.randrange(len(d))
        if op == 0:
            d[j] ^= 1 << rng.randrange(8)
        elif op == 1:
            del d[j:]
        elif op == 2:
            d[j:j] = rng.randbytes(rng.randrange(1, 4))
        elif op == 3:
            del d[j:j + rng.randrange(1, 4)]
        else:
            d[4:8] = rng.randrange(0, 400).to_bytes(4, "big")
        tool, node = tool_outcome(bytes(d)), node_outcome(bytes(d))
        assert tool == node, (op, j, tool, node)
        seen.add(node)
    assert {"bad_signature", "bad_hash", "truncated", "bad_envelope", "other_key"} <= seen
