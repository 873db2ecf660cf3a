"""A MicroPython node on a pty, and the gateway's real ingest and serial link in this process.

For the command channel and update transfer tests (agent/nodecmd.py, agent/ota/): the node is
the firmware on the unix port (tools/street/sim.py SimNode), behind a relay that can inject
faults; the gateway side is the queue, ingest and the serial link its plug-in builds.
A node that exits to reboot (exit code 75, node/commands.py REBOOT_EXIT) is started again,
as a board resets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lantern.agent.ingest import Ingest
from lantern.agent.links import serial as serial_link
from lantern.agent.metrics import Metrics
from lantern.agent.plugins import LinkContext
from lantern.agent.queue.store import Store
from lantern.tools.street.faults import Faults, FaultSpec
from lantern.tools.street.sim import Relay, SimNode

REBOOT_EXIT = 75


@dataclass
class NodeLine:
    node: SimNode
    relay: Relay
    link: serial_link.SerialLink
    ingest: Ingest
    metrics: Metrics
    state_dir: Path
    keys: dict[bytes, bytes]
    log: Path
    boots: int = 1
    heap: str | None = None  # the MicroPython heap (-X heapsize); None: the board's
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def start_node(self) -> None:
        with open(self.log, "ab") as f:
            self.node.start(stdout=f.fileno(), heap=self.heap)

    async def supervise(self) -> None:
        """Start the node again after it exits to reboot (the unix board's reset)."""
        while True:
            await asyncio.sleep(0.05)
            proc = self.node.proc
            if proc is not None and proc.poll() == REBOOT_EXIT:
                self.boots += 1
                self.node.proc = None
                self.start_node()

    async def until(self, cond: Any, timeout: float, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            for t in self.tasks:
                if t.done():
                    t.result()  # a dead task is the failure, not the timeout
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; node output:\n"
                                     + self.output()[-3000:])
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def node_line(tmp_path: Path, node_id: str = "SL-0001", interval_ms: int = 500,
                    faults: FaultSpec | None = None, seed: int = 0, baud: int = 115200,
                    extra: dict[str, object] | None = None, board: str = "unix-sim",
                    release_pub: bytes | None = None, heap: str | None = None
                    ) -> AsyncIterator[NodeLine]:
    """release_pub: the release public key (32 raw bytes) provisioned beside node.json."""
    relay = Relay(node_id)
    if faults is not None:
        relay.faults = Faults(faults, seed)
    relay.start()
    node = SimNode(node_id, tmp_path / "nodes", port=relay.node_port, interval_ms=interval_ms,
                   board=board, extra=dict(extra or {}))
    node.write_config()
    if release_pub is not None:
        (node.dir / "release.pub").write_bytes(release_pub)
    state = tmp_path / "gw-state"
    state.mkdir(mode=0o700, exist_ok=True)
    keys = {node_id.encode(): node.key}
    metrics = Metrics()
    async with Store(state / "queue.sqlite") as store:
        ingest = Ingest(store, keys, metrics)
        await ingest.start()
        ctx = LinkContext(ingest, keys, store, state)
        link = serial_link.make(serial_link.SerialLinkConfig(relay.gateway_port, baud), ctx)
        line = NodeLine(node, relay, link, ingest, metrics, state, keys,
                        tmp_path / f"{node_id}.log", heap=heap)
        line.tasks = [asyncio.create_task(ingest.run(), name="ingest"),
                      asyncio.create_task(link.run(), name="serial"),
                      asyncio.create_task(line.supervise(), name="supervise")]
        line.start_node()
        try:
            await line.until(lambda: link.connected, 10, "the serial link")
            yield line
        finally:
            for t in line.tasks:
                t.cancel()
            for t in line.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            node.close()
            relay.close()

