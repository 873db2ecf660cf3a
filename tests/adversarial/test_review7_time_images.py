"""Seventh review: time you can trust (issue 19: the hold's exactly-once seal, fresh ACKs only,
the gateway's clock) and whole-firmware images (issue 16: ESP32 app images, the firmware
version upstream), attacked as a relay on the radio or serial line, a power supply that fails
at the wrong moment, a restart on the way out, and a careless operator.

Each test is one finding: it fails on the tree it was written against, for the reason its
docstring gives, and is marked xfail(strict) until the fix lands (the fixer removes the mark).
Node code runs on MicroPython's unix port (the hold and the send window as node scripts, the
flash through the `os` module: the hardware boundary), the image switch on the ESP32 twin, the
HTTP sink against a real aiohttp server.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent.queue.resolve import Batch
from lantern.agent.sinks.http import DeliveryError, HttpSink, HttpSinkConfig
from lantern.tools.field import release
from tests.esp32_twin.twin import BOARD, TwinNode
from tests.helpers.flash import MICROPYTHON, ROOT

MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"


def _mp(tmp_path: Path, script: str, *args: str) -> list[Any]:
    """Run a node script on the unix port; its JSON lines."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    path = tmp_path / "script.py"
    path.write_text(script)
    proc = subprocess.run([str(MICROPYTHON), str(path), str(tmp_path), *args],
                          env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith(("{", "["))]


# ---- the hold (node/hold.py): a board whose flash, clock and outbox are the node's own -------

BOARD_SCRIPT = r"""
import asyncio, json, os, sys, time
from node import cbor, cose, hold, outbox
from node.app import Node
from node.outbox import Outbox
from node.window import Window

D = sys.argv[1]


class PowerCut(Exception):
    pass


class Clock:
    def __init__(self, synced, ms):
        self.synced = synced
        self.known = False
        self.on_set = None
        self.ms = ms

    def now_ms(self):
        return self.ms

    def now(self):
        return self.ms // 1000


class Board:
    seal = Node.seal
    seal_errors = 0
    beat_ms = 0
    link = None

    def __init__(self, synced, clock_ms=50000000, up_ms=0, limit=8):
        self.cfg = {"state_dir": D, "max_untimed": limit}
        self.clock = Clock(synced, clock_ms)
        self.boot = {"reset": "power"}
        self.boot_ms = time.ticks_add(time.ticks_ms(), -up_ms)
        self.key = bytes(32)
        self.kid = b"SL-0001"
        self.outbox = Outbox(D)


def reading(frame):
    pack = cbor.loads(cose.mac0_peek(frame)[3])
    n = q = None
    for r in pack:
        if r.get(0) == "n":
            n = r[2]
        if r.get(0) == "time.q":
            q = r[2]
    return {"n": n, "bt": pack[0].get(-3, 0), "q": q}


def drain(b):
    seqs = b.outbox.seqs()
    return [dict(reading(b.outbox.get(s)), seq=s) for s in seqs], seqs
"""

DOUBLE_CUT = BOARD_SCRIPT + r"""
class CutOnRemove:
    # the hold module's `os`: the power fails as the sealed sample's file is removed
    def remove(self, p):
        raise PowerCut()

    def __getattr__(self, name):
        return getattr(os, name)


# boot 1: one sample held; the clock is set; the flush seals it (seal record, pack in the
# outbox) and the power fails before its held file is removed
b1 = Board(False)
h1 = hold.Hold(b1, lambda: None)
h1.hold(100, {"n": 1})
b1.clock.synced = True
h1.shift_ms, h1._boot_abs = 1000000, 0
hold.os = CutOnRemove()
try:
    asyncio.run(h1.flush())
except PowerCut:
    pass
hold.os = os

# boot 2: the link delivers the pack and the gateway ACKs it before the first sample loads the
# hold; then the board resets again (a brown-out, or the watchdog on a hung sensor)
b2 = Board(True)
b2.link = Window("uart", b2.outbox, 4, 1000)
got, seqs = drain(b2)
b2.link._acked(seqs)

# boot 3: the first sample loads the hold, which settles the interrupted seal
b3 = Board(True)
b3.link = Window("uart", b3.outbox, 4, 1000)
h3 = hold.Hold(b3, lambda: None)
asyncio.run(h3.flush())
more, _ = drain(b3)
print(json.dumps(got + more))
"""


