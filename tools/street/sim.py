"""Simulated streetlight nodes on the MicroPython unix port, each on its own pty.

Every node's UART is one pty and the gateway's serial port is another; a relay in this
process copies bytes between the two masters. The relay is where tests tap the wire and
(later) inject faults, and it holds both slaves open so that a node or a gateway can die
and restart without the other side seeing a hang-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import json
import os
import pty
import secrets
import signal
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lantern
from lantern.agent.config import write_secret
from lantern.agent.configfile import toml_string
from lantern.tools.field.provision_steps import RELEASE_FILE
from lantern.tools.street.faults import Faults

# The street runs on the MicroPython `make micropython` builds under .build/ (a clone's, or
# the current folder's when Lantern is installed)
ROOT = lantern.CHECKOUT or Path.cwd()
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_EXTMOD = ROOT / ".build/micropython/extmod"
FIRMWARE = lantern.FIRMWARE
BOARDS = lantern.BOARDS
LINE_BUFFER = 4096  # bytes a stalled side may owe before further bytes are dropped, like a FIFO
MPY_CROSS = ROOT / ".build/micropython/mpy-cross"
COMPILED = ROOT / ".build/mpy"  # firmware/ as .mpy, as it is deployed to a board


def compiled_firmware() -> Path:
    """firmware/node (and asyncio) as .mpy files (mpy-cross), rebuilt where a source is newer.

    A board runs precompiled bytecode (DESIGN.md: provision compiles to .mpy); compiling .py on
    the node itself needs tens of KB of transient heap that a 110 KB ESP32 heap cannot spare.
    Each file is written under a temporary name and renamed, so concurrent runs never see a
    torn .mpy.
    """
    # asyncio too: a board has it frozen into the firmware image
    for package, root in (("node", FIRMWARE), ("asyncio", MP_EXTMOD)):
        out = COMPILED / package
        sources = {p.relative_to(root / package).with_suffix(".mpy"): p
                   for p in (root / package).rglob("*.py") if p.name != "manifest.py"}
        for rel, src in sources.items():
            dst = out / rel
            if dst.exists() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
            subprocess.run([str(MPY_CROSS), "-o", str(tmp), "-s",
                            f"{package}/{rel.with_suffix('.py')}", str(src)], check=True)
            os.replace(tmp, dst)
        for stale in out.rglob("*.mpy"):  # a module whose source is gone must not import
            if stale.relative_to(out) not in sources:
                stale.unlink(missing_ok=True)
    # the entry script's directory comes first on MicroPython's path: keep it beside the .mpy
    entry = COMPILED / "main.py"
    if not entry.exists() or entry.read_bytes() != (FIRMWARE / "main.py").read_bytes():
        tmp = entry.with_name(f"main.py.{os.getpid()}.tmp")
        tmp.write_bytes((FIRMWARE / "main.py").read_bytes())
        os.replace(tmp, entry)
    return COMPILED

Tap = Callable[[str, bytes], None]


def _open_pty() -> tuple[int, int, str]:
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class Relay:
    """Copies bytes between a node's pty and the gateway's pty."""

    def __init__(self, name: str, tap: Tap | None = None) -> None:
        self.name = name
        self._tap = tap
        self.node_master, self._node_slave, self.node_port = _open_pty()
        self.gw_master, self._gw_slave, self.gateway_port = _open_pty()
        self._pending: dict[int, bytearray] = {self.node_master: bytearray(),
                                               self.gw_master: bytearray()}
        self.dropped = 0
        self._injections: dict[str, list[bytes]] = {"up": [], "down": []}
        self._at_boundary = {"up": True, "down": True}
        self.faults: Faults | None = None  # tools/street/faults.py: a seeded faulty line, if set

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.node_master, self._pump, self.node_master, self.gw_master, "up")
        loop.add_reader(self.gw_master, self._pump, self.gw_master, self.node_master, "down")

    def _pump(self, src: int, dst: int, direction: str) -> None:
        try:
            data = os.read(src, 65536)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EIO):
                return
            raise
        if self._tap:
            self._tap(direction, data)
        if self.faults is not None:  # the tap saw the true bytes; the far side gets the faults
            self.faults.feed(direction, data, lambda d: self._write(dst, d))
        else:
            self._write(dst, data)
        self._at_boundary[direction] = data.endswith(b"\x00")
        self._flush_injections(direction)

    def inject(self, direction: str, data: bytes) -> None:
        """Put bytes on the line as if they came from the node ("up") or the gateway ("down").

        Held until the line is between frames (after a 0x00), so the injected bytes never
        split one of the real frames in two.
        """
        self._injections[direction].append(data)
        self._flush_injections(direction)

    def _flush_injections(self, direction: str) -> None:
        if self._at_boundary[direction]:
            dst = self.gw_master if direction == "up" else self.node_master
            while self._injections[direction]:
                self._write(dst, self._injections[direction].pop(0))

    def _write(self, dst: int, data: bytes) -> None:
        buf = self._pending[dst]
        buf += data
        try:
            n = os.write(dst, buf)
        except BlockingIOError:
            n = 0
        del buf[:n]
        if len(buf) > LINE_BUFFER:
            self.dropped += len(buf) - LINE_BUFFER
            del buf[: len(buf) - LINE_BUFFER]
        loop = asyncio.get_running_loop()
        if buf:
            loop.add_writer(dst, self._flush, dst)
        else:
            loop.remove_writer(dst)

    def _flush(self, dst: int) -> None:
        self._write(dst, b"")

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self.faults is not None:
            self.faults.close()
        for fd in (self.node_master, self.gw_master):
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        for fd in (self.node_master, self._node_slave, self.gw_master, self._gw_slave):
            with contextlib.suppress(OSError):
                os.close(fd)


# where node/netcfg.py writes OP_CONFIG's settings into node.json (its `_put`): the part of
# the file that is the node's own once it holds a config_version
NODE_WRITTEN = (("config_version",), ("interval_ms",), ("max_untimed",), ("offsets",),
                ("corrections", "kappa"), ("link", "window"))


def _keep_node_settings(cfg: dict[str, Any], path: Path) -> None:
    """Carry into `cfg` the settings the node wrote into its node.json at `path`, if it did."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(old, dict) or "config_version" not in old:
        return  # the harness's own file: nothing of the node's in it
    for where in NODE_WRITTEN:
        src: Any = old
        for k in where:
            src = src.get(k) if isinstance(src, dict) else None
        if src is None:
            continue
        dst = cfg
        for k in where[:-1]:
            dst = dst.setdefault(k, {})
        dst[where[-1]] = src


