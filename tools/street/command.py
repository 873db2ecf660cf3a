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
import signal
import time
from pathlib import Path
from typing import IO

from lantern.agent.config import write_secret

from .sim import Relay, SimNode, keys_toml


class Street:
    """Nodes and their relays; start() needs a running event loop (the relays pump on it)."""

    def __init__(self, n_nodes: int, interval_s: float, workdir: Path) -> None:
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.relays = [Relay(f"SL-{i + 1:04d}") for i in range(n_nodes)]
        self.nodes = [SimNode(r.name, self.workdir / "nodes", port=r.node_port,
                              interval_ms=int(interval_s * 1000)) for r in self.relays]
        for node in self.nodes:
            node.write_config()  # keeps a key already on disk: a restarted street is the same
        self.keys_file = self.workdir / "keys.toml"
        write_secret(self.keys_file, keys_toml(self.nodes))
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self._node_logs: list[IO[bytes]] = []

    @property
    def ports(self) -> list[str]:
        """The gateway side of each node's line, in node order."""
        return [r.gateway_port for r in self.relays]

    def links_toml(self) -> str:
        lines = ["# Serial links to the simulated nodes of `lantern sim` (valid while it runs).",
                 f'# Their keys: keys_file = "{self.keys_file}" in [gateway].']
        for node, port in zip(self.nodes, self.ports, strict=True):
            lines += ["", f"# {node.node_id}", "[[links.serial]]", f'port = "{port}"',
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


async def _run(n_nodes: int, interval: float, seconds: float, workdir: Path) -> int:
    street = Street(n_nodes, interval, workdir)
    links = street.workdir / "links.toml"
    links.write_text(street.links_toml())
    street.start()
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


def main(n_nodes: int, interval: float, seconds: float, workdir: Path) -> int:
    if n_nodes < 1 or interval <= 0:
        print("lantern sim: --nodes must be at least 1 and --interval above 0")
        return 2
    return asyncio.run(_run(n_nodes, interval, seconds, workdir))
