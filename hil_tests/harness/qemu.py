"""Nodes on the QEMU board: the frozen firmware image under qemu-system-arm, wired like the others.

QEMU opens three pty slaves of ours as the board's UARTs. UART1 (the link) is the node side of
an ordinary `Relay`, so the gateway, the wire taps and the fault injection are the very ones the
unix nodes use. UART0 (the REPL) is a `Console`: the harness keeps everything the board prints,
and mpremote attaches to its other end to provision the board and to inspect it. UART2 carries
the sensor buses to the node's simulated street (firmware/sim), as a socket does for unix nodes.

Run `python -m hil_tests.qemu` for the board's memory and timing figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from lantern.agent import protocol
from lantern.agent.config import write_secret
from lantern.tools.street.sim import BOARDS, FIRMWARE, MP_EXTMOD, ROOT, Relay, SimNode

from .topology import Topology

QEMU_IMAGE = ROOT / ".build/qemu/firmware.elf"
QEMU_BOARD = "qemu-mps2-an385"
QEMU_TOOLS = ("qemu-system-arm", "arm-none-eabi-gcc")
UNAVAILABLE = ROOT / ".build/qemu/UNAVAILABLE"  # written by `make` when apt could not install
PROMPT = b"\r\n>>> "
# Board time is instructions x 8 ns (a 125 MIPS core) while it computes, host time while it
# sleeps (WFI); align=on holds the board back when it computes faster than that, so its clock
# keeps pace with the host's. Cycle times are then the firmware's work, not the host's load;
# with shift=auto QEMU rescales instruction time with the host's speed (docs/qemu.md).
ICOUNT = "shift=3,sleep=on,align=on"


def missing_tools() -> list[str]:
    return [t for t in QEMU_TOOLS if shutil.which(t) is None]


def require_qemu() -> None:
    """Skip where the Makefile could not install QEMU (it says so loudly there); fail where
    the tools or the image are missing."""
    import pytest

    if UNAVAILABLE.exists():
        pytest.skip(f"QEMU tier unavailable: {UNAVAILABLE.read_text().strip()}")
    assert not missing_tools(), f"missing {missing_tools()}: run `make qemu-image`"
    assert QEMU_IMAGE.exists(), f"{QEMU_IMAGE} missing: run `make qemu-image`"


def qemu_argv(image: Path, console: str, link: str, street: str) -> list[str]:
    """QEMU with UART0-2 on the given ttys: REPL, node link, sensor buses."""
    return ["qemu-system-arm", "-machine", "mps2-an385", "-nographic", "-monitor", "none",
            "-semihosting", "-icount", ICOUNT, "-kernel", str(image),
            "-serial", console, "-serial", link, "-serial", street]


class Console(Relay):
    """The board's REPL UART: output is kept here; mpremote attaches to `port` when needed."""

    def __init__(self, name: str) -> None:
        super().__init__(name, tap=self._keep)
        self.text = bytearray()
        self.attached = False

    @property
    def port(self) -> str:
        return self.gateway_port

    def _keep(self, direction: str, data: bytes) -> None:
        if direction == "up":
            self.text += data

    def _write(self, dst: int, data: bytes) -> None:
        # Unattached, the board's output only goes to `text`: mpremote must not find old
        # output waiting when it opens the port.
        if dst == self.gw_master and not self.attached:
            return
        super()._write(dst, data)

    def type(self, data: bytes) -> None:
        """Keys pressed on the board's REPL (Ctrl-D = b"\\x04")."""
        super()._write(self.node_master, data)

    async def expect(self, pattern: bytes, timeout: float, since: int = 0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, since)
            if m:
                return m
            if time.monotonic() > deadline:
                tail = bytes(self.text[-1500:]).decode(errors="replace")
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout}s:\n{tail}")
            await asyncio.sleep(0.02)


class StreetBridge:
    """The board's UART2 ↔ the simulated street's socket: its sensor buses reach the chips.

    The street (firmware/sim/serve.py, one per node, started as for a unix node) answers one
    bus transaction at a time, so little is ever in flight and plain writes keep up.
    """

    def __init__(self, street_name: str) -> None:
        self.master, self._slave = pty.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect("\0" + street_name)  # a new connection: the chips power up

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.master, self._to_street)
        loop.add_reader(self.sock, self._to_board)

    def _to_street(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EIO):
                return
            raise
        self.sock.sendall(data)

    def _to_board(self) -> None:
        data = self.sock.recv(4096)
        if not data:  # the street is gone; the board's bus calls time out and are flagged
            asyncio.get_running_loop().remove_reader(self.sock)
            return
        os.write(self.master, data)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.master)
        loop.remove_reader(self.sock)
        self.sock.close()
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


async def mpremote(console: Console, *args: str, timeout: float = 60) -> str:
    """Run mpremote against the board (without blocking the loop that relays its UARTs)."""
    console.attached = True
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mpremote", "connect", console.port, *args,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"mpremote {' '.join(args)}: no answer in {timeout}s") from None
    finally:
        console.attached = False
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise AssertionError(f"mpremote {' '.join(args)} failed ({proc.returncode}):\n{text}")
    return text


