"""disk_wear: what the gateway writes to its SD card per frame, and how long the card lasts.

A street at its real rate (20 nodes at one frame a minute; 200 nodes at one every 10 s),
compressed in time by a factor k as cpu_budget does: every duration the gateway acts on is
scaled by 1/k (the batch window, the group-commit window, the history's save interval), so
frames meet the same commits, batches and checkpoints as on the street.

The real gateway process writes its queue to this machine's disk; the figure is its
`write_bytes` in /proc/PID/io (every byte it dirtied in the page cache for the database, its
WAL, checkpoints and the -shm index), from the first frame to the moment every reading is
upstream and the queue has let the frames go. Write amplification is that ÷ the bytes of
the sealed packs (the COSE payloads the nodes authenticated; the physical floor is 1).
The figures per frame are of the street after its first period (every node's first frame):
a node's first frame costs a registry write once in its life (its first sighting), which a
street of years does not pay per frame; `write_amplification_whole_run` includes it.
The ACK delay is measured on the wire, frame written → its ACK read, in street seconds.
With deliveries recorded in rounds ([queue] deliver_every_s), a round ends at the first commit
after deliver_every_s, on the street the next frame's; the street's last round would end only
when the gateway stops, outside the window, and its frames' deliveries (and, with the intake
log, their rows in SQLite) would go uncounted. So one more frame, node 0's next, comes
commit_window + deliver_every_s (+ 0.5 wall seconds) after the others and ends it; it is a
frame of the window like the others (`closing_frame_after_s`).

The kernel's writeback is put on the street's clock too (`Writeback`). `write_bytes` counts a
page when the process dirties a clean one; a page written without fsync stays dirty until
the kernel writes it back, `vm.dirty_expire_centisecs` after it was dirtied (30 s by
default), and writing it again meanwhile costs nothing more. On the street that happens every
30 s of street time; compressed k-fold, 30 wall seconds would be k times as many street
seconds, and the gateway's unsynced rewrites (the `-shm` index, the non-durable transactions
of the history and the deliveries, clock.json) would be undercounted.
So while a street runs, the bench itself cleans the state directory's dirty pages every
dirty_expire / k wall seconds (this machine's value, read at run time): it fsyncs each file
there, which writes the pages back without the gateway dirtying anything, so the gateway's
`write_bytes` is what a gateway whose pages are written back on the street's clock would
count. (The kernel writes an inode back between dirty_expire and dirty_expire +
dirty_writeback_centisecs after it was first dirtied; cleaning everything every dirty_expire
is that or slightly more often, so it errs, by little, towards counting more.) Before each
fsync the bench reads the file's dirty pages with cachestat(2): per file, the bytes the
writeback wrote; the rest of `write_bytes` the gateway fsynced itself (the queue's WAL and
intake log at each commit) or were in a file replaced before a writeback.

Each street runs with each profile on the same machine in the same run: `before`, the gateway
as it wrote before issue 22 (a commit per frame as it comes, a transaction per delivered
batch, 4 KiB pages, the newest values saved every 30 s), and `now`, the gateway with its
defaults ([queue] commit_window_ms and deliver_every_s as agent/config.py sets them). The
first street also runs with one lever of `now` changed at a time (LEVERS), so what each costs
and saves is measured side by side. The latency cost of a lever is the ACK delay and the
upstream delay (frame written → its first reading upstream), both in street seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cbor2

from lantern.agent import protocol
from lantern.agent.config import QueueConfig
from lantern.tools.street.upstream import Upstream

from . import frames
from .cpu_budget import LINKS, StreetPeer
from .throughput import PtyPair, wait_idle

# The card the projection assumes: Micron i300 industrial microSDXC, 128 GB
# (MTSD128AKC7MS-1WT), rated "up to 120 TB" written (TBW) in Micron's i300 datasheet, feature
# list; made for 24/7 surveillance recording. The rating is for that (sequential) workload:
# small synced writes cost the card more inside than they cost the host, which is one more
# reason to keep the host's writes few and large.
CARD = "Micron i300 microSDXC 128 GB (MTSD128AKC7MS-1WT)"
CARD_TBW_BYTES = 120e12
CARD_SOURCE = "Micron i300 microSDXC datasheet, Features: Endurance (TBW) 128GB: up to 120TB"

# what each profile changes: [queue] keys on the street's clock (scaled by the compression
# when written), and module constants with no configuration (store.PAGE_SIZE applies to a
# new queue; history.LATEST_EVERY_S: how often the newest values are saved)
BEFORE: dict[str, Any] = {
    "queue": {"commit_window_ms": 0, "deliver_every_s": 0.0},
    "modules": {"lantern.agent.queue.store": {"PAGE_SIZE": 4096, "INTAKE_LOG": False},
                "lantern.agent.queue.history": {"LATEST_EVERY_S": 30.0}}}
NOW: dict[str, Any] = {"queue": {}, "modules": {}}  # the defaults
LEVERS: dict[str, dict[str, Any]] = {
    "now_without_commit_window": {"queue": {"commit_window_ms": 0}, "modules": {}},
    "now_with_4s_commit_window": {"queue": {"commit_window_ms": 4000}, "modules": {}},
    "now_recording_each_delivery": {"queue": {"deliver_every_s": 0.0}, "modules": {}},
    "now_recording_deliveries_every_60s": {"queue": {"deliver_every_s": 60.0}, "modules": {}},
    "now_with_4k_pages": {"queue": {},
                          "modules": {"lantern.agent.queue.store": {"PAGE_SIZE": 4096}}},
    # the ACK's commit in SQLite's WAL, not appended to the intake log (queue/intake.py)
    "now_without_intake_log": {"queue": {},
                               "modules": {"lantern.agent.queue.store": {"INTAKE_LOG": False}}},
}
PROFILES = {"before": BEFORE, "now": NOW, **LEVERS}
# durations the gateway acts on that have no configuration: scaled by the compression
# (whatever value the gateway has: its own, or the profile's)
SCALED = {"lantern.agent.queue.history": ("TRIM_EVERY_S", "LATEST_EVERY_S"),
          "lantern.agent.registry": ("SEEN_WRITE_S",)}


def queue_settings(profile: str) -> dict[str, float]:
    """The profile's [queue] pacing on the street's clock: its own, else the defaults."""
    d = QueueConfig()
    return {"commit_window_ms": d.commit_window_ms, "deliver_every_s": d.deliver_every_s,
            **PROFILES[profile]["queue"]}


class WearPeer(StreetPeer):
    """The street gateway with a profile's [queue] keys and module constants, on the clock."""

    profile = "now"
    k = 1.0

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super().command()
        q = queue_settings(self.profile)
        window_ms = q["commit_window_ms"] / self.k
        cfg = self.workdir / "gateway.toml"
        cfg.write_text(cfg.read_text() + "\n[queue]\n"
                       f"commit_window_ms = {max(1, round(window_ms)) if window_ms else 0}\n"
                       f"deliver_every_s = {q['deliver_every_s'] / self.k:.6f}\n")
        settings = PROFILES[self.profile]["modules"]
        lines = ["import importlib, sys"]
        for mod, names in SCALED.items():
            lines.append(f"m = importlib.import_module({mod!r})")
            for name in names:
                given = settings.get(mod, {}).get(name)
                value = f"{given!r}" if given is not None else f"m.{name}"
                lines.append(f"m.{name} = {value} / {self.k!r}")
        for mod, values in settings.items():
            lines.append(f"m = importlib.import_module({mod!r})")
            lines += [f"m.{name} = {v!r}" for name, v in values.items()
                      if name not in SCALED.get(mod, ())]
        lines += ["from lantern.agent.cli import main",
                  f"sys.exit(main({cmd[3:]!r}))"]
        return [sys.executable, "-c", "\n".join(lines)], env


