"""Whole-firmware images through esp32.Partition (hal/esp32.py Image, image_confirm) on the
ESP32 twin, whose Partition model is checked against the stubs (test_stubs.py) and keeps
NOR flash's rule (a write only clears bits) and the bootloader's app rollback.

What this shows is the HAL's part: an image written in chunks across blocks (and over an
older image), resumed after a power cut, read back byte for byte, booted on trial, kept once
confirmed and left by the bootloader when it is not. The twin runs the same MicroPython
whatever partition it "boots": that the new image itself runs is not shown here.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from .twin import TwinNode

pytestmark = pytest.mark.ota

HAL = "from node.hal import esp32 as hal\n"
CHUNK = 768  # node/ota.py CHUNK_MAX: what one CHUNK carries


@pytest.fixture
def board(tmp_path: Path, micropython: Path) -> TwinNode:
    node = TwinNode("SL-0001", tmp_path)
    node.write_config()
    return node


def image(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write(board: TwinNode, data: bytes, start: int = 0) -> str:
    """Write data[start:] into the next update partition in CHUNK pieces, as chunks arrive."""
    (board.flash / "img.bin").write_bytes(data)
    return board.exec(HAL + "img = hal.Image()\nf = open('img.bin', 'rb')\n"
                      f"at = {start}\nf.seek(at)\n"
                      "while True:\n"
                      f"    b = f.read({CHUNK})\n"
                      "    if not b:\n        break\n"
                      "    img.write(at, b)\n    at += len(b)\n"
                      "print('wrote', img.label, at)\n")


def digest(board: TwinNode, size: int) -> str:
    out = board.exec(HAL + "import hashlib\nimg = hal.Image()\nh = hashlib.sha256()\n"
                     "buf = bytearray(512)\nat = 0\n"
                     f"while at < {size}:\n"
                     f"    n = min(512, {size} - at)\n"
                     "    img.readinto(at, memoryview(buf)[:n])\n"
                     "    h.update(memoryview(buf)[:n])\n    at += n\n"
                     "print('sha', ''.join('%02x' % c for c in h.digest()))\n")
    return out.split("sha ")[1].split()[0] if "sha " in out else out


def running(board: TwinNode, code: str = "") -> str:
    """The partition this boot runs from (after running code)."""
    out = board.exec(HAL + code + "print('running', hal.image_running())\n")
    return out.split("running ")[1].split()[0]


def test_an_image_written_in_chunks_reads_back_whole_even_over_an_older_one(
        board: TwinNode) -> None:
    old, new = image(1, 40_000), image(2, 50_001)
    assert "wrote ota_1 40000" in write(board, old)
    assert digest(board, len(old)) == hashlib.sha256(old).hexdigest()
    # a second image over the first: every block is erased as the writing enters it
    assert "wrote ota_1 50001" in write(board, new)
    assert digest(board, len(new)) == hashlib.sha256(new).hexdigest()


def test_writing_without_an_erase_is_caught_by_the_model(board: TwinNode) -> None:
    """The model is NOR flash: the same bytes written without the erase read back wrong (so
    the test above would fail if Image.write skipped its erase)."""
    write(board, image(1, 8192))
    out = board.exec(HAL + "img = hal.Image()\n"
                     "img.part.writeblocks(0, b'\\x0f' * 16, 0)\nb = bytearray(16)\n"
                     "img.readinto(0, b)\nimg.part.writeblocks(0, b'\\xf0' * 16, 0)\n"
                     "img.readinto(0, b)\nprint('read', b[0])\n")
    assert "read 0" in out, out


def test_a_power_cut_mid_image_resumes_from_where_the_node_had_got(board: TwinNode) -> None:
    data = image(3, 30_000)
    cut = 11 * CHUNK  # a chunk boundary inside the third block
    write(board, data[:cut])  # the VM ends there: the power goes, the partition keeps it
    board.power_on()  # a fresh power-on (RTC memory cleared), not a reset
    assert "wrote ota_1 30000" in write(board, data, start=cut)
    assert digest(board, len(data)) == hashlib.sha256(data).hexdigest()


def test_a_new_image_boots_on_trial_and_the_bootloader_leaves_it_unless_confirmed(
        board: TwinNode) -> None:
    assert running(board) == "ota_0"
    write(board, image(4, 5000))
    board.exec(HAL + "hal.Image().boot()\n")
    assert running(board) == "ota_1"  # the next boot runs it, on trial
    assert running(board) == "ota_0"  # reset without a confirmation: rolled back
    write(board, image(5, 5000))
    board.exec(HAL + "hal.Image().boot()\n")
    assert running(board, "hal.image_confirm()\n") == "ota_1"
    assert running(board) == "ota_1"  # confirmed: kept through resets
    assert running(board) == "ota_1"
