"""link_utilisation: the real node firmware draining a backlog over a paced serial line.

The node (MicroPython, its own outbox and UART link: window of 4, authenticated ACKs)
first seals a backlog into its flash outbox, then is started on one end of a PacedLine at
the given baud; the real gateway process is on the other end and forwards to a local
receiver. Readings per second delivered are compared with the most the line can carry for
frames of that size (8N1: baud/10 bytes per second).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import cbor2

from lantern.agent import protocol
from lantern.tools.street.sim import SimNode, keys_toml
from lantern.tools.street.upstream import Upstream

from .line import PacedLine
from .node_cycle import run_mp
from .peers import LanternPeer, fresh_node_state

HEAP = "1M"  # the outbox index of a few thousand frames; a board keeps ~1000 in flash


class Watch:
    """Timestamps from the line: DATA frames delivered to the gateway, ACKs to the node."""

    def __init__(self) -> None:
        self.deframers = {"up": protocol.Deframer(), "down": protocol.Deframer()}
        self.first_byte = 0.0
        self.data_at: dict[int, float] = {}  # seq → when its first copy was delivered
        self.data_bytes: dict[int, int] = {}
        self.readings: dict[int, int] = {}  # seq → readings in its pack
        self.copies = 0
        self.acked_at: dict[int, float] = {}

    def tap(self, direction: str, data: bytes, now: float) -> None:
        if direction == "up" and not self.first_byte:
            self.first_byte = now
        for chunk in self.deframers[direction].feed(data):
            if chunk is None:
                continue
            ftype, body = protocol.decode_frame(chunk)
            if ftype not in (protocol.DATA, protocol.ACK):
                continue  # the gateway's STATUS probes (it learns firmware versions) and answers
            m = protocol.parse_mac0(body)
            if ftype == protocol.DATA:
                self.copies += 1
                self.data_at.setdefault(m.seq, now)
                self.data_bytes[m.seq] = len(chunk) + 2  # the two delimiters
                self.readings[m.seq] = len(cbor2.loads(m.payload))
            elif ftype == protocol.ACK:
                for s in cbor2.loads(m.payload)[1]:
                    self.acked_at.setdefault(s, now)


async def run_one(workdir: Path, baud: int, backlog: int, window: int = 4) -> dict[str, Any]:
    work = workdir / f"link-{baud}"
    watch = Watch()
    line = PacedLine(baud, watch.tap)
    node = SimNode("SL-0001", work / "nodes", port=line.node_port, interval_ms=3_600_000,
                   extra={"max_frames": backlog + 64,
                          "link": {"port": line.node_port, "baud": baud, "rto_ms": 500,
                                   "window": window}})
    fresh_node_state(node)
    filled = await asyncio.to_thread(run_mp, "fill", node, backlog, HEAP)
    upstream = Upstream()
    await upstream.start()
    gw = LanternPeer(work, line.gateway_port, upstream.url, [node.node_id], -1)
    gw.baud = baud
    gw.keys_toml = keys_toml([node])
    line.start()
    log = open(work / "node.log", "wb")  # noqa: SIM115 - closed below, after the node
    try:
        await asyncio.to_thread(gw.start)
        node.start(stdout=log.fileno(), heap=HEAP)
        total = backlog + 1  # the node also samples once when it boots
        bytes_per_s = baud / 10
        limit_s = 30 + 3 * total * 220 / bytes_per_s
        deadline = time.monotonic() + limit_s
        while len(watch.acked_at) < total and time.monotonic() < deadline:
            if node.proc and node.proc.poll() is not None:
                raise RuntimeError(f"node exited: {(work / 'node.log').read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 15
        while (len(upstream.readings) < sum(watch.readings.values())
               and time.monotonic() < deadline):
            await asyncio.sleep(0.1)
    finally:
        node.close()
        log.close()
        await asyncio.to_thread(gw.stop)
        await line.close()
        await upstream.stop()
    seqs = sorted(watch.data_at)
    delivered = len(seqs)
    sent_readings = sum(watch.readings.values())
    per_frame = sent_readings / max(1, delivered)
    span = max(watch.data_at.values()) - watch.first_byte if seqs else float("nan")
    wire_bytes = sum(watch.data_bytes.values()) / max(1, delivered)
    limit_fps = bytes_per_s / wire_bytes
    fps = delivered / span
    return {
        "baud": baud,
        "window": window,
        "frames": delivered,
        "frames_acked": len(watch.acked_at),
        "readings_per_frame": round(per_frame, 2),
        "wire_bytes_per_frame": round(wire_bytes, 1),
        "readings_per_s": round(fps * per_frame, 1),
        "line_limit_readings_per_s": round(limit_fps * per_frame, 1),
        "utilisation": round(fps / limit_fps, 3),
        "retransmitted_frames": watch.copies - delivered,
        "readings_lost": sent_readings - len(upstream.readings),
        "seconds": round(span, 2),
        "backlog_sealed": filled["filled"],
        "backlog_evicted_by_node": filled["evicted"],
    }


async def run(workdir: Path, seconds: float = 8.0, bauds: tuple[int, ...] = (115200, 921600),
              window: int = 4, frame_bytes: int = 205) -> dict[str, Any]:
    """Each baud in turn; the backlog lasts about `seconds` on the line (frames of about
    `frame_bytes`, the size node_cycle measured)."""
    out: dict[str, Any] = {"model": "pty pair joined by a paced line: 8N1, baud/10 bytes/s each "
                           "way, 256-byte TX buffer; ACKs share nothing with DATA (full duplex)"}
    for baud in bauds:
        backlog = max(8, int(seconds * baud / 10 / frame_bytes))
        out[str(baud)] = await run_one(workdir, baud, backlog, window)
    return out
