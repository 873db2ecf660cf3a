"""The security floor and the release key in NVS (hal/esp32.py, node/ota.py) on the ESP32 twin:
erasing or rewriting the filesystem lowers neither the floor nor swaps the key back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.tools.field import release

from .twin import BOARD, TwinNode

pytestmark = pytest.mark.ota

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NEW = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUB = KEY.public_key().public_bytes_raw()
NEW_PUB = NEW.public_key().public_bytes_raw()

# the node's Updater with the esp32 HAL, as NodeActions.updater() makes it
SETUP = ("import json, os, sys\nfrom node.hal import esp32 as hal\nfrom node import ota\n"
         "cfg = json.load(open('node.json'))\n"
         "u = ota.Updater(cfg, 'esp32-devkitc', 'node.json', hal)\nfw = ota.fw_dir(cfg)\n")


@pytest.fixture
def board(tmp_path: Path, micropython: Path) -> TwinNode:
    node = TwinNode("SL-0001", tmp_path)
    node.write_config()
    return node


def head(key: Ed25519PrivateKey, version: str, floor: int) -> bytes:
    b = release.bundle(key, version, floor, "0.1.0", [BOARD], (6, 3),
                       [("main.py", b"print('hi')\n")])
    return b[:8 + int.from_bytes(b[4:8], "big")]


def offer(board: TwinNode, data: bytes) -> str:
    return board.exec(SETUP + "try:\n"
                      f"    print('ok', u.offer(bytes.fromhex('{data.hex()}')))\n"
                      "except ValueError as e:\n    print('refused', e.reason)\n")


def test_the_floor_a_release_confirms_outlives_an_erased_filesystem(board: TwinNode) -> None:
    (board.flash / "release.pub").write_bytes(PUB)
    out = board.exec(SETUP + "from node.outbox import _makedirs\n_makedirs(fw)\n"
                     "ota.write_record(fw, {'cand': 'a', 'cver': '2.0.0', 'cfloor': 3})\n"
                     "print('confirmed', ota.confirm(fw, hal), ota.read_floor(fw, hal))\n")
    assert "confirmed True 3" in out, out
    assert board.nvs_i32("ota_floor") == 3
    fw = board.flash / json.loads((board.flash / "node.json").read_text())["state_dir"] / "fw"
    assert (fw / "floor").read_text() == "3"
    # the filesystem erased (a reflash, `mpremote rm`), or a lower floor written into it
    shutil.rmtree(fw)
    assert "floor 3" in board.exec(SETUP + "print('floor', ota.read_floor(fw, hal))\n")
    fw.mkdir(parents=True, exist_ok=True)
    (fw / "floor").write_text("1")
    assert "floor 3" in board.exec(SETUP + "print('floor', ota.read_floor(fw, hal))\n")
    # so a release signed at floor 2, replayed, stays refused
    assert "refused below_floor" in offer(board, head(KEY, "1.0.0", 2))
    assert "ok (0, 12)" in offer(board, head(KEY, "3.0.0", 3))


def test_the_release_key_and_its_rotation_live_in_nvs(board: TwinNode) -> None:
    (board.flash / "release.pub").write_bytes(PUB)
    assert "ok" in offer(board, head(KEY, "2.0.0", 0))
    assert board.nvs("lantern", "rel_key") == b"b" + PUB  # adopted into NVS at its first use
    # the file rewritten with another key (or erased) does not replace the provisioned one
    (board.flash / "release.pub").write_bytes(NEW_PUB)
    assert "refused other_key" in offer(board, head(NEW, "2.0.1", 0))
    (board.flash / "release.pub").unlink()
    assert "ok" in offer(board, head(KEY, "2.0.2", 0))
    # a rotation keeps the next key in NVS; a bundle of the new key makes it the release key
    record = release.rotation(KEY, NEW.public_key())
    out = board.exec(SETUP + f"print('kid', u.rotate(bytes.fromhex('{record.hex()}')).hex())\n")
    assert f"kid {release.key_id(NEW.public_key()).hex()}" in out, out
    assert board.nvs("lantern", "rel_next") == b"b" + NEW_PUB
    assert "ok" in offer(board, head(NEW, "2.1.0", 0))
    assert board.nvs("lantern", "rel_key") == b"b" + NEW_PUB
    assert board.nvs("lantern", "rel_next") is None
    assert (board.flash / "release.pub").read_bytes() == NEW_PUB
    assert "refused other_key" in offer(board, head(KEY, "2.2.0", 0))
