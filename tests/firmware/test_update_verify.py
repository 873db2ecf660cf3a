"""node/update.py: the node's own check of an update bundle, on CPython and on MicroPython.

Bundles are made by the release tool (tools/field/release.py, with `cryptography`); the node
checks them with its own Ed25519 against the release key it was provisioned with. Every
refusal comes back as update.Refused with its reason, and is counted.
"""

import io
import subprocess
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from node import update

from lantern.tools.field import release

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"

pytestmark = pytest.mark.ota

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key().public_bytes_raw()
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
MPY = (6, 3)  # the unix port's (MicroPython 1.25)
FILES = [("node/app.mpy", b"M\x06\x00\x1f" + bytes(range(200))), ("main.py", b"import x\n"),
         ("boards/unix-sim.json", b'{"name": "unix-sim"}\n')]


def make(key=KEY, version="2.0.0", floor=2, boards=("unix-sim", "esp32-devkitc"), mpy=MPY,
         files=FILES):  # type: ignore[no-untyped-def]
    return release.bundle(key, version, floor, "0.1.0", list(boards), mpy, list(files))


def verifier(floor=2, board="unix-sim"):  # type: ignore[no-untyped-def]
    return update.Verifier(PUB, board, floor=floor, mpy=MPY)


def refusal(v: update.Verifier, data: bytes) -> str:
    with pytest.raises(update.Refused) as e:
        v.check_stream(io.BytesIO(data))
    return e.value.reason


def forged_kid() -> bytes:
    """Another key's bundle wearing the release key's kid."""
    b = bytearray(make(key=OTHER, version="6.6.6"))
    b[16:24] = update.key_id(PUB)
    return bytes(b)


def signed_manifest(m: dict) -> bytes:  # type: ignore[type-arg]
    """A bundle whose manifest the release key did sign, though it is malformed."""
    env = release.sign1(KEY, cbor2.dumps(m, canonical=True))
    return update.MAGIC + len(env).to_bytes(4, "big") + env


def test_a_valid_bundle_gives_its_manifest() -> None:
    v = verifier()
    data = make()
    man = v.check_stream(io.BytesIO(data))
    assert (man.version, man.floor, man.min_gateway) == ("2.0.0", 2, "0.1.0")
    assert man.boards == ["unix-sim", "esp32-devkitc"] and man.mpy == MPY
    assert [f[0] for f in man.files] == [p for p, _ in FILES]
    assert man.size == len(data)
    for i, (_, content) in enumerate(FILES):
        assert data[man.offset(i):man.offset(i) + len(content)] == content
        v.check_file(man, i, content)
    assert not any(v.refused.values())


# reason: a bundle a node at floor 2 on a unix-sim board refuses for it
CASES = {
    "other_key": lambda: make(key=OTHER),
    "bad_signature": forged_kid,
    "below_floor": lambda: make(floor=1, version="1.9.0"),
    "other_board": lambda: make(boards=("esp32-devkitc",)),
    "other_mpy": lambda: make(mpy=(6, 1)),
    "bad_hash": lambda: make()[:-1] + b"\x0b",
    "truncated": lambda: make()[:-5],
    "bad_size": lambda: make() + b"\n",
    "not_bundle": lambda: b"\x7fELF" + make()[4:],
    "bad_envelope": lambda: make()[:4] + b"\x00\x01\x00\x00" + make()[8:],
    "bad_manifest": lambda: signed_manifest({1: 1, 2: "2.0.0", 3: 2, 4: "0.1.0",
                                             5: ["unix-sim"], 6: [6, 3],
                                             7: ["../boot.py", 1, bytes(32)]}),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_refused_and_counted(reason: str) -> None:
    v = verifier()
    assert refusal(v, CASES[reason]()) == reason
    assert v.refused[reason] == 1 and sum(v.refused.values()) == 1


def test_the_floor_itself_is_accepted_and_the_reason_says_why_lower_is_not() -> None:
    assert verifier(floor=2).check_stream(io.BytesIO(make(floor=2))).floor == 2
    with pytest.raises(update.Refused) as e:
        verifier(floor=3).check_stream(io.BytesIO(make(floor=2)))
    assert "security floor 2, node is at 3" in str(e.value)


def test_a_file_of_the_wrong_size_or_content_is_refused_on_its_own() -> None:
    v = verifier()
    man = v.manifest(make())
    with pytest.raises(update.Refused, match="bad_size"):
        v.check_file(man, 1, b"import x\n\n")
    with pytest.raises(update.Refused, match="bad_hash"):
        v.check_file(man, 1, b"import y\n")
    assert v.refused["bad_size"] == v.refused["bad_hash"] == 1


def test_no_single_flipped_byte_anywhere_is_accepted() -> None:
    """Every byte of a small bundle, flipped in turn: each one refused, none crashes."""
    data = make(files=[("main.py", b"print(1)\n")], boards=("unix-sim",))
    v = verifier()
    for i in range(len(data)):
        refusal(v, data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:])
    assert sum(v.refused.values()) == len(data)
    assert v.refused["bad_signature"] > 0 and v.refused["bad_hash"] > 0


