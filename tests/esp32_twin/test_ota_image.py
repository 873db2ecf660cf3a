"""Whole-firmware images through a signed bundle on the ESP32 twin (docs/updates.md, "ESP32:
whole-firmware images"): node/ota.py stages the bundle's `image/app.bin` entry into the next OTA
partition through hal/esp32.py `Image`, APPLY sets it to boot, main.py's boot loader puts it on
trial, and it is confirmed (`mark_app_valid_cancel_rollback`) or left, by the node or by the
bootloader's own rollback. Each `board.exec` is one boot of the twin (its bootloader step runs
when `esp32` is first imported). A power cut is a boot that ends where the test stops it.

What the twin cannot show: that the new image itself runs (the twin runs the same MicroPython
whatever partition it "boots"), the real bootloader's rollback and flash timings.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.tools.field import release

from .twin import BOARD, TwinNode

pytestmark = pytest.mark.ota

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key().public_bytes_raw()
CHUNK = 768  # node/ota.py CHUNK_MAX

# the node's Updater with the esp32 HAL, as NodeActions.updater() makes it
SETUP = ("import json, os, sys\nfrom node.hal import esp32 as hal\nfrom node import ota\n"
         "cfg = json.load(open('node.json'))\n"
         "u = ota.Updater(cfg, 'esp32-devkitc', 'node.json', hal)\nfw = ota.fw_dir(cfg)\n")

# OFFER the head of bundle.lub, then CHUNK from where the node stands until `stop` bytes of
# the file area are staged (or all of them): what the gateway's transfer does
TRANSFER = SETUP + """
b = open('bundle.lub', 'rb')
head = b.read(8)
head += b.read(int.from_bytes(head[4:8], 'big'))
try:
    have, total = u.offer(head)
    print('offered', have, total)
    while have < min(total, STOP):
        b.seek(len(head) + have)
        have = u.chunk(have, b.read(min(CHUNK, STOP - have)))
    print('staged', have)
    if APPLY:
        print('applied', u.apply())
except ValueError as e:
    print('refused', e.reason, e)
