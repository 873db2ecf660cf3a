"""The cabinet power-cut: the gateway's state directory keeps only what it flushed.

Nodes (the real firmware, MicroPython unix port) send; the gateway acknowledges; the power
goes: the gateway and the filesystem holding its state die at once, and every write not yet
fsynced is gone (hil_tests/harness/powercut.py). After each cut the test reads the durable
image as the disk holds it: every frame an ACK named must be upstream already or in the queue
there. Then power comes back and the street goes on. At the end every reading is upstream.

The same run with the store weakened to `synchronous=OFF` (a switch only this harness has)
must lose acknowledged frames: that is what shows the scenario can fail.
`make reliability` runs it at full size (100 cuts); docs/reliability.md has the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lantern.agent.queue import intake
from lantern.tools.street.reliability import record, size

from .harness.powercut import materialize
from .harness.scenarios import all_sampled, drained, stop_gateway, tally, upstream_has_all
from .harness.topology import Topology

pytestmark = pytest.mark.powercut

ROOT = Path(__file__).resolve().parents[1]
POWERCUT = ROOT / "hil_tests" / "harness" / "powercut.py"
API = "\n[api]\nport = 0\n"


class PowerCutTopology(Topology):
    """The street with the gateway's state directory on the volatile-cache filesystem."""

    synchronous: str | None = None
    boots: int = 0

    @property
    def state(self) -> Path:
        return self.workdir / "gw-state"

    @property
    def backing(self) -> Path:
        return self.workdir / "gw-disk"

    def start_gateway(self) -> None:
        self.state.mkdir(exist_ok=True)
        weaken = ["--synchronous", self.synchronous] if self.synchronous else []
        self.gateway_wrapper = ["unshare", "-m", "--propagation", "private", sys.executable,
                                str(POWERCUT), "boot", str(self.backing), str(self.state),
                                *weaken, "--"]
        self.boots += 1
        super().start_gateway()

    def cut(self) -> None:
        """Power off: the gateway and the filesystem's server die, unflushed writes with it."""
        assert self.gateway is not None
        pid = self.gateway.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        servers = [int(p) for p in children.read_text().split()] if children.exists() else []
        fds = []
        for s in servers:  # a pidfd each, to wait for their end (not a sleep)
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(s))
        os.kill(pid, signal.SIGKILL)
        for s in servers:  # (their parent's death kills them too: PR_SET_PDEATHSIG)
            with contextlib.suppress(ProcessLookupError):
                os.kill(s, signal.SIGKILL)
        self.gateway.wait(timeout=10)
        for fd in fds:
            ready, _, _ = select.select([fd], [], [], 10)
            os.close(fd)
            assert ready, "the filesystem's server outlived the cut"


def holders(topo: PowerCutTopology) -> str:
    """Processes with the gateway's ptys open, and the file locks (a diagnosis)."""
    ports = {r.gateway_port for r in topo.relays}
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in ports:
                    stat = (proc / "stat").read_text().split()
                    mine = int(proc.name) in (os.getpid(), getattr(topo.gateway, "pid", -1))
                    out.append(f"pid {proc.name} ({stat[1]} state {stat[2]} ppid {stat[3]}) "
                               f"fd {fd.name} → {os.readlink(fd)}"
                               + ("" if mine else " (not this test's: a stray process that "
                                  "opened the pty by its number holds the gateway's lock)"))
        except OSError:
            continue
    for pid in [topo.gateway.pid] if topo.gateway is not None else []:
        kids = Path(f"/proc/{pid}/task/{pid}/children")
        for p in [pid, *(int(c) for c in (kids.read_text().split() if kids.exists() else []))]:
            for task in Path(f"/proc/{p}/task").glob("*"):
                try:
                    stack = (task / "stack").read_text().replace("\n", " | ")[:400]
                    out.append(f"pid {p} task {task.name} {(task / 'comm').read_text().strip()} "
                               f"wchan {(task / 'wchan').read_text()} stack {stack}")
                except OSError:
                    continue
    return "\n".join(out)


def queued_after_cut(topo: PowerCutTopology, k: int) -> set[tuple[str, int]]:
    """(node, seq) of every frame in the queue as the disk holds it after cut k: in SQLite,
    or on the intake log (read as the gateway reads it when it starts: agent/queue/intake.py)."""
    image = materialize(topo.backing, topo.workdir / f"image-{k}")
    db = image / "queue.sqlite"
    if not db.exists():
        return set()
    logged = {(r[1], r[2]) for rows, _ in intake.read(db.with_name(db.name + intake.SUFFIX))
              for r in rows}
    con = sqlite3.connect(db)  # (the copy: WAL recovery may write)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        if "frames" not in tables:
            return logged
        return logged | {(n, s) for n, s in con.execute("SELECT node, seq FROM frames")}
    finally:
        con.close()


def acked_missing(topo: PowerCutTopology, queued: set[tuple[str, int]] | None
                  ) -> set[tuple[str, int]]:
    """Frames an ACK named that are neither wholly upstream nor (if given) in the queue."""
    up = topo.upstream.readings
    out = set()
    for node in topo.nodes:
        wire = topo.wires[node.node_id]
        sizes = wire.pack_sizes(node.key)
        for seq in wire.acked:
            n = sizes.get(seq, 1)
            if all(f"{node.node_id}:{seq}:{i}" in up for i in range(n)):
                continue
            if queued is None or (node.node_id, seq) not in queued:
                out.add((node.node_id, seq))
    return out


