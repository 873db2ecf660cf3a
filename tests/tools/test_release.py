"""`lantern release`: keys, a bundle of the real firmware tree, verify and its refusals.

The bundle's COSE_Sign1 is also checked by pycose (an independent COSE implementation) from
the PEM public key, and docs/protocol.md's update bundle vector is built again byte for byte.
"""

import hashlib
import re
import stat
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from node import cbor as node_cbor
from pycose.algorithms import EdDSA
from pycose.headers import KID, Algorithm
from pycose.keys import CoseKey
from pycose.messages import CoseMessage, Sign1Message

import lantern
from lantern.agent.cli import main as cli
from lantern.tools.field import provision_steps as ps
from lantern.tools.field import release

pytestmark = pytest.mark.ota

RFC8032_TEST1 = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """keygen, then build for two boards: (bundle, private key, public key)."""
    d = tmp_path_factory.mktemp("release")
    assert cli(["release", "keygen", "--out", str(d / "rk")]) == 0
    out = d / "fw.lub"
    assert cli(["release", "build", "--key", str(d / "rk.pem"), "--version", "1.2.0",
                "--out", str(out), "--board", "unix-sim", "--board", "esp32-devkitc",
                "--security-floor", "3", "--min-gateway", "0.1.0"]) == 0
    return out, d / "rk.pem", d / "rk.pub.pem"