print('refused', u.refused)
"""

# main.py's boot loader without its last line (boot()), then its choice for this boot
MAIN = ("src = open('main.py').read()\nexec(src[:src.rindex('\\nboot(')])\n"
        "fw, rec, slot, trial = choose('node.json')\n"
        "import esp32\nfrom node.hal import esp32 as hal\n"
        "print('boot', hal.image_running(), slot, trial, json.dumps(rec))\n")


def app_image(seed: int, size: int) -> bytes:
    return b"\xe9" + random.Random(seed).randbytes(size - 1)


@pytest.fixture
def board(tmp_path: Path, micropython: Path) -> TwinNode:
    node = TwinNode("SL-0001", tmp_path)
    node.write_config()
    (node.flash / "release.pub").write_bytes(PUB)
    return node


def put_bundle(board: TwinNode, img: bytes, version: str = "2.0.0",
               files: tuple[tuple[str, bytes], ...] = (("main.py", b"# slot\n"),)) -> bytes:
    data = release.bundle(KEY, version, 1, "0.1.0", [BOARD], (6, 3),
                          [(release.IMAGE_PATH, img), *files])
    (board.flash / "bundle.lub").write_bytes(data)
    return data


def transfer(board: TwinNode, stop: int = 1 << 30, apply: bool = False,
             before: str = "") -> str:
    return board.exec(before + TRANSFER.replace("STOP", str(stop)).replace("CHUNK", str(CHUNK))
                      .replace("APPLY", str(apply)))


class Boot(NamedTuple):
    running: str  # the app partition this boot runs
    slot: str | None  # the code slot main.py chose
    trial: bool
    rec: dict[str, Any]  # the boot record as main.py left it
    out: str  # the boot's console


def boot(board: TwinNode, after: str = "") -> Boot:
    """One boot through main.py's choice, then `after` in the same boot (the node's run)."""
    out = board.exec(MAIN + after)
    line = next((ln for ln in out.splitlines() if ln.startswith("boot ")), None)
    assert line is not None, out
    _, running, slot, trial, rec = line.split(" ", 4)
    return Boot(running, None if slot == "None" else slot, trial == "True", json.loads(rec), out)


CONFIRM = "from node import ota\nprint('confirmed', ota.confirm(fw, hal))\n"
# a failed trial as ota.trial ends it: roll_back, then the reset
ROLL_BACK = ("from node import ota\n"
             "ota.roll_back(fw, 'no_ack: no pack ACKed within 600 s', hal)\nota.reset(hal)\n")
# a power cut where `cut` is called: the VM ends at once, as the chip does
CUT = "import _twin\ndef cut(*a):\n    _twin.down(0)\n"


def boot_cut(board: TwinNode, patch: str, after: str = "") -> str:
    """One boot whose main.py (choose) runs with `patch` applied (CUT defined): its console."""
    return board.exec(MAIN.replace("fw, rec, slot", CUT + patch + "fw, rec, slot", 1) + after)


def record(board: TwinNode) -> dict[str, Any]:
    rec: dict[str, Any] = json.loads((board.state_dir / "fw" / "boot.json").read_text())
    return rec


def partition_sha(board: TwinNode, label: str, size: int) -> str:
    raw = (board.hw / f"part_{label}").read_bytes()
    return hashlib.sha256(raw[:size]).hexdigest()


def otadata(board: TwinNode) -> list[str]:
    return (board.hw / "otadata").read_text().split()


def staged(board: TwinNode, img: bytes) -> None:
    """An image bundle transferred whole and applied: the state before its first boot."""
    put_bundle(board, img)
    out = transfer(board, apply=True)
    assert "applied 2.0.0" in out, out
    assert otadata(board) == ["ota_1", "ota_0", "new"]


def test_an_image_entry_is_staged_into_the_next_partition_and_set_to_boot(
        board: TwinNode) -> None:
    """Transfer and switch: every byte goes into ota_1 (not the filesystem), checked as it is
    written; APPLY records the candidate with its image, then sets ota_1 to boot."""
    img = app_image(1, 70_001)  # 17 blocks and a bit
    put_bundle(board, img)
    out = transfer(board, apply=True)
    assert "offered 0 70008" in out and "staged 70008" in out and "applied 2.0.0" in out, out
    assert partition_sha(board, "ota_1", len(img)) == hashlib.sha256(img).hexdigest()
    rec = record(board)
    assert (rec["cand"], rec["cimg"], rec["cprev"], rec["tries"]) == ("a", "ota_1", "ota_0", 0)
    assert otadata(board) == ["ota_1", "ota_0", "new"]
    slot = board.state_dir / "fw" / "a"
    assert not (slot / "image").exists()  # the image is in its partition, not in the slot
    assert (slot / ".img").read_text() == f"{len(img)} ota_1 ok"


def test_a_transfer_cut_mid_image_resumes_from_the_last_whole_block(board: TwinNode) -> None:
    """A power cut in the middle of the image: the node resumes from the last 4 KB block it
    recorded, hashes what is already in the partition again, and the image ends whole. A
    block torn by the cut (bits cleared past the record) is erased as the writing re-enters it."""
    img = app_image(2, 30_000)
    put_bundle(board, img)
    assert "staged 10000" in transfer(board, stop=10_000)
    assert (board.state_dir / "fw" / "a" / ".img").read_text() == "8192 ota_1"
    part = board.hw / "part_ota_1"
    raw = bytearray(part.read_bytes())
    raw[8192:12288] = bytes(4096)  # the cut tore the next block: zeros read back there
    part.write_bytes(bytes(raw))
    out = transfer(board)
    assert "offered 8192 30007" in out and "staged 30007" in out, out
    assert partition_sha(board, "ota_1", len(img)) == hashlib.sha256(img).hexdigest()


def test_an_image_that_differs_from_its_signed_digest_is_refused_and_never_booted(
        board: TwinNode) -> None:
    """The partition reads back other bytes than the manifest signed (here: the flash keeps a
    bit the write should have set, as a worn block would): refused `file` (bad_hash) at the
    image's last byte, the progress back to zero, nothing set to boot, APPLY refused."""
    img = app_image(3, 9_000)
    put_bundle(board, img)
    # a write that leaves one bit cleared: the model's NOR rule keeps it (new = old AND data)
    flaky = ("from node.hal import esp32 as _h\n_w = _h.Image.write\n"
             "def _bad(self, at, data):\n"
             "    _w(self, at, data)\n"
             "    if at <= 5000 < at + len(data):\n"
             "        self.part.writeblocks(1, b'\\x00', 5000 - 4096)\n"
             "_h.Image.write = _bad\n")
    out = transfer(board, apply=True, before=flaky)
    assert "refused file" in out and "bad_hash" in out, out
    assert "applied" not in out
    assert (board.state_dir / "fw" / "a" / ".img").read_text() == "0 ota_1"
    assert otadata(board) == ["ota_0", "ota_0", "valid"]  # as esptool flashed it
    out = transfer(board, apply=True)  # sent again, written right
    assert "offered 0 9007" in out and "applied 2.0.0" in out, out


