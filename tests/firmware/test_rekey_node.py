"""Key rotation and remote configuration on a real node (MicroPython unix port, pty link).

The test takes the gateway's place on the node's line: it sends REKEY / REKEY_COMMIT /
CONFIG COMMANDs (docs/protocol.md "Key rotation and configuration") under the key it believes
current, checks every frame the node sends against the old and the new key, and ACKs when
told to. Power cuts are SIGKILLs of the node's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import stat
import time
import tty
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lantern.agent import fleetops, protocol
from lantern.tools.field import nodelink as nl
from lantern.tools.street.sim import SimNode

pytestmark = [pytest.mark.fleet, pytest.mark.micropython]

NODE = "SL-0001"
REKEY, COMMIT, CONFIG = 14, 15, 16
E_ARG = 2
R_BAD_MAC = 2


def new_key(shared: bytes, old: bytes, version: int) -> bytes:
    """The contract's derivation, computed independently of the firmware, and as the gateway
    computes it (agent/fleetops.py): the three must agree."""
    info = b"lantern rekey v1" + NODE.encode() + version.to_bytes(4, "big")
    key = HKDF(hashes.SHA256(), len(old), old, info).derive(shared)
    assert fleetops.derive(shared, old, NODE, version) == key
    return key


class Line:
    """The gateway's end of the node's UART; frames checked under every key it knows."""

    def __init__(self, key: bytes) -> None:
        self.keys = [key]  # oldest first; commands go out under self.key
        self.key = key
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.port = os.ttyname(self.slave)
        self.deframer = protocol.Deframer()
        self.replies: dict[int, tuple[int, dict[Any, Any]]] = {}  # counter -> (key idx, msg)
        self.statuses: list[tuple[int, dict[Any, Any]]] = []
        self.data: dict[int, int] = {}  # seq -> index of the key it verified under
        self.acking = False
        self.arrived = asyncio.Event()
        self.counter = int(time.time() * 1000)

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _which(self, body: bytes, ftype: int) -> tuple[int, Any]:
        for i, k in enumerate(self.keys):
            try:
                if ftype == protocol.DATA:
                    m = protocol.parse_mac0(body)
                    protocol.verify_mac0(k, m)
                    return i, m.seq
                return i, nl.unseal(k, body, ftype)
            except Exception:  # not under this key: try the next
                continue
        raise AssertionError(f"frame type {ftype} verifies under no key")

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return
        for chunk in self.deframer.feed(data):
            try:
                ftype, body = protocol.decode_frame(chunk or b"")
            except Exception:  # line noise of a starting node
                continue
            i, got = self._which(body, ftype)
            if ftype == protocol.DATA:
                self.data[got] = i
                if self.acking:
                    os.write(self.master, protocol.encode_ack(
                        self.key, NODE.encode(), [got], int(time.time() * 1000)))
            elif ftype == protocol.REPLY:
                self.replies[got[1]] = (i, got[2])
            elif ftype == protocol.STATUS:
                self.statuses.append((i, got[2]))
        self.arrived.set()

    def command(self, op: int, args: dict[int, Any] | None = None,
                key: bytes | None = None) -> int:
        self.counter += 1
        os.write(self.master, nl.command_frame(key or self.key, NODE, self.counter, op,
                                               args or {}))
        return self.counter

    async def until(self, cond: Any, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)

    async def ask(self, op: int, args: dict[int, Any] | None = None,
                  key: bytes | None = None) -> tuple[int, int, Any]:
        """(index of the key the REPLY verified under, code, result)."""
        c = self.command(op, args, key)
        await self.until(lambda: c in self.replies, f"the REPLY to op {op}")
        i, msg = self.replies.pop(c)
        return i, msg[2], msg[3]


class Node:
    def __init__(self, tmp: Path) -> None:
        self.sim = SimNode(NODE, tmp, interval_ms=300, board="unix-sim-lite")
        self.sim.write_config()
        self.line = Line(self.sim.key)
        self.sim.port = self.line.port
        self.sim.write_config()
        # the node's own node.json is what it boots from: the sim must not rewrite it
        self.cfg_path = self.sim.dir / "node.json"
        self.sim.write_config = lambda: self.cfg_path  # type: ignore[method-assign]
        self.log = tmp / "node.log"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.sim.start(stdout=out.fileno())

    def power_cut(self) -> None:
        self.sim.kill(signal.SIGKILL)

    async def status(self, timeout: float = 20) -> tuple[int, dict[str, Any]]:
        """STATUS, asked again each second: a booting node misses what came before it."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.line.command(1)
            with contextlib.suppress(AssertionError):
                await self.line.until(lambda c=c: c in self.line.replies, "", 1)
                i, msg = self.line.replies.pop(c)
                assert msg[2] == 0, msg
                return i, msg[3]
            assert time.monotonic() < deadline, "no STATUS reply"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextlib.asynccontextmanager