@pytest.mark.micropython
def test_a_seal_acknowledged_before_a_second_reset_is_not_sealed_twice(tmp_path: Path) -> None:
    """Attack: power fails between the held sample's pack reaching the outbox and its file's
    removal; in the next boot the link delivers the pack and the gateway ACKs it (out of the
    outbox) before the first sample loads the hold, and the board resets once more (a brown-out
    under the PM sensor's heater, or the watchdog on a hung I2C sensor during that first sample).
    Expected: the sample reaches the gateway once: the hold's recovery knows a pack newer than
    the seal record's `after` was made. Instead: `_recover` looks only at the outbox (now
    empty) and `Window.acked_top`, which starts at -1 every boot, so the seal record reads as
    never sealed and the sample is sealed again under a new sequence number: a duplicate the
    gateway's (node, seq) de-duplication cannot see."""
    got = _mp(tmp_path, DOUBLE_CUT)[0]
    assert [g["n"] for g in got] == [1], got


FULL_HOLD_ACROSS_RUNS = BOARD_SCRIPT + r"""
# run 1 of the board's clock (an ESP32 counts from its epoch after each power-on): two hours in,
# the gateway has never given the time; the hold (2 samples) keeps two samples
b1 = Board(False, clock_ms=7200000, up_ms=7200000, limit=2)
h1 = hold.Hold(b1, lambda: None)
h1.hold(7100, {"n": 1})
h1.hold(7200, {"n": 2})
# a power cut; run 2 of the clock starts again at its epoch; an hour later, still no time: the
# next sample finds the hold full, and its oldest (from run 1) is sealed relative
b2 = Board(False, clock_ms=3600000, up_ms=3600000, limit=2)
h2 = hold.Hold(b2, lambda: None)
h2.hold(3600, {"n": 3})
got, _ = drain(b2)
print(json.dumps(got))
"""


@pytest.mark.micropython
def test_a_full_hold_does_not_date_an_earlier_runs_sample_across_two_clock_runs(
        tmp_path: Path) -> None:
    """Attack: the gateway withholds the time (its clock unsynchronised, or a relay dropping
    its ACKs) while the node's hold fills; a power cut starts the board's clock again at its
    epoch; the hold is full when the next sample comes. Expected: the oldest sample, taken in
    the earlier run, goes flagged `before` (time.q bit 2, as docs/time.md says of every sample
    from an earlier run) or at least with a relative time no later than this run's start (it
    is over an hour older). Instead: `_seal_oldest(RELATIVE)` subtracts this run's clock from
    the earlier run's reading (7100 - 3600 s, clamped to 0): the reading goes with bt = 0 and
    time.q = 1 only, which the gateway anchors at its receipt: dated over an hour late, and
    the flag claims a known age."""
    got = _mp(tmp_path, FULL_HOLD_ACROSS_RUNS)[0]
    first = next(g for g in got if g["n"] == 1)
    assert (first["q"] or 0) & 2 or first["bt"] <= -3600, first


# ---- the send window (node/window.py): freshness on the wrapping tick counter ----------------

STALE_ACK_WRAP = r"""
import asyncio, json, sys, time
from node import window
from node.outbox import Outbox

D = sys.argv[1]
real_time = time


class Ticks:
    # the board's millisecond tick counter (time.ticks_ms): a hardware clock, stepped here;
    # ticks_add and ticks_diff are the port's own, so the counter wraps as the board's does
    ms = 0

    def ticks_ms(self):
        return self.ms

    def __getattr__(self, name):
        return getattr(real_time, name)


ticks = Ticks()
window.time = ticks
PERIOD = time.ticks_add(0, -1) + 1  # the port's tick period (2**30 ms: 12.4 days)


class Link(window.Window):
    async def _transmit(self, conn, data):
        return True


box = Outbox(D)
seq = box.next_seq()
box.put(seq, b"frame")
w = Link("uart", box, 4, 1000)
asyncio.run(w._send_due(None))  # the frame's first transmission, at tick 0
# a relay keeps every ACK of it; the node resends (each resend keeps the first-send tick);
# half the tick period and 20 s later the relay hands the node the first ACK
ticks.ms = time.ticks_add(time.ticks_add(0, PERIOD // 4), PERIOD // 4 + 20000)
fresh = w._acked([seq])
print(json.dumps({"fresh": fresh, "late_acks": w.late_acks, "period": PERIOD}))
"""


