"""`lantern release build --image`: a bundle that carries an ESP32 app image as a manifest entry
of kind "image" (`image/app.bin`, with its size and SHA-256), for ESP32 boards only; the node's
rules (node/update.py) and `release verify` agree on it (docs/updates.md)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent.cli import main as cli
from lantern.tools.field import release

pytestmark = pytest.mark.ota

# an app image: image header (24 bytes), first segment header (8), esp_app_desc_t's magic
HEAD = b"\xe9\x05\x02\x20" + bytes(28)
IMAGE = HEAD + (0xABCD5432).to_bytes(4, "little") + random.Random(16).randbytes(40_000)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    assert cli(["release", "keygen", "--out", str(tmp_path / "rk")]) == 0
    (tmp_path / "app.bin").write_bytes(IMAGE)
    return tmp_path


def test_build_carries_the_image_as_a_signed_entry_for_the_esp32_boards(
        keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = keys / "img.lub"
    assert cli(["release", "build", "--key", str(keys / "rk.pem"), "--version", "3.0.0",
                "--out", str(out), "--image", str(keys / "app.bin")]) == 0
    man, files = release.open_bundle(out.read_bytes(), release.load_public(keys / "rk.pub.pem"))
    assert man.boards and all(b.startswith("esp32") for b in man.boards)  # the default
    assert man.files[0] == release.FileEntry(release.IMAGE_PATH, len(IMAGE),
                                             hashlib.sha256(IMAGE).digest())
    assert files[0] == IMAGE
    assert "node/ota.mpy" in [f.path for f in man.files]  # the modules come as well
    capsys.readouterr()
    assert cli(["release", "verify", str(out), "--pubkey", str(keys / "rk.pub.pem")]) == 0
    assert "valid: release 3.0.0" in capsys.readouterr().out


@pytest.mark.parametrize(("board", "image", "says"), [
    ("unix-sim", IMAGE, "ESP32 boards only"),
    ("esp32-devkitc", b"\x00" + IMAGE[1:], "not an ESP32 app image"),
    ("esp32-devkitc", b"", "not an ESP32 app image"),
    # the bootloader (an image too, 0xE9 first, no app description), a magic on the wrong end
    # or one byte off, a file that ends before it
    ("esp32-devkitc", HEAD + bytes(4) + IMAGE[36:], "not the bootloader or a whole-flash dump"),
    ("esp32-devkitc", HEAD + (0xABCD5432).to_bytes(4, "big") + IMAGE[36:], "offset 32"),
    ("esp32-devkitc", HEAD[:-1] + IMAGE[32:], "offset 32"),
    ("esp32-devkitc", IMAGE[:34], "offset 32"),
], ids=["other-board", "no-0xE9", "empty", "bootloader", "big-endian", "off-by-one",
        "short"])
def test_build_refuses_an_image_for_other_boards_or_that_is_no_app_image(
        keys: Path, capsys: pytest.CaptureFixture[str], board: str, image: bytes,
        says: str) -> None:
    (keys / "app.bin").write_bytes(image)
    out = keys / "img.lub"
    capsys.readouterr()
    assert cli(["release", "build", "--key", str(keys / "rk.pem"), "--version", "3.0.0",
                "--out", str(out), "--board", board, "--image", str(keys / "app.bin")]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("manifest", [
    # two images; an image for a board that is not an ESP32 one
    {"boards": ["esp32-devkitc"], "paths": ["image/app.bin", "image/b.bin"]},
    {"boards": ["esp32-devkitc", "unix-sim"], "paths": ["image/app.bin"]},
    {"boards": ["esp32-devkitc"], "paths": ["image/app.txt"]},
])
def test_the_node_and_release_verify_refuse_a_signed_manifest_breaking_the_image_rules(
        manifest: dict[str, list[str]]) -> None:
    """A release author's mistake, signed: the node's own rules (update._scan) refuse it, so
    `release verify` (the same rules) does too."""
    key = Ed25519PrivateKey.generate()
    files = [(p, IMAGE) for p in manifest["paths"]]
    with pytest.raises(release.ReleaseError, match=r"a node would refuse|file path"):
        release.bundle(key, "3.0.0", 0, "0.1.0", manifest["boards"], (6, 3), files)
