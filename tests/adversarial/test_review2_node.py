"""Second review: the node firmware's counters, on the MicroPython unix port at the simulated
board's heap (boards/unix-sim.json), as tests/adversarial/test_node_decoder_fuzz.py runs it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import subprocess
from pathlib import Path

import pytest

from lantern.tools.street.sim import MICROPYTHON, MP_EXTMOD

pytestmark = pytest.mark.micropython

ROOT = Path(__file__).resolve().parents[2]
HEAP_KB = json.loads((ROOT / "boards/unix-sim.json").read_text())["heap_kb"]


def run_mpy(script: str, tmp_path: Path) -> str:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    p = subprocess.run(
        [str(MICROPYTHON), "-X", f"heapsize={HEAP_KB}K", "-c", script],
        env={"MICROPYPATH": f"{ROOT / 'firmware'}:{MP_EXTMOD}"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


# One failed write of a counter file (flash full: ENOSPC; or any OSError on the way), then
# space again (an ACK removed frames), then a reboot. Same for the frame sequence
# (node/outbox.py Outbox._reserve) and the BTHome CCM counter (node/link_ble.py Counter.next).
# Both write through node/outbox.py _write_atomic: the failing `open` is that module's.
COUNTERS = r"""
import os
from node import outbox as ob
from node import link_ble as lb

ROOT = "state"

# -- the frame sequence ------------------------------------------------------------------
o = ob.Outbox(ROOT, 100)
for _ in range(ob.SEQ_BLOCK):
    o.next_seq()                      # one block handed out: the file says the next block
real = ob._write_atomic
def full(path, data):
    if path.endswith("/seq"):
        raise OSError(28)             # ENOSPC: littlefs is full
    real(path, data)
ob._write_atomic = full
try:
    o.next_seq()                      # the sampler catches this: one lost pack, counted
except OSError:
    pass
ob._write_atomic = real               # space again
s = o.next_seq()                      # the next pack...
o.put(s, b"pack")
o.remove(s)                           # ...sent, committed and acknowledged
again = ob.Outbox(ROOT, 100).next_seq()   # power cut / reboot
print("seq", s, again)

# -- the BTHome encryption counter ---------------------------------------------------------
path = ROOT + "/bthome_counter"
c = lb.Counter(path)
for _ in range(256):            # one block (link_ble._COUNTER_BLOCK)
    c.next()
class Half:
    # a file that takes part of what is written, then reports the flash full
    def __init__(self, f):
        self.f = f
    def write(self, b):
        self.f.write(b[:1])
        raise OSError(28)
    def __enter__(self):
        return self
    def __exit__(self, *a):
        self.f.close()
class Full:
    def __call__(self, name, mode="r"):
        if name.endswith(".tmp") and "w" in mode:
            return Half(open(name, mode))
        return open(name, mode)
ob.open = Full()                      # the writer's open: writes of the counter file fail
try:
    c.next()                          # the advertiser task gets this
except OSError:
    pass
