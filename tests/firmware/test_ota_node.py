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
OFFER, CHUNK, APPLY, ABORT = 9, 10, 11, 12
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
    return out.read_bytes()


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

    def __init__(self, tmp: Path, pub: bytes | None, **extra: Any) -> None:
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

    @property
    def fw(self) -> Path:
        return self.sim.state_dir / "fw"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.sim.start(stdout=out.fileno())
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
                return await self.line.ask(op, args, timeout=min(3, timeout))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no answer to op {op}:\n{self.tail()}") from None

    async def status(self) -> dict[str, Any]:
        code, st = await self.ask(1)
        assert code == 0, st
        return st

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
            sent = []
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
async def board(tmp: Path, pub: bytes | None, **extra: Any):  # type: ignore[no-untyped-def]
    b = Board(tmp, pub, **extra)
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
        t0 = time.monotonic()
        code, res = await b.transfer(rel["v2"])
        took = time.monotonic() - t0
        assert code == 0 and res[1] == res[2], res
        st = await b.status()
        assert st["upd"]["state"] == "staging" and st["upd"]["have"] == res[2]
        code, res = await b.ask(APPLY)
        assert (code, res) == (0, {1: "2.0.0"})
        await b.wait(lambda: b.resets == 1, "the node to reset into the candidate")
        st = await b.status()
        assert st["fw"] == "2.0.0" and "/fw/a/node/" in st["fw_file"], st
        assert st["upd"]["state"] == "candidate", st["upd"]
        print(f"transfer of {len(rel['v2'])} bytes took {took:.2f} s")