def test_keygen_writes_a_pkcs8_key_only_its_owner_reads_and_never_overwrites(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["release", "keygen", "--out", str(tmp_path / "k")]) == 0
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(priv.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    assert release.load_public(pub).public_bytes_raw() == key.public_key().public_bytes_raw()
    before = priv.read_bytes()
    capsys.readouterr()
    assert cli(["release", "keygen", "--out", str(tmp_path / "k")]) == release.USAGE
    assert "exists" in capsys.readouterr().err
    assert priv.read_bytes() == before


def test_build_holds_the_firmware_compiled_for_mpy_cross_and_the_board_files(
        built: tuple[Path, Path, Path]) -> None:
    bundle, _, pub = built
    man, files = release.open_bundle(bundle.read_bytes(), release.load_public(pub))
    found = ps.mpy_cross_version(ps.find_mpy_cross())
    assert found is not None
    assert (man.version, man.floor, man.min_gateway) == ("1.2.0", 3, "0.1.0")
    assert man.boards == ("esp32-devkitc", "unix-sim") and man.mpy == found[1]
    paths = [f.path for f in man.files]
    modules = [s.relative_to(lantern.FIRMWARE).with_suffix(".mpy").as_posix()
               for s in ps.firmware_sources(lantern.FIRMWARE)]
    assert paths == [*modules, "main.py", "boards/esp32-devkitc.json", "boards/unix-sim.json"]
    assert "node/update.mpy" in paths and "node/ed25519.mpy" in paths
    for f, data in zip(man.files, files, strict=True):
        assert f.size == len(data) and f.sha256 == hashlib.sha256(data).digest()
        if f.path.endswith(".mpy"):
            assert data[0] == ord("M") and data[1] == found[1][0]  # .mpy header, version
    assert files[-1] == (lantern.BOARDS / "unix-sim.json").read_bytes()


def test_verify_exits_0_for_a_valid_bundle(built: tuple[Path, Path, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bundle, _, pub = built
    assert cli(["release", "verify", str(bundle), "--pubkey", str(pub)]) == 0
    assert "valid: release 1.2.0 (security floor 3)" in capsys.readouterr().out


def _flip(at: int):  # type: ignore[no-untyped-def]
    def f(b: bytes) -> bytes:
        i = at if at >= 0 else len(b) + at
        return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]
    return f


def _env_len(b: bytes) -> int:
    return int.from_bytes(b[4:8], "big")


BROKEN = {
    "not_bundle": lambda b: b"PK\x03\x04" + b[4:],
    "truncated": lambda b: b[:-1],
    "truncated-envelope": lambda b: b[:100],
    "bad_envelope": _flip(8),  # the tag
    "bad_envelope-length": lambda b: b[:4] + (_env_len(b) + 1).to_bytes(4, "big") + b[8:],
    "other_key": _flip(17),  # a kid byte
    "bad_signature": _flip(30),  # a manifest byte
    "bad_signature-sig": lambda b: _flip(8 + _env_len(b) - 1)(b),  # the signature's last byte
    "bad_hash": _flip(-1),  # the last board file
    "bad_size": lambda b: b + b"\x00",
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_verify_refuses_a_broken_bundle_with_the_reason_on_one_line(
        case: str, built: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bundle, _, pub = built
    bad = tmp_path / "bad.lub"
    bad.write_bytes(BROKEN[case](bundle.read_bytes()))
    capsys.readouterr()
    assert cli(["release", "verify", str(bad), "--pubkey", str(pub)]) == release.REFUSED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"refused: {case.split('-')[0]}:" in err


def test_verify_refuses_a_bundle_signed_by_another_key(
        built: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bundle, _, _ = built
    assert cli(["release", "keygen", "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert cli(["release", "verify", str(bundle), "--pubkey",
                str(tmp_path / "other.pub.pem")]) == release.REFUSED
    assert "refused: other_key: signed by key" in capsys.readouterr().err


def test_a_forged_signature_under_the_right_kid_is_refused() -> None:
    """An attacker who copies the release key's kid still needs its signature."""
    real, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    files = [("main.py", b"import os\n")]
    good = release.bundle(real, "1.0.0", 0, "0.1.0", ["unix-sim"], (6, 3), files)
    forged = bytearray(release.bundle(forger, "6.6.6", 9, "0.1.0", ["unix-sim"], (6, 3), files))
    forged[16:24] = good[16:24]  # the kid
    with pytest.raises(release.BundleRefused) as e:
        release.open_bundle(bytes(forged), real.public_key())
    assert e.value.reason == "bad_signature"


def test_verify_reports_an_unreadable_key_as_a_usage_error(
        built: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bundle, priv, _ = built
    assert cli(["release", "verify", str(bundle), "--pubkey", str(bundle)]) == release.USAGE
    assert "not a readable PEM public key" in capsys.readouterr().err
    out = bundle.parent / "again.lub"
    assert cli(["release", "build", "--key", str(bundle), "--version", "1", "--out",
                str(out)]) == release.USAGE
    assert cli(["release", "build", "--key", str(priv), "--version", "1", "--out",
                str(bundle)]) == release.USAGE  # never overwrites a bundle
    assert "exists" in capsys.readouterr().err


def test_pycose_verifies_the_bundle_signature_from_the_pem_public_key(
        built: tuple[Path, Path, Path]) -> None:
    bundle, _, pub = built
    data = bundle.read_bytes()
    envelope = data[8:8 + _env_len(data)]
    msg = CoseMessage.decode(envelope)
    msg.key = CoseKey.from_pem_public_key(pub.read_text())
    assert msg.verify_signature()
    assert isinstance(msg, Sign1Message)
    assert msg.phdr == {Algorithm: EdDSA, KID: release.key_id(release.load_public(pub))}
    tampered = bytearray(envelope)
    tampered[40] ^= 1
    other = CoseMessage.decode(bytes(tampered))
    other.key = msg.key
    assert not other.verify_signature()


def test_the_manifest_is_deterministic_cbor_as_the_node_encodes_it(
        built: tuple[Path, Path, Path]) -> None:
    bundle, _, pub = built
    man, _ = release.open_bundle(bundle.read_bytes(), release.load_public(pub))
    raw = man.encode()
    assert node_cbor.dumps(cbor2.loads(raw)) == raw  # RFC 8949 §4.2.1, both encoders


def test_the_update_bundle_vector_in_protocol_md() -> None:
    doc = (lantern.CHECKOUT / "docs/protocol.md").read_text()  # type: ignore[operator]
    block = re.search(r"<!-- update-bundle-vector -->\n```\n([0-9a-f\n]+)```", doc)
    assert block is not None
    key = Ed25519PrivateKey.from_private_bytes(RFC8032_TEST1)
    made = release.bundle(key, "1.0.0", 1, "0.1.0", ["unix-sim"], (6, 3),
                          [("main.py", b"print('hi')\n")])
    assert made.hex() == block.group(1).replace("\n", "")
    assert release.key_id(key.public_key()).hex() == "21fe31dfa154a261"
    man, files = release.open_bundle(made, key.public_key())
    assert files == [b"print('hi')\n"] and man.boards == ("unix-sim",)


def test_rotate_writes_a_record_the_current_key_signs_for_the_new_one(
        built: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, priv, pub = built
    assert cli(["release", "keygen", "--out", str(tmp_path / "next")]) == 0
    new_pem = tmp_path / "next.pub.pem"
    out = tmp_path / "rotate.cose"
    assert cli(["release", "rotate", "--key", str(priv), "--new", str(new_pem), "--out",
                str(out)]) == release.OK
    new = release.load_public(new_pem)
    assert release.key_id(new).hex() in capsys.readouterr().out
    # an independent COSE library verifies it under the current key, and reads the new one
    msg = CoseMessage.decode(out.read_bytes())
    msg.key = CoseKey.from_pem_public_key(pub.read_text())
    assert isinstance(msg, Sign1Message) and msg.verify_signature()
    assert cbor2.loads(msg.payload) == {1: 2, 2: new.public_bytes_raw(), 3: release.key_id(new)}
    # never over a file, never to the current key itself
    assert cli(["release", "rotate", "--key", str(priv), "--new", str(new_pem), "--out",
                str(out)]) == release.USAGE
    assert cli(["release", "rotate", "--key", str(priv), "--new", str(pub), "--out",
                str(tmp_path / "same.cose")]) == release.USAGE
    assert "current key" in capsys.readouterr().err
    assert not (tmp_path / "same.cose").exists()
