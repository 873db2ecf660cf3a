"""vs_node_red: the highest frame rate each peer sustains over a pty without losing a reading.

A trial sends frames open-loop at a fixed rate for a few seconds (8 nodes' traffic
interleaved on one pty) and passes when the sender kept to the rate (the pty pushes back
when the reader falls behind) and every reading reached the receiver within the batch
window plus a grace period. The rate doubles until a trial fails, then is bisected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import time
import tty
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lantern.tools.street.upstream import Upstream

from . import frames
from .peers import LanternPeer, NodeRedPeer, Peer, cpu_seconds, reset_peak_rss, rss_mb

NODES = 8
TICK_S = 0.002
BATCH_AGE_S = 1.0
# Allowed backlog at the end of a trial, beyond the batch window: a peer that needs longer
# to deliver the last readings was falling behind, only buffering the excess.
SLACK_FRACTION = 0.1


class PtyPair:
    """The bench holds the master (the node side) and keeps the slave open for the peer."""

    def __init__(self) -> None:
        self.master, self._slave = pty.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.port = os.ttyname(self._slave)
        self.received = 0
        asyncio.get_running_loop().add_reader(self.master, self._drain)

    def _drain(self) -> None:
        """Whatever comes back (ACKs from the gateway) is read so the peer never blocks."""
        with contextlib.suppress(BlockingIOError, OSError):
            self.received += len(os.read(self.master, 65536))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


async def send_paced(link: PtyPair, wire: list[bytes], rate: float) -> float:
    """Write the frames at `rate` per second; returns when the last byte went in (seconds)."""
    pending = bytearray()
    queued = 0
    t0 = time.perf_counter()
    while queued < len(wire) or pending:
        due = min(len(wire), int((time.perf_counter() - t0) * rate) + 1)
        if due > queued:
            pending += b"".join(wire[queued:due])
            queued = due
        if pending:
            try:
                n = os.write(link.master, pending)
            except BlockingIOError:
                n = 0
            del pending[:n]
        await asyncio.sleep(TICK_S)
    return time.perf_counter() - t0


async def wait_idle(pid: int, limit_s: float = 60.0) -> None:
    """Until the peer uses under 5 % of a core (the previous trial's backlog is gone)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        c0 = cpu_seconds(pid)
        await asyncio.sleep(0.5)
        if cpu_seconds(pid) - c0 < 0.025:
            return


class Trials:
    """Trials against one running peer; every trial's figures are kept in `log`."""

    def __init__(self, peer: Peer, link: PtyPair, upstream: Upstream, duration_s: float) -> None:
        self.peer, self.link, self.upstream = peer, link, upstream
        self.duration_s = duration_s
        self.nodes = frames.node_ids(NODES)
        self.next_seq = 0
        self.log: list[dict[str, Any]] = []

    async def trial(self, rate: int) -> bool:
        await wait_idle(self.peer.pid)
        per_node = max(1, round(rate * self.duration_s / NODES))
        traffic = frames.stream(self.nodes, self.next_seq, per_node)
        self.next_seq += per_node
        wire = [w for _, _, w in traffic]
        want = {f"{n}:{s}:{i}" for n, s, _ in traffic for i in range(frames.readings_per_frame())}
        self.upstream.readings.clear()
        self.upstream.arrival.clear()
        reset_peak_rss(self.peer.pid)
        cpu0 = cpu_seconds(self.peer.pid)
        took = await send_paced(self.link, wire, rate)
        planned = len(wire) / rate
        t_sent = time.monotonic()
        allowed = BATCH_AGE_S + max(0.5, SLACK_FRACTION * planned)
        deadline = t_sent + allowed + 5.0  # keep counting a while: a late reading is not lost
        while time.monotonic() < deadline and len(self.upstream.readings) < len(want):
            await asyncio.sleep(0.05)
        drain = time.monotonic() - t_sent
        got = len(want & self.upstream.readings.keys())
        cpu = cpu_seconds(self.peer.pid) - cpu0
        kept_rate = took <= planned * 1.03 + 0.05
        ok = kept_rate and got == len(want) and drain <= allowed
        self.log.append({"rate": rate, "frames": len(wire), "sent_per_s": round(len(wire) / took),
                         "readings_delivered": got, "readings_sent": len(want),
                         "drain_s": round(drain, 2), "ok": ok,
                         "cpu_us_per_frame": round(cpu / len(wire) * 1e6, 1),
                         "peak_rss_mb": round(rss_mb(self.peer.pid), 1)})
        return ok

    async def search(self, start: int, cap: int, steps: int) -> int:
        """Highest passing rate: double until a failure, then bisect `steps` times."""
        lo, hi, rate = 0, 0, start
        while rate <= cap:
            if await self.trial(rate):
                lo, rate = rate, rate * 2
            else:
                hi = rate
                break
        if not hi:
            return lo
        for _ in range(steps):
            mid = (lo + hi) // 2
            if mid <= lo or hi - mid < max(10, hi // 50):
                break
            if await self.trial(mid):
                lo = mid
            else:
                hi = mid
        return lo


@contextlib.asynccontextmanager
async def session(peer_cls: type[Peer], workdir: Path, upstream: Upstream,
                  cpu: int) -> AsyncIterator[tuple[Peer, PtyPair]]:
    """A fresh peer process on a fresh pty, idle when handed over, stopped afterwards."""
    link = PtyPair()
    peer = peer_cls(workdir, link.port, upstream.url, frames.node_ids(NODES), cpu)
    try:
        await asyncio.to_thread(peer.start)
        await wait_idle(peer.pid, 15.0)
        yield peer, link
    finally:
        await asyncio.to_thread(peer.stop)
        link.close()


async def measure(peer_cls: type[Peer], workdir: Path, upstream: Upstream, cpu: int,
                  duration_s: float, start: int, cap: int, steps: int) -> dict[str, Any]:
    """Search the sustained rate; then confirm it on a fresh process, which also gives the
    RSS at that rate untouched by the overloaded trials of the search."""
    async with session(peer_cls, workdir, upstream, cpu) as (peer, link):
        idle_rss = rss_mb(peer.pid, "VmRSS")
        search = Trials(peer, link, upstream, duration_s)
        best = await search.search(start, cap, steps)
        search_peak = rss_mb(peer.pid)
    confirm: dict[str, Any] | None = None
    if best:
        async with session(peer_cls, workdir, upstream, cpu) as (peer, link):
            again = Trials(peer, link, upstream, duration_s)
            await again.trial(best)
            confirm = again.log[0]
    return {
        "sustained_frames_per_s": best,
        "sustained_readings_per_s": best * frames.readings_per_frame(),
        "confirmed": bool(confirm and confirm["ok"]),
        "cpu_us_per_frame": confirm["cpu_us_per_frame"] if confirm else None,
        "idle_rss_mb": round(idle_rss, 1),
        # peak while running at the sustained rate (fresh process), and over the search,
        # whose overloaded trials make a peer buffer
        "peak_rss_mb": confirm["peak_rss_mb"] if confirm else None,
        "peak_rss_search_mb": round(max([search_peak] + [t["peak_rss_mb"]
                                                         for t in search.log]), 1),
        "trials": search.log,
        "confirmation": confirm,
    }


async def run(workdir: Path, duration_s: float = 5.0, start: int = 250, cap: int = 64000,
              steps: int = 4) -> dict[str, Any]:
    """Both peers in turn, the same traffic, receiver and CPU; then the ratios."""
    cpus = sorted(os.sched_getaffinity(0))
    peer_cpu, bench_cpu = cpus[-1], cpus[0]
    old = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {bench_cpu})
    upstream = Upstream()
    await upstream.start()
    try:
        out: dict[str, Any] = {}
        for name, cls in (("lantern", LanternPeer), ("node_red", NodeRedPeer)):
            out[name] = await measure(cls, workdir, upstream, peer_cpu, duration_s, start, cap,
                                      steps)
    finally:
        await upstream.stop()
        os.sched_setaffinity(0, old)
    lr, nr = out["lantern"], out["node_red"]
    out["throughput_ratio"] = (round(lr["sustained_frames_per_s"] / nr["sustained_frames_per_s"], 2)
                               if nr["sustained_frames_per_s"] else None)
    if lr["peak_rss_mb"] and nr["peak_rss_mb"]:
        out["rss_ratio"] = round(lr["peak_rss_mb"] / nr["peak_rss_mb"], 2)
    out["idle_rss_ratio"] = round(lr["idle_rss_mb"] / nr["idle_rss_mb"], 2)
    out["pack"] = f"{frames.pack_source()}, {frames.readings_per_frame()} readings"
    out["setup"] = (f"{NODES} nodes' frames interleaved on one pty, open-loop at a fixed rate "
                    f"for {duration_s:g} s per trial; batches of 500 readings or 1 s; "
                    f"both peers pinned to CPU {peer_cpu}, sender and receiver on CPU "
                    f"{bench_cpu}; Lantern also commits durably and ACKs, Node-RED does not")
    return out