ob.open = open                        # space again
print("tmp", int("bthome_counter.tmp" in os.listdir(ROOT)))  # no partial file left behind
used = c.next()                       # the next advert's nonce
after = lb.Counter(path).next()       # reboot: the next advert's nonce
print("ctr", used, after)
"""


def test_counter_reservation_survives_a_failed_write(tmp_path: Path) -> None:
    """node/outbox.py Outbox._reserve and node/link_ble.py Counter.next raise the in-RAM
    reservation (`_reserved`) before the file that makes it durable is written. If that write
    fails once (littlefs full, ENOSPC), the next call hands out numbers from a block that was
    never persisted; after a reboot the same numbers are handed out again: a frame sequence
    number the gateway has already committed (the new pack is taken for a duplicate, ACKed
    and deleted from the node: lost) and a BTHome AES-CCM nonce used twice under the same
    bindkey (keystream reuse). Numbers must never repeat across a reboot."""
    out = run_mpy(COUNTERS, tmp_path)
    got = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in out.splitlines()}
    s, again = got["seq"]
    used, after = got["ctr"]
    assert again > s and after > used, (
        f"after one failed counter write and a reboot: frame sequence {s} handed out again "
        f"({again}); BTHome counter {used} used again ({after})")
    assert got["tmp"] == [0], "a failed write left its temporary file on the flash"


@pytest.mark.ble_virtual
@pytest.mark.timeout(120)
async def test_ble_advertiser_outlives_a_failed_counter_write(tmp_path: Path) -> None:
    """node/link_ble.py BleLink._advertiser has no guard (unlike _events and UartLink._rx):
    one exception in an advert round ends the task, and with it every advert, the Lantern
    advert included. Nothing tells a gateway that the node has a backlog any more, nobody
    connects, and the outbox fills and evicts until a reboot. The trigger here is the BTHome
    counter's block write failing once (littlefs full: ENOSPC), a real firmware path
    (Counter.next); gap_advertise raising OSError would do the same. Advertising must go on."""
    import builtins

    from tests.ble.harness import World, until

    world = World(tmp_path)
    try:
        (node,) = world.add_nodes(1, sample_limit=3, interval_ms=5, link_cfg={
            "adv_interval_ms": 50, "rotate_ms": 50})
        await node.start(world.link)
        link = node.node.link
        await until(lambda: link.stats.adverts >= 6, 30, "adverts")
        # the counter's file goes through node/outbox.py _write_atomic: that module's open
        mod = importlib.import_module("node.outbox")
        failed: list[str] = []

        def full(name: str, mode: str = "r") -> object:
            if name.endswith("bthome_counter.tmp") and "w" in mode and not failed:
                failed.append(name)
                raise OSError(28, "No space left on device")
            return builtins.open(name, mode)

        mod.open = full  # type: ignore[attr-defined]  # a module global shadows the builtin
        link._counter._reserved = link._counter._next  # the block is used up: next() writes
        await until(lambda: bool(failed), 30, "the counter's block write")
        before = link.stats.adverts
        await asyncio.sleep(1.0)  # 20 advert rounds at rotate_ms 50
        after = link.stats.adverts
        assert after > before, (
            f"the node stopped advertising for good after one failed counter write: "
            f"{before} adverts then, {after} one second later")
    finally:
        with contextlib.suppress(AttributeError, NameError):
            del mod.open
        await world.close()


# The outbox on littlefs as an ESP32 formats it (vfs.VfsLfs2, 4 KB blocks), on a flash image
# in a file. littlefs gives every file over its inline limit (128 bytes with MicroPython's
# cache size) a block of its own: a 2 MB partition holds ~470 frames of 350 bytes, well
# below max_frames 1000; this one (64 blocks) holds a few dozen.
FULL_FLASH = r"""
import os, sys, vfs
from node import outbox as ob
from node import link_ble as lb

BS = 4096
N = int(sys.argv[1])

class FileFlash:
    def __init__(self, path, create):
        if create:
            with open(path, "wb") as f:
                for _ in range(N):
                    f.write(b"\xff" * BS)
        self.f = open(path, "r+b")
    def readblocks(self, b, buf, off=0):
        self.f.seek(b * BS + off)
        self.f.readinto(buf)
    def writeblocks(self, b, buf, off=None):
        self.f.seek(b * BS + (off or 0))
        self.f.write(buf)
    def ioctl(self, op, arg):
        if op == 4:
            return N
        if op == 5:
            return BS
        if op == 6:  # erase
            self.f.seek(arg * BS)
            self.f.write(b"\xff" * BS)
        return 0

flash = FileFlash("flash.img", True)
vfs.VfsLfs2.mkfs(flash)
vfs.mount(vfs.VfsLfs2(flash), "/flash")
os.chdir("/flash")

def frame(seq):
    return (b"%010d" % seq) * 35  # 350 bytes, like a sealed pack of ~20 readings

o = ob.Outbox("state", 1000)
last = None
try:
    for _ in range(int(sys.argv[2])):
        last = o.next_seq()
        o.put(last, frame(last))
except OSError as e:
    print("put failed", last, repr(e))
print("outbox", len(o), o.evicted, last)
st = os.statvfs("/flash")
print("free", st[3] if st[3] <= st[2] else -1)
# the counters still go on: BTHome blocks, sequence blocks, the command floor
c = lb.Counter("state/bthome_counter")
n = 0
try:
    for _ in range(3 * 256):
        c.next()
        n += 1
    for _ in range(3 * ob.SEQ_BLOCK):
        o.next_seq()
        n += 1
    ob._write_atomic("state/cmd_counter", b"7")  # how node/commands.py saves its floor
    n += 1
except OSError as e:
    print("counter failed", repr(e))