@dataclass
class QemuNode(SimNode):
    """A node whose MicroPython is the frozen QEMU image: provisioned over mpremote at start.

    Its flash is RAM inside QEMU: every start is a factory-fresh board, so the configuration
    (node.json, node.key, board.json) is copied onto its littlefs with `mpremote fs cp`, then a
    soft reset (Ctrl-D at the REPL) runs main.py as on an ESP32.
    """

    board: str = QEMU_BOARD
    image: Path = QEMU_IMAGE
    console: Console | None = None
    bridge: StreetBridge | None = None
    ready: asyncio.Future[None] | None = None
    _boot: asyncio.Task[None] | None = None

    @property
    def device_dir(self) -> Path:
        return self.dir / "device"

    @property
    def log_path(self) -> Path:
        return self.dir / "qemu.log"

    def write_config(self) -> Path:
        """The files provisioning puts on the board, under device_dir; returns its node.json.

        The host-side node.json (SimNode's) stays: it is the simulated street's config.
        """
        super().write_config()  # the key, created once and kept
        dev = self.device_dir
        dev.mkdir(parents=True, exist_ok=True)
        cfg = {
            "id": self.node_id,
            "key_file": "node.key",
            "board": "board.json",
            "state_dir": "state",
            "interval_ms": self.interval_ms,
            "link": {"port": "uart1", "baud": 115200, "rto_ms": 500},
            "sim": {**self.scenario, "uart": "uart2"},
            **self.extra,
        }
        write_secret(dev / "node.key", self.key.hex() + "\n")
        shutil.copyfile(BOARDS / f"{self.board}.json", dev / "board.json")
        (dev / "node.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return dev / "node.json"

    def start(self, stdout: int | None = None, heap: str | None = None) -> subprocess.Popen[bytes]:
        """Power the board on; provisioning and boot continue on the running loop (`ready`)."""
        if not self.image.exists():
            raise FileNotFoundError(f"{self.image} is missing: run `make qemu-image` first")
        if self.proc is not None:
            self.kill()
        self.write_config()
        self.start_street(self.dir / "node.json",
                          {"MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}", "PATH": os.environ["PATH"]})
        if self.bridge is not None:
            self.bridge.close()
        self.bridge = StreetBridge(self.street_name)
        self.bridge.start()
        if self.console is None:
            self.console = Console(f"{self.node_id}-console")
            self.console.start()
        self.console.text.clear()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                qemu_argv(self.image, self.console.node_port, self.port, self.bridge.port),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self._boot = loop.create_task(self._provision_and_run())
        return self.proc

    async def _provision_and_run(self) -> None:
        assert self.console is not None and self.ready is not None
        try:
            # A blank board: main.py finds no node.json and drops to the REPL.
            await self.console.expect(PROMPT, 30)
            dev = self.device_dir
            await self.mpremote(*cp_args([dev / "node.json", dev / "node.key",
                                          dev / "board.json"]))
            mark = len(self.console.text)
            self.console.type(b"\x04")  # soft reset at the friendly REPL: _boot.py, main.py
            await self.console.expect(rb"lantern node \S+ firmware", 30, since=mark)
            self.ready.set_result(None)
        except Exception as e:  # reported through `ready`, awaited by QemuTopology.start
            self.ready.set_exception(e)

    async def mpremote(self, *args: str, timeout: float = 60) -> str:
        assert self.console is not None
        return await mpremote(self.console, *args, timeout=timeout)

    def output(self) -> bytes:
        return bytes(self.console.text) if self.console else b""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._boot is not None and not self._boot.done():
            self._boot.cancel()
        super().kill(sig)

    def close(self) -> None:
        super().close()  # QEMU and the street
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None


@dataclass
class Board:
    """One factory-fresh QEMU board as an installer finds it: REPL on `console` (mpremote's
    port), the node's link on `link` (its gateway side), its sensor buses on UART2 bridged to
    a simulated street (firmware/sim). Provisioning it is the test's business (QemuNode does
    it for topologies)."""

    workdir: Path
    street_id: str = "SL-0042"  # the simulated street's node id (its chips do not care)
    console: Console = field(default_factory=lambda: Console("board-console"))
    link: Relay = field(default_factory=lambda: Relay("board-link"))
    proc: subprocess.Popen[bytes] | None = None
    street: SimNode | None = None
    bridge: StreetBridge | None = None

    async def power_on(self) -> None:
        # the chips around the board: the provisioned node.json keeps the HAL's defaults
        # (sensor buses on UART2, chips at real speed)
        self.street = SimNode(self.street_id, self.workdir / "street", scenario={"chip_speed": 1})
        self.street.start_street(self.street.write_config(), {
            "MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}", "PATH": os.environ.get("PATH", "")})
        self.bridge = StreetBridge(self.street.street_name)
        self.bridge.start()
        self.console.start()
        self.link.start()
        with open(self.workdir / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(
                qemu_argv(QEMU_IMAGE, self.console.node_port, self.link.node_port,
                          self.bridge.port),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        await self.console.expect(PROMPT, 60)  # blank flash: main.py finds no node.json
        self.console.attached = True  # the installer's mpremote talks to the REPL from now on

    def off(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.console.close()
        self.link.close()
        if self.bridge is not None:
            self.bridge.close()
        if self.street is not None:
            self.street.close()

    def text(self) -> str:
        return bytes(self.console.text).decode(errors="replace")


def cp_args(files: list[Path]) -> list[str]:
    """mpremote arguments copying each file to the board's root, chained with '+'."""
    out: list[str] = []
    for f in files:
        out += ["fs", "cp", str(f), f":{f.name}", "+"]
    return out[:-1]


HEAP_STATS = re.compile(r"HEAP \((\d+), (\d+), (\d+), (\d+), (\d+)\)")


@dataclass(frozen=True)
class HeapStats:
    """mps2.heap_stats() as the board reports it, since its last reset."""

    size: int
    live: int  # in use after the last collection
    high_water: int  # most in use at any moment
    collections: int
    live_peak: int  # most in use after any collection


async def heap_stats(node: QemuNode, *before: str) -> HeapStats:
    """The board's heap figures over mpremote (stops a running node: Ctrl-C)."""
    text = await node.mpremote("resume", *before, "exec",
                               "import mps2; print('HEAP', mps2.heap_stats())")
    m = HEAP_STATS.search(text)
    assert m, text
    return HeapStats(*(int(g) for g in m.groups()))


@dataclass
class QemuTopology(Topology):
    """Topology whose nodes are QEMU boards; outbox depth is read off the wire (ACKs)."""

    node_class: type[SimNode] = QemuNode
    _parsed: dict[str, int] = field(default_factory=dict)

    def qemu_nodes(self) -> list[QemuNode]:
        return [n for n in self.nodes if isinstance(n, QemuNode)]

    async def start(self, gateway: bool = True) -> None:
        await super().start(gateway)
        await asyncio.wait_for(asyncio.gather(*(n.ready for n in self.qemu_nodes()
                                                if n.ready is not None)), 90)

    def collect_output(self) -> None:
        for n in self.qemu_nodes():
            text = n.output()
            self._outputs[n.node_id] = bytearray(text)
            # whole lines only, from where the last call stopped
            start = self._parsed.get(n.node_id, 0)
            if start > len(text):  # the board was restarted: its console starts afresh
                start = 0
            end = text.rfind(b"\n") + 1
            self.parse_samples(n, text, start, max(start, end))
            self._parsed[n.node_id] = max(start, end)
            if n.proc is not None and n.proc.poll() is not None:
                log = n.log_path.read_text(errors="replace")
                raise AssertionError(f"{n.node_id}: QEMU exited ({n.proc.returncode}): {log}")

    def outbox(self, node: SimNode) -> list[int]:
        """Sealed and not yet acknowledged, as seen on the wire (the board's flash is in QEMU)."""
        acked = self.wires[node.node_id].acked
        return sorted(s for s in self.sampled(node) if s not in acked)

    def packs(self, node: SimNode) -> dict[int, dict[str, Any]]:
        """seq → the node's own figures (heap, cycle time, outbox...) from its packs on the wire."""
        out: dict[int, dict[str, Any]] = {}
        for body in self.wires[node.node_id].data_frames:
            m = protocol.parse_mac0(body)
            out[m.seq] = {rec[0]: rec.get(2) for rec in cbor2.loads(m.payload)}
        return out

    async def device_outbox(self, node: QemuNode) -> list[str]:
        """Files in the outbox on the board's flash (stops a running node: Ctrl-C)."""
        text = await node.mpremote("resume", "exec",
                                   "import os; print('OUTBOX', os.listdir('state/outbox'))")
        m = re.search(r"OUTBOX (\[.*\])", text)
        assert m, text
        return list(json.loads(m.group(1).replace("'", '"')))


def figures(workdir: Path, samples: int = 20, interval_ms: int = 500) -> dict[str, Any]:
    """Memory and timing of one QEMU node talking to the real gateway (for docs and reports)."""

    async def run() -> dict[str, Any]:
        topo = QemuTopology(workdir, n_nodes=1, interval_ms=interval_ms, sample_limit=samples)
        try:
            await topo.start()
            node = topo.qemu_nodes()[0]
            await topo.wait_for(lambda: len(topo.samples(node)) == samples
                                and not topo.outbox(node), 120, "samples acknowledged")
            packs = [p for _, p in sorted(topo.packs(node).items()) if "heap_peak" in p]
            running = await heap_stats(node)
            boot = await heap_stats(node, "soft-reset")
            return {
                "heap_size": boot.size,
                "heap_free_at_boot": boot.size - boot.live,
                "node_heap_free": [p["heap_free"] for p in packs],
                "node_heap_peak": [p["heap_peak"] for p in packs],
                "node_cycle_ms": [p["cycle_ms"] for p in packs],
                "board_heap_high_water": running.high_water,
                "board_live_peak": running.live_peak,
                "board_collections": running.collections,
                "samples": samples,
                "interval_ms": interval_ms,
                "icount": ICOUNT,
            }
        finally:
            await topo.stop()

    return asyncio.run(run())


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lantern-qemu-") as d:
        print(json.dumps(figures(Path(d))))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
