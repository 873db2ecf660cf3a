"""e2e_latency_ms: node emit → upstream receipt, real firmware, real gateway, healthy upstream.

Several MicroPython nodes sample on an interval, each on its own 115200-baud PacedLine to
the gateway process, which batches with a 1 s window (batch.max_age_s = 1.0) and POSTs to
the local receiver. A frame is emitted when the node writes it to its UART (seen by the
line as it takes the bytes); it is received when its readings arrive upstream.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from lantern.agent import protocol
from lantern.tools.street.sim import SimNode, keys_toml
from lantern.tools.street.upstream import Upstream

from .line import PacedLine
from .peers import LanternPeer, fresh_node_state

BAUD = 115200


class Emits:
    def __init__(self, node: str) -> None:
        self.node = node
        self.deframer = protocol.Deframer()
        self.at: dict[str, float] = {}  # reading id of the frame's first reading → emit time

    def tap_sent(self, direction: str, data: bytes, now: float) -> None:
        if direction != "up":
            return
        for chunk in self.deframer.feed(data):
            if chunk is None:
                continue
            ftype, body = protocol.decode_frame(chunk)
            if ftype == protocol.DATA:
                self.at.setdefault(f"{self.node}:{protocol.parse_mac0(body).seq}:0", now)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation beyond the data)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))]


async def run(workdir: Path, nodes: int = 6, interval_ms: int = 500,
              seconds: float = 20.0, heap: str | None = None) -> dict[str, Any]:
    work = workdir / "e2e"
    upstream = Upstream()
    await upstream.start()
    sims: list[SimNode] = []
    lines: list[PacedLine] = []
    emits: list[Emits] = []
    for i in range(nodes):
        node_id = f"SL-{i + 1:04d}"
        e = Emits(node_id)
        line = PacedLine(BAUD, tap_sent=e.tap_sent)
        node = SimNode(node_id, work / "nodes", port=line.node_port, interval_ms=interval_ms)
        fresh_node_state(node)
        node.write_config()
        sims.append(node)
        lines.append(line)
        emits.append(e)
    gw = LanternPeer(work, lines[0].gateway_port, upstream.url, [n.node_id for n in sims], -1)
    gw.more_ports = tuple(line.gateway_port for line in lines[1:])
    gw.keys_toml = keys_toml(sims)
    logs = []
    try:
        for line in lines:
            line.start()
        await asyncio.to_thread(gw.start)
        for node in sims:
            log = open(work / f"{node.node_id}.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            node.start(stdout=log.fileno(), heap=heap)
        await asyncio.sleep(seconds)
        for node in sims:
            node.kill()  # stop emitting; what was emitted must still arrive
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(k in upstream.arrival for e in emits for k in e.at):
                break
            await asyncio.sleep(0.1)
    finally:
        for node in sims:
            node.close()
        for log in logs:
            log.close()
        await asyncio.to_thread(gw.stop)
        for line in lines:
            await line.close()
        await upstream.stop()
    lat = [(upstream.arrival[k] - t) * 1000 for e in emits for k, t in e.at.items()
           if k in upstream.arrival]
    emitted = sum(len(e.at) for e in emits)
    if lat:
        return {
            "p50": round(percentile(lat, 50), 1),
            "p99": round(percentile(lat, 99), 1),
            "max": round(max(lat), 1),
            "mean": round(statistics.fmean(lat), 1),
            "frames": emitted,
            "frames_not_received": emitted - len(lat),
            "nodes": nodes,
            "interval_ms": interval_ms,
            "batch_max_age_s": 1.0,
            "baud": BAUD,
        }
    tail = (work / f"{sims[0].node_id}.log").read_text(errors="replace")[-1500:]
    raise RuntimeError(f"no frame reached the receiver; see {work}; {sims[0].node_id}:\n{tail}")