class AckedPty(PtyPair):
    """A link whose ACKs are read: (node, seq) → when its first ACK came."""

    def __init__(self) -> None:
        super().__init__()
        self.deframer = protocol.Deframer()
        self.acked: dict[tuple[str, int], float] = {}

    def _drain(self) -> None:
        now = time.monotonic()
        with contextlib.suppress(BlockingIOError, OSError):
            data = os.read(self.master, 65536)
            self.received += len(data)
            for chunk in self.deframer.feed(data):
                with contextlib.suppress(Exception):  # (the gateway's own ACKs: well formed)
                    ftype, body = protocol.decode_frame(chunk or b"")
                    if ftype == protocol.ACK:
                        m = protocol.parse_mac0(body)
                        for seq in cbor2.loads(m.payload)[1]:
                            self.acked.setdefault((m.kid.decode(), seq), now)


def write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes")


def dirty_expire_s() -> float:
    """How long the kernel leaves a page dirty before writing it back (vm.dirty_expire)."""
    return int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) / 100


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # the same number on every architecture (Linux 6.5+)
_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def dirty_bytes(fd: int) -> int | None:
    """The file's dirty page-cache bytes (cachestat(2)); None where the kernel has no cachestat.
    Pages already under writeback are left out: here they are nearly always the gateway's own
    fsync at work."""
    cs = _Cachestat()
    whole = _CachestatRange(0, 0)  # len 0: to the end of the file
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(cs), 0) != 0:
        return None
    return int(cs.nr_dirty) * _PAGE


