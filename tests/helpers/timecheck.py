"""Time tests' shared parts (docs/time.md): a kernel clock to switch, the queue's packs read back
with their times resolved as the gateway resolves them."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lantern.agent.ingest import Ingest
from lantern.agent.queue.resolve import resolve
from lantern.agent.timesync import ClockState, TimeSync


@dataclass
class KernelClock:
    """adjtimex as a test sets it: the gateway's probe (a true boundary: the kernel)."""

    synchronized: bool = False

    def __call__(self) -> ClockState:
        return ClockState(self.synchronized, "adjtimex", 16.0 if not self.synchronized else 0.01,
                          "test")


def use_clock(ingest: Ingest, ts: TimeSync) -> None:
    """Let ingest's ACKs carry the time only while ts says the clock is synchronised."""
    if hasattr(ingest, "clock"):  # wired: agent/ingest.py asks its TimeSync
        ingest.clock = ts
        return

    def ack(link: Any, node: str, seqs: list[int]) -> None:
        nk = ingest._node_key(node.encode())
        assert nk is not None
        for i in range(0, len(seqs), 32):
            link.send(ts.ack(nk, seqs[i:i + 32]))
            ingest.metrics.acks_sent += 1

    ingest._ack = ack  # type: ignore[method-assign]


@dataclass
class Pack:
    seq: int
    received_at: float
    records: list[dict[str, Any]]

    def value(self, name: str) -> Any:
        for r in self.records:
            if r["n"].endswith(":" + name):
                return r.get("v")
        return None

    @property
    def times(self) -> set[float]:
        return {r["t"] for r in self.records}


def packs(queue: Path, node: str, ts: TimeSync) -> list[Pack]:
    """Every pack of `node` in the queue, resolved, relative times made absolute by ts."""
    db = sqlite3.connect(f"file:{queue}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT seq, received_at, format, body FROM frames WHERE node = ? "
                          "ORDER BY seq", (node,)).fetchall()
    finally:
        db.close()
    out = []
    for seq, received_at, fmt, body in rows:
        records, _ = resolve(node, seq, fmt, body)
        out.append(Pack(seq, received_at, ts.fix_times(records, received_at)))
    return out