def test_a_healthy_image_confirms_itself_and_stays(board: TwinNode) -> None:
    """First boot of the new image: on trial (counted); once it has proved itself (a pack
    ACKed: ota.trial calls confirm) mark_app_valid_cancel_rollback, then the record; the
    next resets keep it, and the node's next update goes to the other partition."""
    staged(board, app_image(4, 12_000))
    b = boot(board, CONFIRM)
    assert (b.running, b.slot, b.trial, b.rec["tries"]) == ("ota_1", "a", True, 1)
    assert "confirmed True" in b.out, b.out
    assert otadata(board) == ["ota_1", "ota_0", "valid"]
    rec = record(board)
    assert (rec["state"], rec["active"], rec["ver"], rec["cand"]) == ("confirmed", "a",
                                                                      "2.0.0", None)
    for _ in range(2):  # resets and power cuts from now on: the new image, not on trial
        assert boot(board)[:3] == ("ota_1", "a", False)
    assert "wrote ota_0" in board.exec(SETUP + "img = hal.Image()\n"
                                       "print('wrote', img.label)\n")


def test_a_candidate_that_gets_no_ack_returns_to_the_old_image(board: TwinNode) -> None:
    """A failed trial: no pack ACKed within update_trial_s, ota.trial rolls back. The node sets
    the old image to boot and resets itself (not waiting for the bootloader); the old image
    boots, its record says rolled_back with the reason."""
    staged(board, app_image(5, 5_000))
    b = boot(board, ROLL_BACK + "print('still running')\n")
    assert b[:3] == ("ota_1", "a", True)
    assert "still running" not in b.out, b.out  # ota.trial's reset after roll_back
    assert otadata(board)[0] == "ota_0"
    running, slot, trial, rec, _ = boot(board)
    assert (running, slot, trial) == ("ota_0", None, False)
    assert (rec["state"], rec["cand"], rec["cimg"]) == ("rolled_back", None, None)
    assert rec["reason"].startswith("no_ack"), rec
    # set_boot made ota_0 a new image to the bootloader: main.py confirmed it at once, so
    # the resets from now on keep it (without that, the second would return to ota_1)
    assert otadata(board) == ["ota_0", "ota_1", "valid"] and rec["cprev"] is None, rec
    for _ in range(2):
        assert boot(board)[:3] == ("ota_0", None, False)


def test_a_reset_before_confirmation_is_rolled_back_by_the_bootloader_and_reported(
        board: TwinNode) -> None:
    """A power cut (or a crash, or the watchdog) during the first boot of the new image, before
    it confirmed: the bootloader boots the old image; main.py there sees a candidate image that
    is not running and records rolled_back with the reason."""
    staged(board, app_image(6, 5_000))
    assert boot(board)[:3] == ("ota_1", "a", True)  # the first boot: cut before confirming
    running, slot, trial, rec, _ = boot(board)
    assert (running, slot, trial) == ("ota_0", None, False)
    assert otadata(board) == ["ota_0", "ota_0", "aborted"]
    assert rec["state"] == "rolled_back" and rec["reason"].startswith("image_rollback"), rec
    assert "ota_0" in rec["reason"] and "ota_1" in rec["reason"]


def test_a_cut_between_the_record_and_set_boot_switches_once_more(board: TwinNode) -> None:
    """A power cut inside APPLY, after the boot record names the candidate but before set_boot:
    the old image boots with a candidate never booted (tries 0); main.py switches once and
    resets, and the new image goes on trial. Only once: a second miss is a rollback."""
    img = app_image(7, 5_000)
    put_bundle(board, img)
    no_switch = "from node.hal import esp32 as _h\n_h.Image.boot = lambda self: None\n"
    assert "applied 2.0.0" in transfer(board, apply=True, before=no_switch)
    assert otadata(board) == ["ota_0", "ota_0", "valid"]
    out = board.exec(MAIN + "print('not reached')\n")
    assert "never switched" in out and "not reached" not in out, out
    assert record(board)["reswitch"] == 1
    assert boot(board)[:3] == ("ota_1", "a", True)