async def run_power_cuts(tmp_path: Path, cuts: int, synchronous: str | None,
                         seed: int) -> dict[str, Any]:
    """The scenario; its row (recorded before anyone asserts on it)."""
    nodes, interval = 2, size(100, 150)
    rng = random.Random(seed)
    packs = int(cuts * 2.2 / (interval / 1000)) + 20
    topo = PowerCutTopology(tmp_path, n_nodes=nodes, interval_ms=interval, sample_limit=packs,
                            gateway_extra=API)
    topo.synchronous = synchronous
    t0 = time.monotonic()
    lost_at_cuts: set[tuple[str, int]] = set()
    queued_max = 0
    problem = None
    stalled: list[str] = []  # boots after which no ACK came
    try:
        await topo.start()
        port = int(topo.upstream.url.rsplit(":", 1)[1].split("/")[0])
        for k in range(cuts):
            acks = sum(w.ack_frames for w in topo.wires.values())
            # every third cut comes during an upstream outage: a backlog sits in the queue
            outage = k % 3 == 2
            if outage:
                await topo.upstream.stop()
            try:
                await topo.wait_for(lambda a=acks: sum(w.ack_frames for w in topo.wires.values())
                                    > a + 2, 30, f"ACKs after boot {topo.boots}")
            except AssertionError as e:
                # Seen in ~1 of 10 runs on a shared machine: the restarted gateway's links
                # open, and no frame comes in for the whole wait (once a stray process of
                # another test held the ptys by their numbers; the other times the cause was
                # not found, docs/reliability.md). Counted and kept with a diagnosis; the cuts
                # go on, and the end still needs every reading upstream.
                stalled.append(f"{e}\n--- who holds the links\n{holders(topo)}"[-6000:])
                (tmp_path / f"stalled-{topo.boots}.txt").write_text(stalled[-1])
            await asyncio.sleep(rng.uniform(0.0, 1.0))  # a random moment of its work
            topo.cut()
            topo.collect_output()
            queued = queued_after_cut(topo, k)
            queued_max = max(queued_max, len(queued))
            lost_at_cuts |= acked_missing(topo, queued)
            if outage:
                await topo.upstream.start(port=port)
            topo.start_gateway()
        try:
            await topo.wait_for(lambda: all_sampled(topo, packs) and drained(topo),
                                size(120, 400), "every pack sampled and acknowledged")
            # weakened, what was lost never comes: a short wait shows it, a long one is waste
            await topo.wait_for(lambda: upstream_has_all(topo),
                                size(60, 120) if synchronous is None else 5, "all delivered")
        except AssertionError as e:
            problem = str(e)[:3000]
        stop_gateway(topo)
        t = tally(topo)
        acked = sum(len(w.acked) for w in topo.wires.values())
        lost_end = acked_missing(topo, None)
        label = "7 gateway power-cut (unflushed writes dropped)"
        row = {"scenario": label + (f", synchronous={synchronous} on purpose"
                                    if synchronous else ""),
               **t.row(), "accepted_forged": None, "cuts": cuts,
               "frames_acked": acked, "acked_frames_lost": len(lost_end),
               "acked_missing_from_disk_at_a_cut": len(lost_at_cuts),
               "max_frames_queued_at_a_cut": queued_max, "boots_without_acks": len(stalled),
               "nodes": nodes, **({"weakened_on_purpose": True} if synchronous else {}),
               "seconds": round(time.monotonic() - t0, 1)}
        record(row)
        return {**row, "problem": problem, "tally": t}
    finally:
        await topo.stop()


async def test_every_acked_frame_survives_a_power_cut(tmp_path: Path) -> None:
    r = await run_power_cuts(tmp_path, size(4, 100), None, seed=7)
    assert r["problem"] is None, r["problem"]
    assert r["frames_acked"] > 0 and r["max_frames_queued_at_a_cut"] > 0, r
    assert r["acked_missing_from_disk_at_a_cut"] == 0, r
    assert r["acked_frames_lost"] == 0, r
    t = r["tally"]
    assert (t.lost, t.accepted_corrupt, t.conflicting_duplicates) == (0, 0, 0), t
    assert t.delivered == t.sent > 0


async def test_weakened_durability_loses_acked_frames(tmp_path: Path) -> None:
    """The teeth: with synchronous=OFF the same cuts lose frames the gateway acknowledged."""
    r = await run_power_cuts(tmp_path, size(4, 20), "OFF", seed=7)
    assert r["acked_missing_from_disk_at_a_cut"] > 0, r
    assert r["acked_frames_lost"] > 0 and r["tally"].lost > 0, r


def test_the_filesystem_drops_what_was_not_flushed(tmp_path: Path) -> None:
    """The harness itself: a write survives the cut only if it (and its name) was flushed."""
    state, backing = tmp_path / "mnt", tmp_path / "disk"
    state.mkdir()
    script = (
        "import os, sys\n"
        "d = sys.argv[1]\n"
        "fd = os.open(d + '/kept', os.O_CREAT | os.O_WRONLY); os.write(fd, b'flushed')\n"
        "os.fsync(fd); dfd = os.open(d, os.O_RDONLY); os.fsync(dfd)\n"
        "os.write(fd, b' and not')\n"  # after the last fsync: lost
        "fd2 = os.open(d + '/nameless', os.O_CREAT | os.O_WRONLY); os.write(fd2, b'x')\n"
        "os.fsync(fd2)\n"  # its data, but not its name
        "print('ok', open(d + '/kept', 'rb').read().decode(), flush=True)\n"
        "os.kill(os.getpid(), 9)\n")
    out = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                          str(POWERCUT), "boot", str(backing), str(state), "--",
                          sys.executable, "-c", script, str(state)],
                         capture_output=True, text=True, timeout=60)
    assert "ok flushed and not" in out.stdout, out.stderr
    image = materialize(backing, tmp_path / "image")
    assert sorted(p.name for p in image.iterdir()) == ["kept"]
    assert (image / "kept").read_bytes() == b"flushed"