@dataclass
class SimNode:
    """One node's identity, key and state on disk, and its MicroPython process."""

    node_id: str
    workdir: Path
    port: str = ""
    interval_ms: int = 2000
    board: str = "unix-sim"
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    extra: dict[str, object] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    entry: Path | None = None  # another entry script (a test's slow flash); else firmware/main.py
    # the simulated street (firmware/sim): scenario options for node.json's "sim" block, and
    # the process that runs the chip models outside the node's heap (unix boards)
    scenario: dict[str, object] = field(default_factory=dict)
    street: subprocess.Popen[bytes] | None = None
    # the release public key (32 raw bytes) provisioned beside node.json as release.pub, as
    # `lantern provision --release-pub` does: the node then takes updates signed by it
    release_pub: bytes | None = None
    # the street's supply to this node: (wall time, powered) at each switch it made, while a
    # "node"/"dead" fault in the scenario has it cut (follow_supply)
    power_log: list[tuple[float, bool]] = field(default_factory=list)
    supply_error: BaseException | None = None  # why the supply stopped following, if it did
    _supply: asyncio.Task[None] | None = field(default=None, repr=False)
    _boot_args: tuple[int | None, str | None] = field(default=(None, None), repr=False)

    @property
    def dir(self) -> Path:
        return self.workdir / self.node_id

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def write_config(self) -> Path:
        """Write node.json (and the key, once) for the next boot.

        The harness owns node.json except what the node wrote into it itself (OP_CONFIG's
        settings and config version, node/netcfg.py): those are kept, as a board keeps its
        file across reboots. A test provisions a node afresh by removing node.json (or the
        node's directory) first."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._power_faults() and "anchor_ms" not in self.scenario:
            # the street's clock runs on while the node is off: a node that boots again, and
            # the chips powered up with it, continue the street's day rather than restart it
            self.scenario["anchor_ms"] = time.time_ns() // 1_000_000
        key_file = self.dir / "node.key"
        if key_file.exists():
            self.key = bytes.fromhex(key_file.read_text().strip())
        else:
            write_secret(key_file, self.key.hex() + "\n")
        cfg = {
            "id": self.node_id,
            "key_file": str(key_file),
            "board": str(BOARDS / f"{self.board}.json"),
            "state_dir": str(self.state_dir),
            "interval_ms": self.interval_ms,
            "link": {"port": self.port, "baud": 115200, "rto_ms": 500},
            # chips 10x faster than real by default: simulated nodes sample every few hundred
            # ms, not every minute, and should still see a fresh conversion most intervals
            "sim": {"chip_speed": 10, **self.scenario, "socket": self.street_name},
            **self.extra,
        }
        path = self.dir / "node.json"
        _keep_node_settings(cfg, path)
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        if self.release_pub is not None:
            if len(self.release_pub) != 32:
                raise ValueError(f"{self.node_id}: a release public key is 32 raw bytes, "
                                 f"got {len(self.release_pub)}")
            (self.dir / RELEASE_FILE).write_bytes(self.release_pub)
        return path

    @property
    def street_name(self) -> str:
        """The street process's abstract Unix socket (unique per node directory)."""
        return f"lantern-street-{os.getpid()}-{abs(hash(str(self.dir))):x}"

    def start_street(self, cfg: Path, env: dict[str, str]) -> None:
        """Run the node's chip models in their own MicroPython process; wait until it listens."""
        if self.street is not None and self.street.poll() is None:
            return
        log = open(self.dir / "street.log", "ab")  # noqa: SIM115 - closed right after the fork
        self.street = subprocess.Popen(
            [str(MICROPYTHON), "-X", "heapsize=4M", str(FIRMWARE / "sim/serve.py"), str(cfg)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect("\0" + self.street_name)
                    return
                except OSError:
                    if self.street.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"street for {self.node_id} did not start; see "
                                           f"{self.dir / 'street.log'}") from None
            time.sleep(0.02)

    def heap_kb(self) -> int:
        """The simulated board's heap (boards/*.json "heap_kb"), else ESP32-like."""
        board = json.loads((BOARDS / f"{self.board}.json").read_text())
        return int(board.get("heap_kb", 110))

    def start(self, stdout: int | None = None,
              heap: str | None = None) -> subprocess.Popen[bytes] | None:
        """Boot the node; with a "node"/"dead" fault in its scenario, the street's supply
        (follow_supply, on the running event loop) switches it off and on from then on. A node
        whose supply is off now does not boot (None) until the supply comes on."""
        self._boot_args = (stdout, heap)
        if self._power_faults():
            self.write_config()  # pins the street's clock before the plan is read
            if self._supply is None or self._supply.done():
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    raise RuntimeError(f"{self.node_id}: a node fault in the scenario needs the "
                                       "street's supply: start the node in a running event "
                                       "loop") from None
                self._supply = loop.create_task(self.follow_supply(),
                                                name=f"supply {self.node_id}")
            if not self.powered():
                return None
        return self.boot(stdout, heap)

    def boot(self, stdout: int | None = None,
             heap: str | None = None) -> subprocess.Popen[bytes]:
        """Power the node on: its chips (the street process) and its MicroPython VM."""
        if not MICROPYTHON.exists():
            raise FileNotFoundError(f"{MICROPYTHON} is missing: run `make micropython` first")
        if self.proc is not None:
            self._halt()
        if heap is None:
            heap = f"{self.heap_kb()}K"
        cfg = self.write_config()
        env = {"MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}", "PATH": os.environ.get("PATH", "")}
        self.start_street(cfg, env)
        # the node runs bytecode, as on a board (sim/, for a street in this VM, stays source)
        compiled = compiled_firmware()
        env["MICROPYPATH"] = f"{compiled}:{FIRMWARE}:{MP_EXTMOD}"
        self.proc = subprocess.Popen(
            [str(MICROPYTHON), "-X", f"heapsize={heap}", str(self.entry or compiled / "main.py"),
             str(cfg)],
            env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop by the PID we started (a power cut, with SIGKILL)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=5)

    def close(self) -> None:
        """Kill and release the output pipe (after the caller has read what it wants)."""
        if self._supply is not None:
            self._supply.cancel()
        self._halt()

    def _halt(self) -> None:
        self.kill()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        self._stop_street()

    def _stop_street(self) -> None:
        if self.street and self.street.poll() is None:
            self.street.kill()
            self.street.wait(timeout=5)

    # ------------------------------------------------------------ the street's supply
    # A dead node is a node without power: the street cuts its supply (SIGKILL, the power cut
    # the firmware survives: docs/reliability.md) and its chips' (the street process), and
    # restores it (a boot from flash). Below the firmware, as a supply is: the node never asks.

    def _power_faults(self) -> list[Any]:
        faults = self.scenario.get("faults") or []
        assert isinstance(faults, list)
        return [f for f in faults if f.get("chip") == "node"]

    def _scenario(self) -> Any:
        module = importlib.import_module("lantern.firmware.sim.scenario")
        return module.Scenario(self.scenario, self.node_id)

    def supply_plan(self) -> list[tuple[float, bool]]:
        """(wall time in s, powered from then on) at each switch of this node's supply."""
        sc = self._scenario()
        hours = sorted({h for chip, _, lo, hi, _ in sc.faults if chip == "node"
                        for h in (lo, hi) if h < 1e8})
        plan: list[tuple[float, bool]] = []
        for i, h in enumerate(hours):
            # the state between this switch and the next (at their middle: no rounding at edges)
            later = hours[i + 1] if i + 1 < len(hours) else h + 2
            up = bool(sc.node_up(sc.start_s + (h + later) * 1800))
            if not plan or plan[-1][1] != up:
                plan.append((sc.anchor_ms / 1000 + h * 3600 / sc.speed, up))
        return plan

    def powered(self) -> bool:
        """Whether the street supplies the node now."""
        sc = self._scenario()
        return bool(sc.node_up(sc.t()))

    async def follow_supply(self) -> None:
        """Switch the node off and on at its scenario's times, until cancelled (close())."""
        try:
            for wall_s, up in self.supply_plan():
                await asyncio.sleep(max(0.0, wall_s - time.time()))
                running = self.proc is not None and self.proc.poll() is None
                if up and not running:
                    self.boot(*self._boot_args)
                elif not up:
                    self.kill()  # a power cut: the output pipe stays for the reader
                    self._stop_street()
                self.power_log.append((time.time(), up))
        except Exception as e:  # a node that cannot boot again: said, and kept for the test
            self.supply_error = e
            print(f"{self.node_id}: the street's supply stopped: {e!r}", file=sys.stderr)


def keys_toml(nodes: list[SimNode]) -> str:
    lines = ["# Node keys: node id = 256-bit key as 64 hex digits. Keep this file mode 0600.",
             "[nodes]"]
    lines += [f'"{n.node_id}" = "{n.key.hex()}"' for n in nodes]
    return "\n".join(lines) + "\n"


def gateway_toml(state_dir: Path, keys_file: Path, ports: list[str], upstream_url: str,
                 max_age_s: float = 1.0, max_records: int = 500, extra: str = "",
                 clock: str | None = "trust") -> str:
    """A gateway config for simulated nodes; `extra` is appended (more sinks, [nodes]).

    clock: the gateway's [clock] mode (docs/time.md). "trust": the gateway hands nodes this
    machine's time whatever the kernel says of it (a fresh machine or a container whose clock
    no time daemon has synchronised); nodes on the unix port keep the host's time anyway, and
    a QEMU board's starts at 2000 until a gateway gives it one. None: the gateway's default."""
    out = [
        "[gateway]",
        f"state_dir = {toml_string(state_dir)}",
        f"keys_file = {toml_string(keys_file)}",
        "",
        *((["[clock]", f"mode = {toml_string(clock)}", ""]) if clock is not None else ()),
        "[batch]",
        f"max_records = {max_records}",
        f"max_age_s = {max_age_s}",
        "",
        "[sinks.http]",
        f"url = {toml_string(upstream_url)}",
        "timeout_s = 5",
    ]
    for p in ports:
        out += ["", "[[links.serial]]", f"port = {toml_string(p)}", "baud = 115200"]
    return "\n".join(out) + "\n" + extra