class Writeback:
    """The street's kernel writeback on the bench's clock: every `every_s` wall seconds, each
    file of the gateway's state directory fsynced by this process (its dirty bytes counted
    first, per file, into `by_file`)."""

    def __init__(self, state_dir: Path, every_s: float) -> None:
        self.state_dir, self.every_s = state_dir, every_s
        self.by_file: dict[str, int] = {}
        self.per_file = True  # False: this kernel has no cachestat(2)
        self.runs = 0

    def sync(self) -> None:
        for entry in os.scandir(self.state_dir):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:  # (removed or replaced meanwhile)
                continue
            try:
                dirty = dirty_bytes(fd)
                if dirty is None:
                    self.per_file = False
                elif dirty:
                    self.by_file[entry.name] = self.by_file.get(entry.name, 0) + dirty
                os.fsync(fd)
            finally:
                os.close(fd)

    def reset(self) -> None:
        self.by_file.clear()
        self.runs = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Sync every `every_s` until `stop` is set; a late sync moves the next one on."""
        due = time.monotonic()
        while True:
            due = max(due + self.every_s, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), due - time.monotonic())
            if stop.is_set():
                return
            await asyncio.to_thread(self.sync)
            self.runs += 1


async def street(workdir: Path, upstream: Upstream, cpu: int, nodes: int, period_s: float,
                 street_minutes: float, frames_per_s: float, profile: str) -> dict[str, Any]:
    """`nodes` sending one frame each `period_s` street seconds, compressed to frames_per_s."""
    k = frames_per_s * period_s / nodes  # street seconds per bench second
    ids = frames.node_ids(nodes)
    per_node = max(1, round(street_minutes * 60 / period_s))
    links = [AckedPty() for _ in range(min(LINKS, nodes))]
    peer = WearPeer(workdir / f"{profile}-{nodes}", links[0].port, upstream.url, ids, cpu)
    peer.more_ports = tuple(p.port for p in links[1:])
    peer.max_age_s = 1.0 / k  # the default 1 s batch window, on the street's clock
    peer.k = k
    peer.profile = profile
    sends = sorted((seq * period_s / k + i * period_s / k / nodes, i, seq)
                   for seq in range(per_node) for i in range(nodes))
    q = queue_settings(profile)
    closing_after_s = None
    if q["deliver_every_s"] > 0:
        # the store ends a round (deliveries recorded, the intake log's frames put into
        # SQLite) at the first commit after deliver_every_s, on the street the next frame's:
        # one more frame that much later ends the last round inside the window
        # (0.5 s: the last batch's way upstream and back, the commit's own time)
        gap = (q["commit_window_ms"] / 1e3 + q["deliver_every_s"]) / k + 0.5
        sends.append((sends[-1][0] + gap, 0, per_node))
        closing_after_s = round(gap * k, 1)
    want = {f"{ids[i]}:{seq}:{r}" for _, i, seq in sends
            for r in range(frames.readings_per_frame())}
    payloads = {(i, seq): frames.pack(ids[i], seq) for _, i, seq in sends}
    wire = {key: frames.data_frame(ids[key[0]], key[1], p) for key, p in payloads.items()}
    sent_at: dict[tuple[str, int], float] = {}
    arrived: dict[tuple[str, int], float] = {}  # a frame's first reading upstream: when
    upstream.readings.clear()
    expire_s = dirty_expire_s()
    writeback = Writeback(peer.workdir / "state", expire_s / k)
    stop_writeback = asyncio.Event()
    watch = flusher = None
    try:
        await asyncio.to_thread(peer.start)
        await wait_idle(peer.pid, 15.0)
        # a street's gateway has run for long: nothing it wrote at start is still dirty
        await asyncio.to_thread(writeback.sync)
        writeback.reset()
        watch = asyncio.create_task(_watch(upstream, arrived))
        w0, t0 = write_bytes(peer.pid), time.monotonic()
        w1 = None  # when every node has sent its first frame, and its commit is done
        flusher = asyncio.create_task(writeback.run(stop_writeback))
        for at, i, seq in sends:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if w1 is None and seq == 1:
                w1 = write_bytes(peer.pid)
            sent_at[(ids[i], seq)] = time.monotonic()
            os.write(links[i % len(links)].master, wire[(i, seq)])
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and len(want & upstream.readings.keys()) < len(want):
            await asyncio.sleep(0.02)
        # the frames leave the queue after their batch is confirmed: let that transaction run
        await wait_idle(peer.pid, 10.0)
        stop_writeback.set()
        await flusher
        flusher = None
        # what is still dirty was written in the window too: counted per file like the rest
        await asyncio.to_thread(writeback.sync)
        written = write_bytes(peer.pid) - w0
        got = len(want & upstream.readings.keys())
    finally:
        stop_writeback.set()
        for task in (watch, flusher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(peer.stop)
        for link in links:
            link.close()
    if got < len(want):
        raise RuntimeError(f"{profile} street of {nodes} nodes: {len(want) - got} of "
                           f"{len(want)} readings missing upstream:\n{peer.tail()}")
    acked = {key: at for link in links for key, at in link.acked.items()}
    delays = sorted((acked[key] - t) * k for key, t in sent_at.items() if key in acked)
    upstream_delays = sorted((arrived[key] - t) * k for key, t in sent_at.items()
                             if key in arrived)
    n_frames = len(sends)
    pack_bytes = sum(len(p) for p in payloads.values())
    # the street after its first minute (its first period): a node's first frame costs a
    # registry write once in the node's life (first sighting), which a street of years
    # does not pay per frame; the whole run is reported beside it
    warm = sum(len(p) for (_, seq), p in payloads.items() if seq >= 1)
    steady = written - ((w1 if w1 is not None else w0) - w0)
    after = sum(1 for _, _, seq in sends if seq >= 1)
    if not after:  # (a street of one period: the whole run)
        warm, steady, after = pack_bytes, written, n_frames
    per_frame = steady / after
    frames_per_day = nodes * 86400 / period_s
    per_day = per_frame * frames_per_day
    return {
        "profile": profile, "queue": queue_settings(profile),
        "nodes": nodes, "frame_every_s": period_s, "frames": n_frames,
        "time_compression": round(k, 1),
        "disk_bytes": written, "sealed_pack_bytes": pack_bytes,
        "bytes_per_frame": round(per_frame),
        "bytes_per_reading": round(per_frame / frames.readings_per_frame(), 1),
        # after every node's first frame (the first period): what a street pays for years
        "write_amplification": round(steady / warm, 2),
        "write_amplification_whole_run": round(written / pack_bytes, 2),
        "first_period_disk_bytes": written - steady,
        "writes_per_day_mb": round(per_day / 1e6, 1),
        "sd_life_years": round(CARD_TBW_BYTES / per_day / 365.25, 1),
        "ack_delay_s": _spread(delays),
        "upstream_delay_s": _spread(upstream_delays),
        "frames_acked": len(delays),
        # the street's kernel writeback (Writeback): how often, in street seconds, and how
        # many times in the window
        "writeback_every_s": expire_s, "writebacks": writeback.runs,
        # the frame that ends the last round of deliveries, this many street s after the
        # others (in `frames`); None: deliveries recorded as they come, no round to end
        "closing_frame_after_s": closing_after_s,
        "written_back_bytes_by_file": (dict(sorted(writeback.by_file.items()))
                                       if writeback.per_file else None),
        "synced_by_gateway_bytes": (written - sum(writeback.by_file.values())
                                    if writeback.per_file else None),
    }


def _spread(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 2),
            "p99": round(xs[int(0.99 * (len(xs) - 1))], 2), "max": round(xs[-1], 2)}


async def _watch(upstream: Upstream, arrived: dict[tuple[str, int], float]) -> None:
    """When each frame's first reading (`node:seq:0`) reached the receiver, to 20 ms."""
    seen = 0
    while True:
        keys = list(upstream.readings)
        now = time.monotonic()
        for rid in keys[seen:]:  # (a dict keeps the order readings arrived in)
            node, seq, r = rid.rsplit(":", 2)
            if r == "0":
                arrived.setdefault((node, int(seq)), now)
        seen = len(keys)
        await asyncio.sleep(0.02)