print("counters", n)
# every frame left is whole and one of the newest
bad = [s for s in o.seqs() if o.get(s) != frame(s)]
print("frames", len(bad), min(o.seqs()), max(o.seqs()))
seen = o.seqs()
vfs.umount("/flash")
flash.f.close()
vfs.mount(vfs.VfsLfs2(FileFlash("flash.img", False)), "/flash")  # power cut, reboot
os.chdir("/flash")
o2 = ob.Outbox("state", 1000)
print("reboot", int(o2.seqs() == seen), o2.next_seq())
"""


def test_a_full_flash_evicts_the_oldest_and_keeps_the_counters_writable(tmp_path: Path) -> None:
    """The outbox is capped by frame count, not bytes. On littlefs each frame takes a 4 KB
    block, so the flash filled long before max_frames: then every write failed (ENOSPC) —
    no frame sealed, no sequence block, no BTHome counter, no command floor (so no
    diagnostics either) until the gateway came back. Now the outbox keeps FREE_BLOCKS free,
    evicting the oldest frames as it does at max_frames (counted in `evicted`)."""
    blocks, puts = 64, 150
    script = tmp_path / "full.py"
    script.write_text(FULL_FLASH)
    p = subprocess.run(
        [str(MICROPYTHON), "-X", f"heapsize={HEAP_KB}K", str(script), str(blocks), str(puts)],
        env={"MICROPYPATH": f"{ROOT / 'firmware'}:{MP_EXTMOD}"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    got = {line.split()[0]: line.split()[1:] for line in p.stdout.splitlines()}
    assert "failed" not in p.stdout, p.stdout
    count, evicted, last = map(int, got["outbox"])
    assert last == puts - 1 and evicted > 0 and count + evicted == puts, p.stdout
    assert int(got["free"][0]) >= 2, p.stdout  # the reserve is kept (littlefs counts high)
    assert int(got["counters"][0]) == 3 * 256 + 3 * 32 + 1, p.stdout
    bad, oldest, newest = map(int, got["frames"])
    assert bad == 0 and newest == last and oldest == puts - count, p.stdout
    same, after = map(int, got["reboot"])
    assert same == 1 and after > last + 3 * 32, p.stdout


# -- finding 2 and 3: every long-running task of the node outlives one failed round ----------

@pytest.mark.ble_virtual
@pytest.mark.timeout(120)
async def test_ble_lantern_advert_goes_on_while_the_counter_cannot_be_saved(
        tmp_path: Path) -> None:
    """A flash that stays full fails every BTHome round (no counter can be saved, and an
    advert without one never goes out). The rounds take turns: the Lantern advert, which
    tells a gateway there is a backlog to drain, must keep going between them."""
    import builtins

    from tests.ble.harness import World, until

    world = World(tmp_path)
    mod = importlib.import_module("node.outbox")
    try:
        (node,) = world.add_nodes(1, sample_limit=3, interval_ms=5, link_cfg={
            "adv_interval_ms": 50, "rotate_ms": 50})
        await node.start(world.link)
        link = node.node.link
        await until(lambda: link.stats.adverts >= 6, 30, "adverts")

        def full(name: str, mode: str = "r") -> object:
            if name.endswith("bthome_counter.tmp") and "w" in mode:
                raise OSError(28, "No space left on device")
            return builtins.open(name, mode)

        mod.open = full  # type: ignore[attr-defined]
        link._counter._reserved = link._counter._next  # every BTHome round must save a block
        await until(lambda: getattr(link.stats, "advert_failures", 0) >= 1, 30,
                    "a BTHome round failing")
        before = link.stats.adverts
        await until(lambda: link.stats.adverts >= before + 5, 30,
                    "Lantern adverts between the failing BTHome rounds")
        assert link.stats.advert_failures >= 4
        assert link._counter._reserved == link._counter._next  # nothing handed out unsaved
    finally:
        with contextlib.suppress(AttributeError):
            del mod.open
        await world.close()


@pytest.mark.ble_virtual
@pytest.mark.timeout(180)
async def test_ble_send_task_outlives_a_frame_it_cannot_read(tmp_path: Path) -> None:
    """node/link_ble.py BleLink._tx had no guard either: a frame that could not be read from
    flash once (OSError: EIO), a STATE write the stack refused or a MemoryError ended it, and
    with it `link.run()` and the node. Now the round is counted (`tx_failures`), the first
    printed, and after rto_ms the drain goes on: every frame reaches the gateway."""
    from tests.ble.harness import World, senml_seqs, until

    world = World(tmp_path)
    try:
        await world.upstream.start()
        (node,) = world.add_nodes(1, sample_limit=5, interval_ms=5, link_cfg={
            "adv_interval_ms": 50, "rotate_ms": 100, "rto_ms": 200})
        await node.start(world.link)
        await until(lambda: len(node.outbox) == 5, 60, "the backlog")
        outbox = node.node.outbox
        get = outbox.get
        failed: list[int] = []

        def flaky(seq: int) -> bytes:
            if not failed:
                failed.append(seq)
                raise OSError(5, "Input/output error")
            return get(seq)  # type: ignore[no-any-return]

        outbox.get = flaky
        await world.start_gateway()
        await until(lambda: senml_seqs(world.upstream).get(node.node_id) == set(range(5))
                    and len(outbox) == 0, 90, "every frame, after the failed read")
        assert failed and node.node.link.stats.tx_failures == 1
    finally:
        await world.close()


@pytest.mark.ble_virtual
@pytest.mark.timeout(120)
async def test_node_boots_on_a_full_flash_and_counts_the_pack_it_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flash full at boot (the sequence block cannot be saved) stopped the node in
    Outbox.__init__: no sampling, and no link to deliver the frames whose ACKs would free
    the space. Now the node boots; the pack that then gets no sequence number is lost and
    counted (`seal_errors`, also in the status), and sampling goes on with numbers that
    never repeat."""
    from tests.ble.harness import World, until  # first: it puts the firmware on sys.path

    ob = importlib.import_module("node.outbox")
    actions = importlib.import_module("node.commands").NodeActions

    real = ob._write_atomic
    seq_fails = [2]  # the boot's reservation, then the first sample's

    def full(path: str, data: bytes) -> None:
        if path.endswith("/seq") and seq_fails[0]:
            seq_fails[0] -= 1
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ob, "_write_atomic", full)
    world = World(tmp_path)
    try:
        (node,) = world.add_nodes(1, sample_limit=6, interval_ms=5)
        await node.start(world.link)
        await until(lambda: len(node.outbox) == 5, 30, "the five packs after the lost one")
        assert seq_fails == [0] and node.node.seal_errors == 1
        assert sorted(node.sampled) == node.outbox.seqs()
        assert actions(node.node).status()["seal_errors"] == 1
    finally:
        await world.close()