@pytest.mark.micropython
def test_an_ack_held_longer_than_half_the_tick_period_is_not_fresh(tmp_path: Path) -> None:
    """Attack: a relay between node and gateway keeps every ACK of a frame in flight (the node
    resends, the gateway acknowledges each resend, the relay drops them all) for half the
    ticks_ms period plus 20 s (the period is 2**30 ms on the 32-bit ESP32 port: 6.2 days; 2**62
    on this 64-bit unix port, whose tick counter the test steps that far), then delivers the
    first, authentic ACK. Expected: it is late (over TIME_FRESH_MS after the frame's first
    transmission): no time taken, `late_acks` counted. Instead: `_acked` measures the age with
    ticks_diff, which is only valid within half the period; past it the difference wraps
    negative, `<= TIME_FRESH_MS` holds, and the ACK's 6-day-old time is taken: the node's clock
    set back six days on an ESP32 (only counted in back_steps), every reading sealed that much
    early."""
    out = _mp(tmp_path, STALE_ACK_WRAP)[0]
    assert out["fresh"] is False and out["late_acks"] == 1, out


# ---- the image switch (main.py, node/ota.py, hal/esp32.py) on the ESP32 twin -----------------

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
CHUNK = 768  # node/ota.py CHUNK_MAX
# the gateway's transfer into the node's Updater with the esp32 HAL: OFFER the bundle's head,
# CHUNK the rest, APPLY
TRANSFER = """
import json
from node.hal import esp32
from node.ota import Updater
u = Updater(json.load(open('node.json')), 'esp32-devkitc', 'node.json', esp32)
with open('bundle.lub', 'rb') as b:
    head = b.read(8)
    head += b.read(int.from_bytes(head[4:8], 'big'))
    have, total = u.offer(head)
    while have < total:
        b.seek(len(head) + have)
        have = u.chunk(have, b.read(CHUNK))
print('applied', u.apply())
""".replace("CHUNK", str(CHUNK))
# one boot through main.py's boot loader (its last line, boot(), left out), then `after`
MAIN = ("src = open('main.py').read()\nexec(src[:src.rindex('\\nboot(')])\n"
        "fw, rec, slot, trial = choose('node.json')\n"
        "from node.hal import esp32 as hal\n"
        "print('boot', hal.image_running(), slot, trial)\n")


@pytest.fixture
def twin(tmp_path: Path) -> TwinNode:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    node = TwinNode("SL-0001", tmp_path)
    node.write_config()
    (node.flash / "release.pub").write_bytes(KEY.public_key().public_bytes_raw())
    return node


def _boot(node: TwinNode, after: str = "") -> tuple[str, str]:
    out = node.exec(MAIN + after)
    line = next((ln for ln in out.splitlines() if ln.startswith("boot ")), None)
    assert line is not None, out
    return line.split()[1], out


@pytest.mark.esp32_twin
@pytest.mark.ota
def test_a_cut_inside_a_rollback_does_not_keep_the_failed_image(twin: TwinNode) -> None:
    """Attack: the new image's trial fails (no pack ACKed within update_trial_s: its link does
    not work) on a board where the image is already valid to the bootloader (a power cut
    inside confirm() after mark_app_valid_cancel_rollback, a case the twin's own tests make; or
    any firmware built without the bootloader's app rollback, which hal/esp32.py
    image_confirm supports); the power fails inside ota.roll_back after its boot record and
    before image_leave's set_boot. Expected: the next boot runs the old image (ota_0), as an
    uninterrupted roll_back leaves it. Instead: the record already says rolled_back with
    `cimg` cleared, so no later boot has a candidate to leave and nothing ever switches back:
    the image whose trial failed (a node that cannot reach its gateway) runs from now on,
    while STATUS reports the rollback."""
    img = b"\xe9" + bytes(range(256)) * 20
    data = release.bundle(KEY, "2.0.0", 1, "0.1.0", [BOARD], (6, 3),
                          [(release.IMAGE_PATH, img), ("main.py", b"# slot\n")])
    (twin.flash / "bundle.lub").write_bytes(data)
    out = twin.exec(TRANSFER)
    assert "applied 2.0.0" in out, out
    # first boot of the new image: a cut inside confirm, after the bootloader was told it is
    # valid and before the record (tests/esp32_twin test_a_cut_while_confirming_...)
    running, out = _boot(twin, "hal.image_confirm()\n")
    assert running == "ota_1", out
    # the next boot: the trial fails; roll_back writes its record, the power fails before the
    # switch (image_leave is where set_boot and the reset happen)
    running, out = _boot(twin, "hal.image_leave = lambda img, prev: None\n"
                         "from node import ota\n"
                         "ota.roll_back(fw, 'no_ack: no pack ACKed within 600 s', hal)\n")
    assert running == "ota_1", out
    running, out = _boot(twin)
    assert running == "ota_0", out


