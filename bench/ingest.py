"""gateway_ingest: frames/s through decode, verify, durable commit and ACK on one core.

The gateway's own Ingest and Store run in a child process pinned to one CPU (the SQLite
thread shares it). In-process links hand it the bytes a serial read would (4 KiB chunks,
cut anywhere, read from a pre-made file so the input does not count in the RSS), and
every simulated node keeps at most `window` frames unacknowledged, as the firmware does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbor2

from . import frames

CHUNK = 4096
ROOT = Path(__file__).resolve().parents[1]


class MemLink:
    """An in-process link: collects the ACK frames the gateway sends back."""

    name = "mem0"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def acked_seqs(sent: list[bytes]) -> set[tuple[str, int]]:
    """(node, seq) named by the ACKs; checked after the clock has stopped."""
    from lantern.agent import protocol

    out: set[tuple[str, int]] = set()
    for data in sent:
        for chunk in protocol.Deframer().feed(data):
            assert chunk is not None
            ftype, body = protocol.decode_frame(chunk)
            assert ftype == protocol.ACK
            m = protocol.parse_mac0(body)
            protocol.verify_mac0(frames.key_of(m.kid.decode()), m)
            node = m.kid.decode()
            out.update((node, s) for s in cbor2.loads(m.payload)[1])
    return out


def peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from lantern.agent.ingest import Ingest
    from lantern.agent.metrics import Metrics
    from lantern.agent.queue.store import Store

    nodes = frames.node_ids(args.nodes)
    per_frame = args.readings
    total = args.frames
    max_inflight = args.nodes * args.window
    metrics = Metrics()
    link = MemLink()
    async with Store(Path(args.state) / "queue.sqlite") as store:
        ingest = Ingest(store, frames.keys(nodes), metrics)
        await ingest.start()
        task = asyncio.create_task(ingest.run())
        fed_frames = 0
        with open(args.input, "rb") as src:
            cpu0, t0 = time.process_time(), time.perf_counter()
            while True:
                committed = metrics.readings_stored // per_frame
                if fed_frames - committed >= max_inflight:
                    # every node has a full window out: wait for the next commit's ACKs
                    ingest.committed.clear()
                    await ingest.committed.wait()
                    continue
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                fed_frames += chunk.count(0) // 2  # every frame is 00 COBS 00
                ingest.on_data(link, chunk)
                await asyncio.sleep(0)  # a serial read is one event-loop callback
            while metrics.readings_stored < total * per_frame:
                ingest.committed.clear()
                await ingest.committed.wait()
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        task.cancel()
    acked = acked_seqs(link.sent)
    rejected = dict(metrics.frames_rejected)
    return {
        "frames": total,
        "readings_per_frame": per_frame,
        "nodes": args.nodes,
        "window_per_node": args.window,
        "frames_per_s": round(total / wall),
        "readings_per_s": round(total * per_frame / wall),
        "cpu_us_per_frame": round(cpu / total * 1e6, 1),
        "commits": metrics.commits,
        "frames_per_commit": round(total / max(1, metrics.commits), 1),
        "acks_sent": metrics.acks_sent,
        "all_acked": len(acked) == total,
        "rejected": rejected,
        # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork+exec
        "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
        "durability": "SQLite WAL, synchronous=FULL, ACK after commit",
    }


def child_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--readings", type=int, required=True, help="readings per frame")
    p.add_argument("--cpu", type=int, default=-1)
    p.add_argument("--profile", default="")
    args = p.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # before the store thread exists: it inherits it
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        res = prof.runcall(asyncio.run, _run(args))
        prof.dump_stats(args.profile)
    else:
        res = asyncio.run(_run(args))
    print(json.dumps(res))


def run(workdir: Path, n_frames: int, n_nodes: int = 64, window: int = 4,
        profile: str = "") -> dict[str, Any]:
    """Make the input, run the pinned child, return its figures."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "ingest-state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    nodes = frames.node_ids(n_nodes)
    per_node = -(-n_frames // n_nodes)
    wire = [w for _, _, w in frames.stream(nodes, 0, per_node)][:n_frames]
    src = workdir / "ingest-input.bin"
    src.write_bytes(b"".join(wire))
    cpu = max(os.sched_getaffinity(0))
    cmd = [sys.executable, "-m", "bench.ingest", "--input", str(src), "--state", str(state),
           "--frames", str(len(wire)), "--nodes", str(n_nodes), "--window", str(window),
           "--readings", str(frames.readings_per_frame()), "--cpu", str(cpu)]
    if profile:
        cmd += ["--profile", profile]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"ingest bench failed: {out.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    res["wire_bytes_per_frame"] = round(sum(map(len, wire)) / len(wire), 1)
    res["pinned_cpu"] = cpu
    res["pack"] = frames.pack_source()
    src.unlink()
    shutil.rmtree(state, ignore_errors=True)
    return res


if __name__ == "__main__":
    child_main()
