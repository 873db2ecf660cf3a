"""Signed updates received by a real node on MicroPython's unix port (node/ota.py, main.py).

The test takes the gateway's place on the node's pty line: it sends OFFER / CHUNK / APPLY
COMMANDs (docs/protocol.md "Update transfer"), ACKs DATA frames when told to, and restarts
the node's process when it ends with the unix board's reset code (75), as a supervisor would.
Bundles are real: `lantern release keygen` and `lantern release build` make them, from this
firmware tree compiled by mpy-cross; broken releases are the same files with one module
replaced, signed by release.bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import random
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path
from typing import Any

import pytest

from lantern.agent import protocol
from lantern.tools.field import nodelink as nl
from lantern.tools.field import provision_steps as ps
from lantern.tools.field import release
from lantern.tools.street.sim import SimNode

pytestmark = [pytest.mark.ota, pytest.mark.micropython]

NODE = "SL-0001"
BOARD = "unix-sim-lite"
OFFER, CHUNK, APPLY, ABORT, ROTATE = 9, 10, 11, 12, 13
E_REFUSED = 5
PIECE = 700  # head bytes per OFFER piece: a COMMAND must fit one 1024-byte frame


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A release key, its bundles (2.0.0 and 3.0.0 at floor 2, 1.0.0 at floor 1), and the
    files they hold, for variants."""
    d = tmp_path_factory.mktemp("release")
    cli = [sys.executable, "-m", "lantern", "release"]
    subprocess.run([*cli, "keygen", "--out", str(d / "rel")], check=True, capture_output=True)
    for v, floor in (("2.0.0", 2), ("1.0.0", 1)):
        subprocess.run([*cli, "build", "--key", str(d / "rel.pem"), "--version", v,
                        "--security-floor", str(floor), "--board", BOARD, "--out",
                        str(d / f"{v}.lub")], check=True, capture_output=True)
    key = release.load_private(d / "rel.pem")
    tool = ps.find_mpy_cross()
    found = ps.mpy_cross_version(tool)
    assert found is not None
    files = release.firmware_files(tool, [BOARD])
    return {"dir": d, "key": key, "pub": key.public_key().public_bytes_raw(), "mpy": found[1],
            "files": files, "v2": (d / "2.0.0.lub").read_bytes(),
            "v1": (d / "1.0.0.lub").read_bytes()}


def variant(rel: dict[str, Any], version: str, replace: dict[str, bytes] | None = None,
            key: Any = None, boards: tuple[str, ...] = (BOARD,), floor: int = 2) -> bytes:
    files = [(p, (replace or {}).get(p, b)) for p, b in rel["files"]]
    return release.bundle(key or rel["key"], version, floor, "0.1.0", list(boards), rel["mpy"],
                          files)


def compiled(rel: dict[str, Any], source: str, name: str) -> bytes:
    src = rel["dir"] / f"{name}.py"
    src.write_text(source)
    out = rel["dir"] / f"{name}.mpy"
    subprocess.run([ps.find_mpy_cross(), "-O2", "-o", str(out), "-s", f"node/{name}.py",
                    str(src)], check=True, capture_output=True)
    data: bytes = out.read_bytes()
    return data


def head_of(bundle: bytes) -> bytes:
    return bundle[:8 + int.from_bytes(bundle[4:8], "big")]