SCRIPT = """
import os, sys
from node import update
v = update.Verifier(bytes.fromhex(sys.argv[2]), "unix-sim", floor=2)
for name in sorted(os.listdir(sys.argv[1])):
    with open(sys.argv[1] + "/" + name, "rb") as f:
        try:
            m = v.check_stream(f)
            print("RESULT", name, "ok", m.version, len(m.files))
        except update.Refused as e:
            print("RESULT", name, e.reason)
print("COUNTS", sorted((k, n) for k, n in v.refused.items() if n))
"""


@pytest.mark.micropython
def test_the_node_refuses_the_same_bundles_on_micropython(tmp_path: Path) -> None:
    d = tmp_path / "bundles"
    d.mkdir()
    (d / "valid").write_bytes(make())
    (d / "flipped").write_bytes(make()[:-30] + bytes([make()[-30] ^ 1]) + make()[-29:])
    for reason, data in CASES.items():
        (d / reason).write_bytes(data())
    (tmp_path / "run.py").write_text(SCRIPT)
    out = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(tmp_path / "run.py"),
                          str(d), PUB.hex()], env={"MICROPYPATH": MP_PATH},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    results = {f[1]: f[2:] for f in (line.split() for line in out.splitlines())
               if f[0] == "RESULT"}
    assert results.pop("valid") == ["ok", "2.0.0", "3"]
    assert results.pop("flipped") == ["bad_hash"]
    assert results == {reason: [reason] for reason in CASES}
    counts = dict.fromkeys(CASES, 1)
    counts["bad_hash"] = 2
    assert f"COUNTS {sorted(counts.items())}".replace("'", "") in out.replace("'", "")


# ---- rotating the release key (Verifier.rotation; node/ota.py keeps the pending key) ------

NEW = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
NEW_PUB = NEW.public_key().public_bytes_raw()


def rotation_refusal(record: bytes) -> str:
    v = verifier()
    with pytest.raises(update.Refused) as e:
        v.rotation(record)
    assert v.refused[e.value.reason] == 1
    return e.value.reason


def test_a_rotation_signed_by_the_release_key_carries_the_new_key() -> None:
    assert verifier().rotation(release.rotation(KEY, NEW.public_key())) == NEW_PUB


@pytest.mark.parametrize(("make_record", "reason"), [
    (lambda: release.rotation(OTHER, NEW.public_key()), "other_key"),
    (lambda: release.rotation(NEW, OTHER.public_key()), "other_key"),
    (lambda: release.sign1(KEY, cbor2.dumps({1: 2, 2: NEW_PUB, 3: bytes(8)}, canonical=True)),
     "bad_rotation"),  # a kid that is not the key's
    (lambda: release.sign1(KEY, cbor2.dumps({1: 1, 2: NEW_PUB, 3: update.key_id(NEW_PUB)},
                                            canonical=True)), "bad_rotation"),
    (lambda: release.sign1(KEY, cbor2.dumps({1: 2, 2: bytes(32), 3: update.key_id(bytes(32))},
                                            canonical=True)), "bad_rotation"),  # small order
    (lambda: release.sign1(KEY, cbor2.dumps({1: 2, 2: PUB, 3: update.key_id(PUB)},
                                            canonical=True)), "bad_rotation"),  # the same key
    (lambda: signed_manifest({1: 1})[8:], "bad_rotation"),  # a manifest is no rotation
    (lambda: make()[8:8 + int.from_bytes(make()[4:8], "big")], "bad_rotation"),
], ids=["other key", "signed by the new key", "wrong kid", "format 1", "small order",
        "same key", "malformed manifest", "a real manifest"])
def test_the_node_refuses_rotations_the_release_key_did_not_sign_as_rotations(
        make_record, reason) -> None:  # type: ignore[no-untyped-def]
    assert rotation_refusal(make_record()) == reason


def test_a_record_of_a_rotation_is_no_bundle_manifest() -> None:
    env = release.rotation(KEY, NEW.public_key())
    data = update.MAGIC + len(env).to_bytes(4, "big") + env
    assert refusal(verifier(floor=0), data) == "bad_manifest"


def test_with_a_pending_key_bundles_of_both_keys_verify_and_say_which_signed() -> None:
    v = update.Verifier(PUB, "unix-sim", floor=0, mpy=MPY, next_key=NEW_PUB)
    v.check_stream(io.BytesIO(make()))
    assert v.signer == update.key_id(PUB)
    v.check_stream(io.BytesIO(make(key=NEW)))
    assert v.signer == v.next_kid == update.key_id(NEW_PUB)
    assert refusal(v, make(key=OTHER)) == "other_key"
    # a rotation must be signed by the current key, never by the pending one
    with pytest.raises(update.Refused) as e:
        v.rotation(release.rotation(NEW, OTHER.public_key()))
    assert e.value.reason == "other_key"