def test_a_cut_while_confirming_leaves_the_image_on_trial_then_confirmed(
        board: TwinNode) -> None:
    """A power cut inside confirm(), after mark_app_valid_cancel_rollback and before the record:
    the bootloader keeps the new image (valid), the record still says candidate; the next boot
    counts another trial boot and the next ACK confirms it. Never the old image under a
    'confirmed' record."""
    staged(board, app_image(8, 5_000))
    assert boot(board, "hal.image_confirm()\n")[:3] == ("ota_1", "a", True)
    assert otadata(board)[2] == "valid" and record(board)["cand"] == "a"
    b = boot(board, CONFIRM)
    assert (b.running, b.slot, b.trial, b.rec["tries"]) == ("ota_1", "a", True, 2)
    assert "confirmed True" in b.out, b.out
    assert boot(board)[:3] == ("ota_1", "a", False)


def test_a_cut_at_every_step_leaves_a_board_that_boots_a_signed_image(board: TwinNode) -> None:
    """Power cuts at each step in one run: mid-image, after the image, after APPLY, during the
    first boot (the bootloader goes back), then the update sent again and confirmed."""
    img = app_image(9, 20_000)
    put_bundle(board, img)
    for stop in (3_000, 9_000, 20_000):
        assert f"staged {stop}" in transfer(board, stop=stop)
        assert boot(board)[:3] == ("ota_0", None, False)  # nothing applied: the old image
    assert "applied 2.0.0" in transfer(board, apply=True)
    assert boot(board)[:3] == ("ota_1", "a", True)  # cut before confirming
    running, _, trial, rec, _ = boot(board)
    assert (running, trial, rec["state"]) == ("ota_0", False, "rolled_back")
    # the gateway sends it again: the slot and the partition are staged anew, and it confirms
    out = transfer(board, apply=True)
    assert "applied 2.0.0" in out, out
    assert partition_sha(board, "ota_1", len(img)) == hashlib.sha256(img).hexdigest()
    b = boot(board, CONFIRM)
    assert b[:3] == ("ota_1", "a", True) and "confirmed True" in b.out, b.out
    assert boot(board)[:3] == ("ota_1", "a", False)


def valid_then_on_trial(board: TwinNode, seed: int) -> None:
    """An image staged, then a first boot cut inside confirm(): valid to the bootloader (as
    on a firmware without its app rollback), still a candidate to the node."""
    staged(board, app_image(seed, 5_000))
    assert boot(board, "hal.image_confirm()\n")[:3] == ("ota_1", "a", True)
    assert otadata(board) == ["ota_1", "ota_0", "valid"]


def settled_on_the_old_image(board: TwinNode, reason: str) -> None:
    """The boot after a rollback: ota_0 runs, its record says rolled_back, and it stays."""
    running, slot, trial, rec, out = boot(board)
    assert (running, slot, trial) == ("ota_0", None, False), out
    assert (rec["state"], rec["cand"], rec["cprev"]) == ("rolled_back", None, None), rec
    assert rec["reason"].startswith(reason), rec
    assert otadata(board)[::2] == ["ota_0", "valid"]
    assert boot(board)[:3] == ("ota_0", None, False)


@pytest.mark.parametrize(("cut", "reason"), [
    ("hal.image_back = cut\n", "trial_boots"),  # before anything: the candidate boots again
    ("ota.write_record = cut\n", "image_rollback"),  # switched, not recorded
    ("ota.reset = cut\n", "no_ack"),  # recorded, the reset is the cut
], ids=["before_the_switch", "before_the_record", "before_the_reset"])
def test_a_cut_at_each_step_of_the_nodes_rollback_ends_on_the_old_image(
        board: TwinNode, cut: str, reason: str) -> None:
    """review 7, finding 4: ota.roll_back sets the old image to boot, then writes the record,
    then ota.trial resets. A power cut at each step, on an image already valid to the
    bootloader (so only the node can go back): the board ends on ota_0, kept there, and the
    record says rolled_back. A cut before the switch leaves the candidate on trial; its
    boots run out and main.py leaves it. A cut after the switch boots ota_0 with the
    candidate still recorded: main.py reports the image rollback."""
    valid_then_on_trial(board, 10)
    b = boot(board, "from node import ota\n" + CUT + cut + ROLL_BACK)
    assert b[:3] == ("ota_1", "a", True)
    if reason == "trial_boots":
        assert otadata(board) == ["ota_1", "ota_0", "valid"] and record(board)["cand"] == "a"
        assert boot(board)[:3] == ("ota_1", "a", True)  # its third boot, the trial's last
        out = board.exec(MAIN)  # main.py leaves it: old image set to boot, record, reset
        assert "trial_boots" in out and "boot ota_" not in out, out
    settled_on_the_old_image(board, reason)