async def node(tmp: Path):  # type: ignore[no-untyped-def]
    n = Node(tmp)
    n.line.start()
    try:
        n.start()
        await n.status()  # booted and listening
        yield n
    except BaseException:
        print(n.tail())
        raise
    finally:
        n.sim.close()
        n.line.close()


async def test_rekey_commit_moves_every_frame_to_the_new_key(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        line = n.line
        old = line.key
        await line.until(lambda: len(line.data) >= 3, "DATA frames under the old key")
        gw = X25519PrivateKey.generate()
        gw_pub = gw.public_key().public_bytes_raw()
        i, code, res = await line.ask(REKEY, {1: gw_pub, 2: 1})
        assert (i, code, res[2]) == (0, 0, 1), res
        node_pub = res[1]
        assert len(node_pub) == 32
        # a lost REPLY asked again: the same answer, nothing new
        assert await line.ask(REKEY, {1: gw_pub, 2: 1}) == (0, 0, {1: node_pub, 2: 1})
        key = new_key(gw.exchange(X25519PublicKey.from_public_bytes(node_pub)), old, 1)
        assert key != old
        # still sealing under the old key while the key is only pending
        i, st = await n.status()
        assert i == 0 and st["key_version"] == 0 and st["config_version"] == 0
        assert st["held"] == 0
        line.keys.append(key)
        i, code, res = await line.ask(COMMIT, {2: 1})
        assert (i, code) == (1, 0), "the REPLY to COMMIT is sealed with the new key"
        first = res[3]
        assert res[2] == 1
        line.key = key
        # ACKs under the new key take every frame, those sealed under the old key included
        line.acking = True
        await line.until(lambda: any(s >= first + 2 for s in line.data), "DATA under the new key")
        assert all(k == (s >= first) for s, k in line.data.items()), line.data
        # the gateway lost that REPLY: asked again under the old key, the same answer, and the
        # floor stays where it was (an old-key counter far ahead, as a thief of the old key
        # would send, locks nobody out)
        # (no COMMAND under the new key before it: the first one retires the old key)
        line.counter += 1 << 40
        assert await line.ask(COMMIT, {2: 1}, key=old) == (1, 0, {2: 1, 3: first})
        line.counter -= 1 << 40
        # nothing else is obeyed under the old key: refused with a STATUS under the new one
        line.statuses.clear()
        line.command(1, key=old)
        await line.until(lambda: line.statuses, "the refusal")
        assert line.statuses[-1][0] == 1 and line.statuses[-1][1][5] == R_BAD_MAC
        # the first COMMAND under the new key passes (retiring the old key: see the end)
        assert await line.ask(COMMIT, {2: 1}) == (1, 0, {2: 1, 3: first})
        i, st = await n.status()
        assert st["cmd"]["floor"] == line.counter, st["cmd"]  # this STATUS's, far below 2^40
        # an old version again, or a commit with nothing pending: refused
        assert (await line.ask(REKEY, {1: gw_pub, 2: 1}))[1] == E_ARG
        assert (await line.ask(COMMIT, {2: 2}))[1] == E_ARG
        i, st = await n.status()
        assert i == 1 and st["key_version"] == 1
        i, st = await n.status()
        assert st["link"]["acked"] >= first and st["link"]["bad_acks"] == 0, st["link"]
        # on flash: the new key in the key file, owner-only like the provisioned one
        key_file = n.sim.dir / "node.key"
        assert bytes.fromhex(key_file.read_text()) == key
        for f in (key_file, n.sim.state_dir / "key.rk"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        # a power cut and a boot: the same key, its version, the old key still retired (the
        # first COMMAND under the new key retired it): not even its COMMIT passes
        n.power_cut()
        n.start()
        i, st = await n.status()
        assert i == 1 and st["key_version"] == 1, st
        line.statuses.clear()
        line.command(COMMIT, {2: 1}, key=old)
        await line.until(lambda: line.statuses, "the refusal")
        assert line.statuses[-1][1][5] == R_BAD_MAC
        assert await line.ask(COMMIT, {2: 1}) == (1, 0, {2: 1, 3: first})


async def test_a_second_rotation_forgets_the_first_key(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        line = n.line
        keys = [line.key]
        for v in (1, 2):
            gw = X25519PrivateKey.generate()
            gw_pub = gw.public_key().public_bytes_raw()
            # a first offer replaced by another for the same version: the last one counts
            other = X25519PrivateKey.generate().public_key().public_bytes_raw()
            assert (await line.ask(REKEY, {1: other, 2: v}))[1] == 0
            _, code, res = await line.ask(REKEY, {1: gw_pub, 2: v})
            assert code == 0
            key = new_key(gw.exchange(X25519PublicKey.from_public_bytes(res[1])), line.key, v)
            line.keys.append(key)
            assert (await line.ask(COMMIT, {2: v}))[:2] == (len(keys), 0)
            line.key = key
            keys.append(key)
        i, st = await n.status()
        assert i == 2 and st["key_version"] == 2
        # the provisioned key no longer passes, not even for a commit
        line.statuses.clear()
        line.command(COMMIT, {2: 2}, key=keys[0])
        await line.until(lambda: line.statuses, "the refusal")
        assert line.statuses[-1] == (2, line.statuses[-1][1]) and line.statuses[-1][1][5] == 2
        assert keys[0].hex() not in (n.sim.dir / "node.key").read_text()


async def test_bad_rekey_arguments_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        line = n.line
        pub = X25519PrivateKey.generate().public_key().public_bytes_raw()
        for args in ({1: pub[:31], 2: 1}, {1: pub, 2: 0}, {1: pub}, {1: "x", 2: 1},
                     {1: bytes(32), 2: 1}, {1: (1).to_bytes(32, "little"), 2: 1},
                     {1: pub, 2: 1 << 32}):
            _, code, res = await line.ask(REKEY, args)
            assert code == E_ARG and "error" in res, (args, res)
        assert (await line.ask(COMMIT, {2: 1}))[1] == E_ARG
        assert (await line.ask(COMMIT, {}))[1] == E_ARG
        i, st = await n.status()
        assert i == 0 and st["key_version"] == 0
        assert not (n.sim.state_dir / "key.rk").exists()


async def test_config_is_checked_written_applied_and_versioned(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        line = n.line
        for settings, name in (({"interval_ms": 999}, "interval_ms"),
                               ({"bogus": 1}, "bogus"),
                               ({"offsets": {"pressure": 1}}, "offsets.pressure"),
                               ({"offsets": {"temperature": 99}}, "offsets.temperature"),
                               ({"kappa": 1.6}, "kappa"), ({"window": 9}, "window"),
                               ({"max_untimed": 4097}, "max_untimed"),
                               ({"window": True}, "window")):
            _, code, res = await line.ask(CONFIG, {1: 1, 2: settings})
            assert code == E_ARG and res["error"].startswith(name), (settings, res)
        settings = {"interval_ms": 1500, "offsets": {"temperature": -0.5, "sound": 1.5},
                    "kappa": 0.3, "max_untimed": 100, "window": 2}
        assert await line.ask(CONFIG, {1: 3, 2: settings}) == (0, 0, {1: 3})
        cfg = json.loads(n.cfg_path.read_text())
        assert cfg["config_version"] == 3 and cfg["interval_ms"] == 1500
        assert cfg["offsets"] == {"temperature": -0.5, "LAeq": 1.5, "LAmax": 1.5}
        assert cfg["corrections"]["kappa"] == 0.3 and cfg["max_untimed"] == 100
        assert cfg["link"]["window"] == 2 and cfg["id"] == NODE
        _, st = await n.status()
        assert st["config_version"] == 3 and st["cfg"]["interval_ms"] == 1500
        assert st["link"]["window"] == 2
        # the same version again, or an older one: OK with the current one, nothing changed
        assert await line.ask(CONFIG, {1: 3, 2: {"interval_ms": 5000}}) == (0, 0, {1: 3})
        assert await line.ask(CONFIG, {1: 2, 2: {"bogus": 1}}) == (0, 0, {1: 3})
        assert json.loads(n.cfg_path.read_text()) == cfg
        # kept across a power cut
        n.power_cut()
        n.start()
        _, st = await n.status()
        assert st["config_version"] == 3 and st["cfg"]["interval_ms"] == 1500