# (nodes, one frame every s, street minutes, compressed to frames/s)
STREETS = ((20, 60.0, 30.0, 5.0), (200, 10.0, 5.0, 40.0))


async def run(workdir: Path, streets: tuple[tuple[int, float, float, float], ...] = STREETS,
              profiles: tuple[str, ...] = ("before", "now"),
              levers: tuple[str, ...] = tuple(LEVERS)) -> dict[str, Any]:
    """Every street with every profile, then the first street with each lever."""
    cpus = sorted(os.sched_getaffinity(0))
    peer_cpu, bench_cpu = cpus[-1], cpus[0]
    old = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {bench_cpu})
    upstream = Upstream()
    await upstream.start()
    out: dict[str, Any] = {}
    try:
        for profile in profiles:
            out[profile] = [await street(workdir / "disk_wear", upstream, peer_cpu, n, period,
                                         minutes, fps, profile)
                            for n, period, minutes, fps in streets]
        first = streets[0]
        out["levers"] = {lever: await street(workdir / "disk_wear", upstream, peer_cpu, *first,
                                             lever) for lever in levers}
    finally:
        await upstream.stop()
        os.sched_setaffinity(0, old)
    main = out[profiles[-1]][0]  # 20 nodes x 1/min, the last profile
    out["write_amplification"] = main["write_amplification"]
    out["ack_delay_max_s"] = main["ack_delay_s"]["max"] if main["ack_delay_s"] else None
    out["sd_life_years"] = min(s["sd_life_years"] for s in out[profiles[-1]])
    out["card"] = {"name": CARD, "tbw_bytes": CARD_TBW_BYTES, "source": CARD_SOURCE}
    out["pack"] = f"{frames.pack_source()}, {frames.readings_per_frame()} readings"
    out["setup"] = ("streets of " + ", ".join(
                        f"{n} nodes x 1 frame/{p:g} s for {m:g} street minutes at {f:g} frames/s"
                        for n, p, m, f in streets) +
                    " (every duration the gateway acts on scaled alike, the kernel's "
                    f"writeback every {dirty_expire_s():g} street s included); gateway on "
                    f"this machine's disk, pinned to CPU {peer_cpu}; write_bytes of "
                    "/proc/PID/io from the first frame to the queue emptied; profiles "
                    f"{', '.join(profiles)} in the same run, then levers "
                    f"{', '.join(levers) or 'none'} on the first street")
    return out