class Line:
    """The gateway's end of one node's UART: frames both ways over a pty."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.port = os.ttyname(self.slave)
        self.deframer = protocol.Deframer()
        self.replies: dict[int, dict[Any, Any]] = {}
        self.statuses: list[dict[Any, Any]] = []
        self.data: set[int] = set()
        self.acking = False
        self.answered = 0
        self.arrived = asyncio.Event()
        self.counter = int(time.time() * 1000)
        self.out = bytearray()

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.master)
        loop.remove_writer(self.master)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return
        for chunk in self.deframer.feed(data):
            try:
                ftype, body = protocol.decode_frame(chunk or b"")
            except Exception:
                continue
            if ftype == protocol.DATA:
                seq = protocol.parse_mac0(body).seq
                self.data.add(seq)
                if self.acking:
                    self.send(protocol.encode_ack(self.key, NODE.encode(), [seq],
                                                  int(time.time() * 1000)))
            elif ftype == protocol.REPLY:
                self.answered += 1
                _, counter, payload = nl.unseal(self.key, body, protocol.REPLY)
                self.replies[counter] = payload
            elif ftype == protocol.STATUS:
                self.statuses.append(nl.unseal(self.key, body, protocol.STATUS)[2])
        self.arrived.set()

    def send(self, wire: bytes) -> None:
        self.out += wire
        self._flush()

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            n = os.write(self.master, self.out)
        except BlockingIOError:
            n = 0
        del self.out[:n]
        if self.out:
            loop.add_writer(self.master, self._flush)
        else:
            loop.remove_writer(self.master)

    def command(self, op: int, args: dict[int, Any] | None = None) -> int:
        self.counter += 1
        self.send(nl.command_frame(self.key, NODE, self.counter, op, args or {}))
        return self.counter

    async def reply(self, counter: int, timeout: float = 20) -> tuple[int, Any]:
        deadline = time.monotonic() + timeout
        while counter not in self.replies:
            self.arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no REPLY to command {counter}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)
        p = self.replies.pop(counter)
        return p[2], p[3]

    async def ask(self, op: int, args: dict[int, Any] | None = None,
                  timeout: float = 20) -> tuple[int, Any]:
        return await self.reply(self.command(op, args), timeout)


class Board:
    """A simulated node (SimNode: its street, key, state) on a Line, with a supervisor that
    starts it again when it resets (exit 75), and a power switch (SIGKILL)."""

    def __init__(self, tmp: Path, pub: bytes | None, heap: str | None = None,
                 **extra: Any) -> None:
        self.sim = SimNode(NODE, tmp, interval_ms=300, board=BOARD,
                           extra={"update_trial_s": 20, **extra})
        self.sim.write_config()
        if pub is not None:
            (self.sim.dir / "release.pub").write_bytes(pub)
        self.line = Line(self.sim.key)
        self.sim.port = self.line.port
        self.log = tmp / "node.log"
        self.boots = 0
        self.resets = 0
        self.heap = heap

    @property
    def fw(self) -> Path:
        return self.sim.state_dir / "fw"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.sim.start(stdout=out.fileno(), heap=self.heap)
        self.boots += 1

    def alive(self) -> bool:
        return self.sim.proc is not None and self.sim.proc.poll() is None

    def supervise(self) -> None:
        """Start the node again if it reset itself (and only then)."""
        p = self.sim.proc
        if p is not None and p.poll() is not None:
            assert p.returncode == 75, f"node ended with {p.returncode}:\n{self.tail()}"
            self.resets += 1
            self.start()

    def power_cut(self) -> None:
        self.sim.kill(signal.SIGKILL)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def ask(self, op: int, args: dict[int, Any] | None = None,
                  timeout: float = 30) -> tuple[int, Any]:
        """A command, answered even across a reset (it is sent again to the new process)."""
        deadline = time.monotonic() + timeout
        while True:
            self.supervise()
            try:
                return await self.line.ask(op, args, timeout=min(0.5, timeout))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no answer to op {op}:\n{self.tail()}") from None

    async def status(self) -> dict[str, Any]:
        code, st = await self.ask(1)
        assert code == 0, st
        status: dict[str, Any] = st
        return status

    async def offer(self, bundle: bytes) -> tuple[int, Any]:
        """The head in pieces that fit a frame; the node's answer to the last one."""
        head = head_of(bundle)
        at = 0
        while True:
            code, res = await self.ask(OFFER, {1: head[at:at + PIECE], 2: at})
            if code != 0 or 4 not in res:
                return code, res
            at = res[4]

    async def transfer(self, bundle: bytes, window: int = 4) -> tuple[int, Any]:
        """OFFER, then CHUNKs from the node's `have` (up to `window` outstanding)."""
        code, res = await self.offer(bundle)
        if code != 0:
            return code, res
        have, total, most = res[1], res[2], res[3]
        area = bundle[len(head_of(bundle)):]
        assert total == len(area)
        while have < total:
            sent: list[tuple[int, int]] = []
            at = have
            while len(sent) < window and at < total:
                sent.append((self.line.command(CHUNK, {1: at, 2: area[at:at + most]}),
                             min(at + most, total)))
                at += most
            for counter, expect in sent:
                code, res = await self.line.reply(counter)
                if code != 0:
                    return code, res
                have = res[1]
                if have != expect:
                    break
        return 0, {1: have, 2: total}

    async def wait(self, cond: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.supervise()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self.sim.close()
        self.line.close()


@contextlib.asynccontextmanager
async def board(tmp: Path, pub: bytes | None,  # type: ignore[no-untyped-def]
                heap: str | None = None, **extra: Any):
    b = Board(tmp, pub, heap, **extra)
    b.line.start()
    try:
        b.start()
        yield b
    finally:
        b.close()


def refused_counts(st: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in st["upd"].get("refused", {}).items() if v}


async def test_offer_chunk_apply_gives_a_node_running_the_new_release(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    async with board(tmp_path, rel["pub"]) as b:
        st = await b.status()
        assert st["upd"]["state"] == "idle" and st["fw"] != "2.0.0"
        code, res = await b.transfer(rel["v2"])
        assert code == 0 and res[1] == res[2], res
        st = await b.status()
        assert st["upd"]["state"] == "staging" and st["upd"]["have"] == res[2]
        assert (await b.ask(APPLY)) == (0, {1: "2.0.0"})
        await b.wait(lambda: b.resets == 1, "the node to reset into the candidate")
        st = await b.status()
        assert st["fw"] == "2.0.0" and "/fw/a/node/" in st["fw_file"], st
        assert st["upd"]["state"] == "candidate", st["upd"]
        assert not (b.fw / "floor").exists()
        # it samples and a pack of this boot is ACKed: confirmed, floor raised
        b.line.acking = True
        await b.wait(lambda: (b.fw / "floor").exists(), "the candidate to confirm itself")
        st = await b.status()
        assert st["upd"] == {"state": "confirmed", "version": "2.0.0", "have": 0,
                             "reason": None}, st["upd"]
        assert (b.fw / "floor").read_text() == "2"
        # a replayed older bundle, validly signed, is below the floor now
        code, res = await b.offer(rel["v1"])
        assert code == E_REFUSED and res[1] == "below_floor", (code, res)
        assert refused_counts(await b.status()) == {"below_floor": 1}
        # the confirmed release is what boots after a power cut
        b.power_cut()
        b.start()
        st = await b.status()
        assert (st["fw"], st["upd"]["state"]) == ("2.0.0", "confirmed")
        assert "/fw/a/node/" in st["fw_file"] and b.resets == 1


async def test_a_transfer_resumes_where_a_power_cut_left_it(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    async with board(tmp_path, rel["pub"]) as b:
        code, res = await b.offer(rel["v2"])
        assert code == 0 and res[1] == 0, res
        area = rel["v2"][len(head_of(rel["v2"])):]
        have = 0
        while have < len(area) * 2 // 5:
            code, res = await b.ask(CHUNK, {1: have, 2: area[have:have + 768]})
            assert code == 0, res
            have = res[1]
        # a chunk at the wrong offset writes nothing and says where the node is
        assert await b.ask(CHUNK, {1: have + 768, 2: area[:768]}) == (0, {1: have})
        b.power_cut()
        b.start()
        code, res = await b.ask(CHUNK, {1: 0, 2: area[:768]})
        assert (code, res[1]) == (E_REFUSED, "no_offer"), res
        code, res = await b.offer(rel["v2"])
        assert code == 0 and res[1] == have, (have, res)  # every byte staged is kept
        code, res = await b.transfer(rel["v2"])
        assert code == 0 and res[1] == len(area)
        assert (await b.ask(APPLY)) == (0, {1: "2.0.0"})
        await b.wait(lambda: b.resets == 1, "the reset into the candidate")
        assert (await b.status())["fw"] == "2.0.0"


async def test_bundles_a_node_must_not_run_are_refused_and_counted(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    flipped = bytearray(rel["v2"])
    files = rel["files"]
    app_at = len(head_of(rel["v2"])) + sum(len(b) for p, b in files[:[p for p, _ in files]
                                                                      .index("node/app.mpy")])
    flipped[app_at + 100] ^= 0x01  # one bit of node/app.mpy: the signed manifest is intact
    async with board(tmp_path, None) as b:
        code, res = await b.offer(rel["v2"])
        assert code == E_REFUSED and res[1] == "no_release_key", res
        (b.sim.dir / "release.pub").write_bytes(rel["pub"])
        other = variant(rel, "2.0.1", key=Ed25519PrivateKey.generate())
        code, res = await b.offer(other)
        assert code == E_REFUSED and res[1] == "other_key", res
        code, res = await b.offer(variant(rel, "2.0.2", boards=("esp32-devkitc",)))
        assert code == E_REFUSED and res[1] == "other_board", res
        code, res = await b.transfer(bytes(flipped))
        assert code == E_REFUSED and res[1] == "file" and "node/app.mpy" in res[2], res
        app_start = app_at - len(head_of(rel["v2"]))
        assert res[3] == app_start  # the file is dropped: the gateway resends it from there
        # the good bundle has the same files but app.mpy: the staged ones are kept
        code, res = await b.offer(rel["v2"])
        assert code == 0 and res[1] == app_start, res
        assert await b.ask(APPLY) == (E_REFUSED, {1: "incomplete", 2: ANY_TEXT, 3: app_start})
        st = await b.status()
        assert refused_counts(st) == {"no_release_key": 1, "other_key": 1, "other_board": 1,
                                      "bad_hash": 1, "file": 1, "incomplete": 1}, st["upd"]
        assert st["fw"] != "2.0.0" and st["upd"]["state"] == "staging"
        assert await b.ask(ABORT) == (0, {})
        assert not (b.fw / "a").exists()


async def test_an_update_larger_than_the_flash_beside_the_outbox_is_refused(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    async with board(tmp_path, rel["pub"], update_reserve_blocks=10**12) as b:
        code, res = await b.offer(rel["v2"])
        assert code == E_REFUSED and res[1] == "space", res
        assert "blocks" in res[2] and refused_counts(await b.status()) == {"space": 1}


async def test_a_candidate_that_raises_at_boot_rolls_back_by_itself(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    broken = variant(rel, "2.1.0", {"node/app.mpy": compiled(
        rel, "raise RuntimeError('bad release')\n", "app")})
    async with board(tmp_path, rel["pub"]) as b:
        before = (await b.status())["fw"]
        code, res = await b.transfer(broken)
        assert code == 0, res
        assert (await b.ask(APPLY)) == (0, {1: "2.1.0"})
        await b.wait(lambda: b.resets == 1, "the reset into the candidate")
        st = await b.status()
        assert st["fw"] == before and "/fw/" not in st["fw_file"], st
        assert st["upd"]["state"] == "rolled_back" and st["upd"]["version"] == "2.1.0"
        assert st["upd"]["reason"].startswith("boot_exception: RuntimeError"), st["upd"]
        assert b.resets == 1  # left within the same boot, no second reset


async def test_a_candidate_that_never_gets_an_ack_rolls_back_after_its_trial(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    async with board(tmp_path, rel["pub"], update_trial_s=3) as b:
        before = (await b.status())["fw"]
        code, res = await b.transfer(rel["v2"])
        assert code == 0, res
        assert (await b.ask(APPLY)) == (0, {1: "2.0.0"})
        await b.wait(lambda: b.resets == 2, "the candidate's trial to end (a second reset)")
        st = await b.status()
        assert st["fw"] == before and "/fw/" not in st["fw_file"], st
        assert st["upd"]["state"] == "rolled_back", st["upd"]
        assert st["upd"]["reason"].startswith("no_ack"), st["upd"]
        assert not (b.fw / "floor").exists()  # the floor rises only with a confirmation


CUTS = 100


async def _update_to_the_end(b: Board, bundle: bytes, version: str) -> None:
    """The gateway's whole job, from wherever the node is: transfer, APPLY, confirmation."""
    while True:
        st = await b.status()
        upd = st["upd"]
        if upd["state"] == "confirmed" and st["fw"] == version:
            return
        if upd["state"] == "candidate" and upd["version"] == version:
            await asyncio.sleep(0.1)  # on trial: it confirms itself once a pack is ACKed
            continue
        code, res = await b.transfer(bundle)
        assert code == 0, res
        resets = b.resets
        code, res = await b.ask(APPLY)
        assert code == 0, res
        await b.wait(lambda r=resets: b.resets > r, "the reset into the candidate", timeout=10)


async def test_a_hundred_power_cuts_in_transfer_and_switch_leave_a_node_that_finishes(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    rng = random.Random(16)
    releases = [("2.0.0", rel["v2"]), ("2.0.3", variant(rel, "2.0.3"))]
    finished: list[str] = []
    async with board(tmp_path, rel["pub"]) as b:
        b.line.acking = True
        cuts = 0
        while True:
            version, bundle = releases[len(finished) % 2]
            job = asyncio.create_task(_update_to_the_end(b, bundle, version))
            if cuts == CUTS:
                await asyncio.wait_for(job, 60)
                finished.append(version)
                break
            # a cut after a random number of answers: none (the node still boots: the
            # switch, a candidate's first boot) or a few (OFFER, CHUNKs, APPLY, the trial)
            target = b.line.answered + rng.randint(0, 6)
            if target == b.line.answered:
                await asyncio.sleep(rng.uniform(0, 0.4))
            else:
                await b.wait(lambda t=target, j=job: b.line.answered >= t or j.done(),
                             "answers")
            if job.done():
                job.result()
                finished.append(version)  # the update finished between cuts: the next one
                continue
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
            b.supervise()
            b.power_cut()
            cuts += 1
            b.start()
            b.line.replies.clear()
        st = await b.status()
        assert (st["fw"], st["upd"]["state"]) == (finished[-1], "confirmed"), st
        log = b.log.read_text(errors="replace")
        versions = {line.split(" firmware ")[1].split(":")[0]
                    for line in log.splitlines() if line.startswith("lantern node ")}
        assert versions <= {"0.1.0", "2.0.0", "2.0.3"}, versions
        assert "Traceback" not in log
        rolled = log.count("rolled back")
        print(f"{cuts} power cuts, {b.boots} boots, {b.resets} resets, updates finished: "
              f"{finished}, candidates rolled back: {rolled}")


async def test_a_release_key_rotation_takes_over_once_the_new_key_signs_a_bundle(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    new, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    new_pub = new.public_key().public_bytes_raw()
    by_new = variant(rel, "2.0.6", key=new)
    async with board(tmp_path, rel["pub"]) as b:
        key = b.sim.dir / "release.pub"
        # a stolen gateway (or anyone without the release key) cannot rotate it
        code, res = await b.ask(ROTATE, {1: release.rotation(other, new.public_key())})
        assert code == E_REFUSED and res[1] == "other_key", res
        code, res = await b.offer(by_new)
        assert code == E_REFUSED and res[1] == "other_key", res
        code, res = await b.ask(ROTATE, {1: release.rotation(rel["key"], new.public_key())})
        assert (code, res) == (0, {1: release.key_id(new.public_key())}), res
        # until the new key has signed a bundle that verifies, the old key stays
        assert key.read_bytes() == rel["pub"]
        assert (b.sim.dir / "release.pub.next").read_bytes() == new_pub
        code, res = await b.offer(rel["v2"])
        assert code == 0, res
        b.power_cut()  # the pending key is on flash
        b.start()
        code, res = await b.offer(by_new)
        assert code == 0, res
        assert key.read_bytes() == new_pub and not (b.sim.dir / "release.pub.next").exists()
        # the old key's bundles, and its rotations, are refused from now on
        code, res = await b.offer(rel["v2"])
        assert code == E_REFUSED and res[1] == "other_key", res
        code, res = await b.ask(ROTATE, {1: release.rotation(rel["key"], other.public_key())})
        assert code == E_REFUSED and res[1] == "other_key", res
        assert refused_counts(await b.status()) == {"other_key": 2}  # since the power cut
        code, res = await b.transfer(by_new)
        assert code == 0 and res[1] == res[2], res
        assert (await b.ask(APPLY)) == (0, {1: "2.0.6"})
        await b.wait(lambda: b.resets == 1, "the reset into the candidate")
        assert (await b.status())["fw"] == "2.0.6"


OFFERS = 20


async def test_offers_fit_the_lite_boards_own_heap_while_it_samples_and_is_acked(
        tmp_path: Path, rel: dict[str, Any]) -> None:
    """At the board's shipped heap (boards/unix-sim-lite.json, 192 KB), with the node sampling
    and its packs ACKed, every OFFER of a valid bundle is accepted and the whole bundle
    staged: never a MemoryError (E_FAIL)."""
    async with board(tmp_path, rel["pub"]) as b:
        b.line.acking = True
        await b.wait(lambda: len(b.line.data) >= 2, "packs")
        for i in range(OFFERS):
            if i % 5 == 4:
                b.power_cut()  # a fresh heap now and then: a new boot, then an OFFER
                b.start()
            code, res = await b.offer(rel["v2"])
            assert code == 0, (i, code, res, b.tail())
        try:
            code, res = await b.transfer(rel["v2"])
        except TimeoutError as e:
            raise AssertionError(f"{e}:\n{b.tail()}") from None
        assert code == 0 and res[1] == res[2], res
        seen = len(b.line.data)
        await b.wait(lambda: len(b.line.data) >= seen + 2, "packs after the transfer")
        log = b.log.read_text(errors="replace")
        free = [int(x.split("heap free ")[1]) for x in log.splitlines()
                if x.startswith("update: checking an offer, heap free ")]
        assert len(free) >= OFFERS and "MemoryError" not in log, log[-3000:]
        print(f"{len(free)} offers at the board's heap: free when the check starts "
              f"{min(free)}..{max(free)} bytes")


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)


ANY_TEXT = _AnyText()