def test_a_cut_inside_main_pys_rollback_ends_on_the_old_image(board: TwinNode) -> None:
    """main.py leaves a candidate whose boots ran out: the old image set to boot, then the
    record, then the reset. A cut between the switch and the record boots ota_0 with the
    candidate still recorded, which main.py then leaves as an image rollback."""
    valid_then_on_trial(board, 11)
    rec = record(board)
    rec["tries"] = 3  # its boots used up
    (board.state_dir / "fw" / "boot.json").write_text(json.dumps(rec))
    saving = "_save0 = _save\ndef _save(fw, rec):\n    if rec['state'] == 'rolled_back':\n" \
             "        cut()\n    _save0(fw, rec)\n"
    out = boot_cut(board, saving)
    assert "rolled back: trial_boots" in out and "boot ota_" not in out, out
    assert otadata(board)[0] == "ota_0" and record(board)["cand"] == "a"
    settled_on_the_old_image(board, "image_rollback")


def test_a_cut_in_the_old_images_first_boot_switches_back_to_it_again(board: TwinNode) -> None:
    """After the node's rollback the old image runs on trial to the bootloader (set_boot
    makes any image new) until main.py confirms it. A cut before that returns the board to
    the image just left: main.py there sets ota_0 to boot again and resets; then it stays."""
    staged(board, app_image(12, 5_000))
    boot(board, ROLL_BACK)
    out = boot_cut(board, "from node.hal import esp32 as _h\n_h.image_confirm = cut\n")
    assert "boot ota_" not in out, out  # cut inside ota_0's first boot, before confirming
    out = board.exec(MAIN)  # the bootloader went back to ota_1; main.py switches again
    assert "returned to ota_1: ota_0 set to boot again" in out and "boot ota_" not in out, out
    assert record(board)["back"] == 1
    settled_on_the_old_image(board, "no_ack")


def test_an_old_image_that_never_boots_is_tried_three_times_then_the_board_says_so(
        board: TwinNode) -> None:
    """If every boot of the old image ends before main.py confirms it, the board goes back to
    it three times, then keeps the new image, and its record's reason says so."""
    staged(board, app_image(13, 5_000))
    boot(board, ROLL_BACK)
    never = "from node.hal import esp32 as _h\n_h.image_confirm = cut\n"
    for _ in range(3):
        assert "boot ota_" not in boot_cut(board, never)  # ota_0's boot ends before confirming
        assert "set to boot again" in board.exec(MAIN)  # ota_1: switched back once more
    assert "boot ota_" not in boot_cut(board, never)
    running, _, _, rec, out = boot(board)
    assert running == "ota_1" and rec["cprev"] is None, out
    assert rec["reason"].endswith("ota_0 did not boot: ota_1 kept"), rec


def test_a_candidate_image_whose_modules_cannot_load_is_left_at_once(board: TwinNode) -> None:
    """The slot's node package fails to import on the new image's first boot: main.py unloads
    it, leaves the candidate with the provisioned HAL (the old image set to boot, the record,
    the reset), and the old image runs from the next boot, kept."""
    put_bundle(board, app_image(14, 5_000),
               files=(("main.py", b"# slot\n"), ("node/app.mpy", b"not bytecode")))
    assert "applied 2.0.0" in transfer(board, apply=True)
    out = board.exec(MAIN.split("fw, rec, slot")[0] + "run('node.json')\n")  # a whole boot
    assert "rolled back: boot_exception" in out, out
    assert otadata(board)[0] == "ota_0" and record(board)["cand"] is None
    settled_on_the_old_image(board, "boot_exception")
