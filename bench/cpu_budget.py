"""cpu_budget: the gateway's CPU per reading at a street's real rate, and nodes per core.

A street sends little: 20-200 nodes at one frame a minute is 0.3-3.3 frames a second, so
every frame is its own commit (with its fsync), its own ACK and mostly its own batch and
POST — costs a saturation bench (vs_node_red) spreads over hundreds of frames. Here the
street's minute is compressed into a shorter one by a factor k, and every time the gateway
works by is scaled with it (batch.max_age_s / k), so frames meet the same batching and group
commits as on the street: the clock is faster, the gateway's work per frame the same.

The real gateway process (`lantern gateway run`, pinned to one CPU) reads the nodes' frames
from LINKS ptys (nodes spread over them), commits, ACKs and POSTs to a local receiver on
the other CPU. Its CPU is utime + stime of all its threads (/proc/PID/stat) from the first
frame to the last reading upstream; per reading = that ÷ readings delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from lantern.tools.street.upstream import Upstream

from . import frames
from .peers import CLK_TCK, LanternPeer, cpu_seconds
from .throughput import PtyPair, wait_idle

LINKS = 20
CORE_SHARE = 0.10  # the budget: nodes one core carries at 10 % CPU


def thread_times(pid: int) -> dict[str, float]:
    """CPU seconds so far: user and system time, of the main thread and of the others."""
    out = {"main_user": 0.0, "main_system": 0.0, "threads_user": 0.0, "threads_system": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # (a thread that ended: its time is lost to this split)
            continue
        who = "main" if int(tid) == pid else "threads"
        out[f"{who}_user"] += int(fields[11]) / CLK_TCK
        out[f"{who}_system"] += int(fields[12]) / CLK_TCK
    return out


def schedule(nodes: int, per_node: int, period_s: float, k: float
             ) -> list[tuple[float, int, int]]:
    """(bench second, node index, seq), in time order: each node sends once a street period,
    the nodes evenly spread over it, the street's clock k times faster."""
    return sorted((seq * period_s / k + i * period_s / k / nodes, i, seq)
                  for seq in range(per_node) for i in range(nodes))


async def send_on_schedule(sends: list[tuple[float, int, int]], links: Sequence[PtyPair],
                           wire: dict[tuple[int, int], bytes], t0: float,
                           on_send: Callable[[int, int], None] | None = None) -> None:
    """Each frame on its node's pty (node i on link i mod the links) at its time after t0."""
    for at, i, seq in sends:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if on_send is not None:
            on_send(i, seq)
        os.write(links[i % len(links)].master, wire[(i, seq)])


async def delivered(upstream: Upstream, want: set[str], timeout: float) -> int:
    """How many of the readings `want` are upstream, once all are or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(want & upstream.readings.keys()) < len(want):
        await asyncio.sleep(0.02)
    return len(want & upstream.readings.keys())


class StreetPeer(LanternPeer):
    """The bench gateway with its batch age scaled by the street's time compression."""

    max_age_s = 1.0

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super().command()
        cfg = self.workdir / "gateway.toml"
        text = re.sub(r"max_age_s = [0-9.]+", f"max_age_s = {self.max_age_s:.6f}",
                      cfg.read_text())
        cfg.write_text(text)
        return cmd, env


