"""`lantern sim`: a simulated street for your own gateway.

N nodes run the real firmware on the MicroPython unix port, each behind a relay between two
pseudo-terminals (tools/street/sim.py). The gateway side of each relay is a serial port a
gateway opens as it would open /dev/ttyUSB0. Into --dir go the nodes' keys (`keys.toml`, mode
0600) and the `[[links.serial]]` tables for those ports (`links.toml`), so an integrator can
run a real gateway config against a real upstream before any hardware arrives. `lantern
demo` is this street plus a gateway and a receiver (tools/street/demo.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import IO

from lantern.agent.config import write_secret
from lantern.agent.configfile import toml_string

from .sim import Relay, SimNode, keys_toml

# A simulated node samples at least every 24 h, as a real one (node/commands.py
# INTERVAL_MAX_MS), and at most ten times a second: below that it seals packs as fast as
# MicroPython runs (at --interval 0.0001 a node sealed 170 in 3 s), filling its outbox and log.
INTERVAL_MIN_S, INTERVAL_MAX_S = 0.1, 86400.0
FDS_PER_NODE = 5  # what the street holds open per node: two pseudo-terminals (both ends), a log
FDS_SPARE = 10  # the event loop's, and the pipes of a node process while it starts


def open_files_problem(n_nodes: int) -> str | None:
    """Why n_nodes will not fit in this process's open-file limit or the system's ptys."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/dev/fd")) - 1  # (listing it takes one)
    need = open_now + FDS_PER_NODE * n_nodes + FDS_SPARE
    if soft != resource.RLIM_INFINITY and need > soft:
        fit = (soft - open_now - FDS_SPARE) // FDS_PER_NODE
        raise_to = -(-need // 256) * 256
        return (f"{n_nodes} nodes need about {need} open files and the limit here is {soft} "
                f"(each node holds two pseudo-terminals and a log): raise it in this shell "
                f"with `ulimit -n {raise_to}`"
                + (f" (past the hard limit, {hard}: as root, or in /etc/security/limits.conf)"
                   if hard != resource.RLIM_INFINITY and raise_to > hard else "")
                + (f", or run at most --nodes {fit}" if fit >= 1 else ""))
    try:
        free = int(Path("/proc/sys/kernel/pty/max").read_text()) - int(
            Path("/proc/sys/kernel/pty/nr").read_text())
    except (OSError, ValueError):
        return None
    if 2 * n_nodes > free:
        return (f"{n_nodes} nodes need {2 * n_nodes} pseudo-terminals and the system has "
                f"{free} left (/proc/sys/kernel/pty/max): run at most --nodes {free // 2}")
    return None


class Street:
    """Nodes and their relays; build and start it under a running event loop (relays pump on it).

    OSError if the street cannot be laid out: --dir not a folder, or past the open-file limit.
    """

    def __init__(self, n_nodes: int, interval_s: float, workdir: Path) -> None:
        self.workdir = workdir.resolve()
        self.relays: list[Relay] = []
        self.nodes: list[SimNode] = []
        self._node_logs: list[IO[bytes]] = []
        if why := open_files_problem(n_nodes):
            raise OSError(why)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(n_nodes):
                try:
                    self.relays.append(Relay(f"SL-{i + 1:04d}"))
                except OSError as e:  # pty.openpty says "out of pty devices" for EMFILE too
                    raise OSError(f"no pseudo-terminal for node {i + 1} of {n_nodes}: the "
                                  "open-file limit (`ulimit -n`) or the system's "
                                  "(/proc/sys/kernel/pty/max) is reached") from e
            self.nodes = [SimNode(r.name, self.workdir / "nodes", port=r.node_port,
                                  interval_ms=round(interval_s * 1000)) for r in self.relays]
            for node in self.nodes:
                node.write_config()  # keeps a key already on disk: a restarted street is the same
            self.keys_file = self.workdir / "keys.toml"
            write_secret(self.keys_file, keys_toml(self.nodes))
            self.logs = self.workdir / "logs"
            self.logs.mkdir(exist_ok=True)
        except BaseException:
            self.close()
            raise

    @property
    def ports(self) -> list[str]:
        """The gateway side of each node's line, in node order."""
        return [r.gateway_port for r in self.relays]

    def links_toml(self) -> str:
        lines = ["# Serial links to the simulated nodes of `lantern sim` (valid while it runs).",
                 f"# Their keys: keys_file = {toml_string(self.keys_file)} in [gateway]."]
        for node, port in zip(self.nodes, self.ports, strict=True):
            lines += ["", f"# {node.node_id}", "[[links.serial]]", f"port = {toml_string(port)}",
                      "baud = 115200"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        for r in self.relays:
            r.start()
        for node in self.nodes:
            f = open(self.logs / f"{node.node_id}.log", "ab")  # noqa: SIM115 - closed in close()
            self._node_logs.append(f)
            node.start(stdout=f.fileno())

    def dead(self) -> list[str]:
        return [n.node_id for n in self.nodes if n.proc and n.proc.poll() is not None]

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for r in self.relays:
            r.close()
        for f in self._node_logs:
            f.close()
        self._node_logs.clear()


async def run_until_stopped(seconds: float) -> None:
    """Until Ctrl-C / SIGTERM, or `seconds` if not 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if seconds and time.monotonic() - started >= seconds:
            return


def setup_failed(workdir: Path, e: OSError, who: str = "lantern sim") -> int:
    why = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e.strerror or str(e)
    if isinstance(e, FileExistsError | NotADirectoryError):  # a file where a folder goes
        why = f"--dir {workdir} is not a folder ({why}): give a folder, made if missing"
    else:
        why = f"cannot set up the street in {workdir}: {why}"
    print(f"{who}: {why}", file=sys.stderr)
    return 2


async def _run(n_nodes: int, interval: float, seconds: float, workdir: Path) -> int:
    try:
        street = Street(n_nodes, interval, workdir)
    except OSError as e:
        return setup_failed(workdir, e)
    links = street.workdir / "links.toml"
    try:
        links.write_text(street.links_toml())
        street.start()
    except OSError as e:
        street.close()
        return setup_failed(workdir, e)
    print(f"Lantern sim: {n_nodes} nodes on MicroPython ({street.nodes[0].heap_kb()} KB heap), "
          f"sampling every {interval:g}s", flush=True)
    for node, port in zip(street.nodes, street.ports, strict=True):
        print(f"  {node.node_id}  {port}", flush=True)
    print(f"  keys:  {street.keys_file}   (keys_file in your [gateway])\n"
          f"  links: {links}   (paste into your gateway config)\n"
          f"  logs:  {street.logs}/\n  Ctrl-C stops the street.", flush=True)
    code = 0
    try:
        stop = asyncio.create_task(run_until_stopped(seconds))
        while not stop.done():
            await asyncio.wait({stop}, timeout=1.0)
            if dead := street.dead():
                print(f"node(s) {', '.join(dead)} exited; see {street.logs}/", flush=True)
                code = 1
                stop.cancel()
                break
    finally:
        street.close()
    return code


def bad_arguments(n_nodes: int, interval: float, seconds: float) -> str | None:
    """What is wrong with `lantern sim` / `lantern demo` arguments, in one line; None if fine."""
    if n_nodes < 1:
        return f"--nodes must be at least 1 (got {n_nodes})"
    if not INTERVAL_MIN_S <= interval <= INTERVAL_MAX_S:  # (nan fails both comparisons)
        return (f"--interval {interval:g}: a simulated node samples every {INTERVAL_MIN_S:g} to "
                f"{INTERVAL_MAX_S:g} s, e.g. --interval 2")
    if not (math.isfinite(seconds) and seconds >= 0):
        return f"--seconds {seconds:g}: give how long to run, or 0 to run until Ctrl-C"
    return None


def main(n_nodes: int, interval: float, seconds: float, workdir: Path) -> int:
    if why := bad_arguments(n_nodes, interval, seconds):
        print(f"lantern sim: {why}", file=sys.stderr)
        return 2
    return asyncio.run(_run(n_nodes, interval, seconds, workdir))