# ---- the firmware version upstream (agent/sinks/http.py) -------------------------------------

def _batch() -> Batch:
    rids = ["SL-0001:7:0"]
    items = [json.dumps({"id": rids[0], "n": "urn:dev:lantern:SL-0001:temperature",
                         "t": 1.7e9, "u": "Cel", "v": 20.5}, separators=(",", ":"))]
    return Batch(1, 1, 0.0, rids, items)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[tuple[str, bytes]]]]:
    """A real aiohttp receiver that keeps each POST (key, body) and answers the first with 503:
    it took the batch, but its answer says otherwise (or never reached the gateway)."""
    seen: list[tuple[str, bytes]] = []

    async def post(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Idempotency-Key", ""), await request.read()))
        return web.Response(status=503 if len(seen) == 1 else 200)

    app = web.Application()
    app.router.add_post("/senml", post)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/senml", seen
    finally:
        await runner.cleanup()


async def test_a_batch_retried_after_a_restart_is_byte_identical(
        upstream: tuple[str, list[tuple[str, bytes]]], tmp_path: Path) -> None:
    """Attack: none needed: a batch holding a node whose firmware version is known goes out,
    the upstream stores it but its answer is lost (here a 503), and the gateway restarts (a
    crash, a cabinet power cut, systemd's watchdog) before the retry. Expected: the retry is
    the same bytes under the same Idempotency-Key, as docs/upstream.md promises for every
    retry (an upstream that follows the IETF Idempotency-Key draft answers 422 to a reused key
    with another payload, and a stuck batch holds back the whole queue). Instead: the firmware
    records are frozen only in memory (HttpSink._frozen), so the restarted sink makes the
    record again with `"t": time.time()` of its new first attempt: same key, other body."""
    url, seen = upstream
    fw = {"SL-0001": "2.0.0"}
    async with HttpSink(HttpSinkConfig(url=url), fw, tmp_path) as sink:
        with pytest.raises(DeliveryError):
            await sink.send(_batch())
    async with HttpSink(HttpSinkConfig(url=url), fw, tmp_path) as sink:  # after the restart
        await sink.send(_batch())
    (k1, b1), (k2, b2) = seen
    assert k1 == k2
    assert b1 == b2, (b1, b2)


# ---- release build --image (tools/field/release.py): a careless release author ----------------

def _whole_flash_image() -> bytes:
    """What MicroPython's ESP32 download page calls firmware.bin: the whole flash from 0x1000,
    bootloader (an image too: 0xE9 first), partition table at 0x8000, the app at 0x10000."""
    boot = b"\xe9\x03\x02\x20" + bytes(20) + bytes(0x7000 - 24)
    table = b"\xaa\x50" + bytes(0x1000 - 2)
    otadata = b"\xff" * 0x7000
    # the app: image header, first segment header, then esp_app_desc_t (magic 0xABCD5432)
    app = b"\xe9\x05\x02\x20" + bytes(20) + bytes(8) + (0xABCD5432).to_bytes(4, "little")
    return boot + table + otadata + app + bytes(4096)


@pytest.mark.ota
def test_release_image_refuses_a_whole_flash_firmware_bin(tmp_path: Path) -> None:
    """Attack: a careless release author passes MicroPython's ESP32 `firmware.bin` (the
    download page's file, flashed at 0x1000: bootloader, partition table, then the app) to
    `lantern release build --image` instead of the app alone (`micropython.bin`). Expected:
    refused with its own message ("not the bootloader or a whole-flash dump"): an app image
    carries esp_app_desc_t's magic 0xABCD5432 right after its image and first segment headers
    (offset 32), which a bootloader and a whole-flash dump do not. Instead: `app_image` checks
    only the first byte (0xE9, which the bootloader's image header has too) and signs it: every
    node of the rollout writes the whole dump into its app partition and APPLY sets it to boot
    (what a real bootloader then does with it the twin cannot show)."""
    path = tmp_path / "firmware.bin"
    path.write_bytes(_whole_flash_image())
    with pytest.raises(release.ReleaseError):
        release.app_image(path, [BOARD])