async def street(workdir: Path, upstream: Upstream, cpu: int, nodes: int, minutes: float,
                 frames_per_s: float, batch_age_s: float = 1.0) -> dict[str, Any]:
    """One street: `nodes` at one frame a minute for `minutes`, compressed to frames_per_s;
    batch_age_s is the gateway's batch.max_age_s on the street's clock."""
    k = frames_per_s * 60.0 / nodes  # street seconds per bench second
    ids = frames.node_ids(nodes)
    per_node = max(1, round(minutes))
    links = [PtyPair() for _ in range(LINKS)]
    peer = StreetPeer(workdir / f"street-{nodes}", links[0].port, upstream.url, ids, cpu)
    peer.more_ports = tuple(p.port for p in links[1:])
    peer.max_age_s = batch_age_s / k  # the batch window, on the street's clock
    sends = schedule(nodes, per_node, 60.0, k)
    want = {f"{ids[i]}:{seq}:{r}" for _, i, seq in sends
            for r in range(frames.readings_per_frame())}
    wire = {(i, seq): frames.data_frame(ids[i], seq) for _, i, seq in sends}
    upstream.readings.clear()
    try:
        await asyncio.to_thread(peer.start)
        await wait_idle(peer.pid, 15.0)
        cpu0, split0, t0 = cpu_seconds(peer.pid), thread_times(peer.pid), time.monotonic()
        await send_on_schedule(sends, links, wire, t0)
        sent_s = time.monotonic() - t0
        got = await delivered(upstream, want, 30.0)
        wall = time.monotonic() - t0
        cpu_s = cpu_seconds(peer.pid) - cpu0
        split = {k: v - split0[k] for k, v in thread_times(peer.pid).items()}
    finally:
        await asyncio.to_thread(peer.stop)
        for link in links:
            link.close()
    if got < len(want):
        raise RuntimeError(f"street of {nodes} nodes: {len(want) - got} of {len(want)} readings "
                           f"missing upstream:\n{peer.tail()}")
    n_frames = len(sends)
    us_frame = cpu_s / n_frames * 1e6
    return {
        "nodes": nodes, "street_minutes": per_node, "frames": n_frames, "readings": got,
        "time_compression": round(k, 1), "frames_per_s": round(n_frames / sent_s, 1),
        "batch_max_age_ms": round(peer.max_age_s * 1e3, 2),
        "batch_max_age_street_s": batch_age_s,
        "cpu_share": round(cpu_s / wall, 3),
        "cpu_us_per_frame": round(us_frame, 1),
        "cpu_us_per_reading": round(us_frame / frames.readings_per_frame(), 1),
        "nodes_per_core_at_10pct": int(CORE_SHARE * 60 / (us_frame / 1e6)),
        # where it goes: the event loop's thread (links, ingest, forwarder, HTTP) and the
        # others (the store's SQLite thread); user = Python and C, system = the kernel's
        # (fsync, pty and socket I/O, epoll)
        "cpu_us_per_frame_by": {k: round(v / n_frames * 1e6, 1) for k, v in split.items()},
    }


@contextlib.asynccontextmanager
async def pinned_apart() -> AsyncIterator[tuple[int, Upstream]]:
    """The CPU for the gateway, and a receiver on the other one (this process moves there
    for the while: the sender's and receiver's work never lands on the gateway's CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    old = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[0]})
    upstream = Upstream()
    await upstream.start()
    try:
        yield cpus[-1], upstream
    finally:
        await upstream.stop()
        os.sched_setaffinity(0, old)


async def run(workdir: Path, streets: tuple[int, ...] = (20, 200), minutes: float = 20.0,
              frames_per_s: float = 40.0, batch_age_s: float = 1.0) -> dict[str, Any]:
    """Each street in turn on a fresh gateway; the headline figures are those of the street
    that costs most per reading (every street's are shown)."""
    async with pinned_apart() as (cpu, upstream):
        out: dict[str, Any] = {"streets": [
            await street(workdir / "cpu_budget", upstream, cpu, n, minutes, frames_per_s,
                         batch_age_s)
            for n in streets]}
    worst = max(out["streets"], key=lambda s: s["cpu_us_per_reading"])
    out["cpu_us_per_reading"] = worst["cpu_us_per_reading"]
    out["nodes_per_core_at_10pct"] = worst["nodes_per_core_at_10pct"]
    out["pack"] = f"{frames.pack_source()}, {frames.readings_per_frame()} readings"
    out["setup"] = (f"streets of {', '.join(map(str, streets))} nodes at 1 frame/min each, "
                    f"{minutes:g} street minutes compressed to {frames_per_s:g} frames/s "
                    f"(batch.max_age_s {batch_age_s:g} s scaled alike); {LINKS} serial links "
                    f"(ptys); the gateway pinned to CPU {cpu}, sender and receiver on another")
    return out