@pytest.mark.ble_virtual
@pytest.mark.timeout(120)
async def test_sampler_outlives_a_failed_wakeup_of_the_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler's guard covered sampling and sealing only: a link whose wake-up raised
    (BleLink.kick decodes the newest pack for the adverts: a MemoryError on a short heap)
    ended sampling for good. The pack is stored by then; sampling must go on."""
    from tests.ble.harness import World, until  # first: it puts the firmware on sys.path

    link_ble = importlib.import_module("node.link_ble")

    kick = link_ble.BleLink.kick
    kicks = [0]

    def short_heap(self: object) -> None:
        kicks[0] += 1
        if kicks[0] == 1:
            raise MemoryError("memory allocation failed, allocating 1024 bytes")
        kick(self)

    monkeypatch.setattr(link_ble.BleLink, "kick", short_heap)
    world = World(tmp_path)
    try:
        (node,) = world.add_nodes(1, sample_limit=6, interval_ms=5)
        await node.start(world.link)
        await until(lambda: len(node.outbox) == 6, 30, "six packs, the first wake-up failing")
        assert kicks[0] == 6 and node.node.seal_errors == 0
    finally:
        await world.close()


UART_TX = r"""
import asyncio, sys
from node.outbox import Outbox
from node.link_uart import UartLink

class Writer:  # the UART driver: one write fails (a driver error), the rest go out
    def __init__(self):
        self.frames = 0
        self.failed = 0
    def write(self, b):
        if not self.failed:
            self.failed = 1
            raise OSError(5)
        self.frames += 1
    async def drain(self): pass

class Clock:
    def set_ms(self, ms): pass

ob = Outbox(sys.argv[1], max_frames=8)
link = UartLink(object(), "SL-0001", bytes(32), ob, Clock(), window=4, rto_ms=20)
w = link._writer = Writer()

async def main():
    task = asyncio.create_task(link._tx())
    for _ in range(3):
        s = ob.next_seq()
        ob.put(s, b"x" * 40)
        link.kick()
        await asyncio.sleep_ms(0)
    for _ in range(200):  # until the three frames went out, or the task is gone
        if w.frames >= 3 or task.done():
            break
        await asyncio.sleep_ms(10)
    print("result", w.failed, w.frames, getattr(link.stats, "tx_failures", None), task.done())

asyncio.run(main())
"""


def test_uart_send_task_outlives_a_failed_write(tmp_path: Path) -> None:
    """node/link_uart.py UartLink._tx had no guard (its _rx has one): one UART write error,
    a frame unreadable from flash or a MemoryError ended it, and with it `link.run()`: the
    node stopped. Now the round is counted (`tx_failures`), printed once, and retried."""
    state = tmp_path / "state"
    state.mkdir()
    script = tmp_path / "tx.py"
    script.write_text(UART_TX)
    p = subprocess.run(
        [str(MICROPYTHON), "-X", f"heapsize={HEAP_KB}K", str(script), str(state)],
        env={"MICROPYPATH": f"{ROOT / 'firmware'}:{MP_EXTMOD}"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout.splitlines()
    result = next(line for line in out if line.startswith("result")).split()
    assert result == ["result", "1", "3", "1", "False"], p.stdout
    assert [line for line in out if line.startswith("uart tx")] == [
        "uart tx failed: OSError(5,) (later ones only counted)"], p.stdout
