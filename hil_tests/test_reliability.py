"""Reliability scenarios on the real MicroPython node and the real gateway process.

Scaled down here (`make test`); `make reliability` (tools/street/reliability.py) runs the same
tests at full size and publishes their figures in docs/reliability.md. Every test records
its row before asserting, so a failure still shows in the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.agent.queue.diskcap import disk_bytes
from lantern.tools.street.faults import FaultSpec
from lantern.tools.street.reliability import record, size

from .harness.scenarios import (
    all_sampled,
    counters_of_every_run,
    drained,
    packs,
    sealed_seqs,
    stop_gateway,
    tally,
    upstream_has_all,
)
from .harness.topology import Topology

READINGS_PER_PACK = 20  # about what a unix-sim pack holds today; the tally counts the real number
SLOW_FLASH = Path(__file__).parent / "harness" / "slow_flash.py"
API = "\n[api]\nport = 0\n"  # the local API on a free port: never another test's gateway


def packs_for(readings: int, nodes: int) -> int:
    return -(-readings // (READINGS_PER_PACK * nodes))


async def settle(topo: Topology, cond: Callable[[], bool], timeout: float, what: str
                 ) -> str | None:
    """Wait for cond; the timeout message instead of raising, so the row is still recorded."""
    try:
        await topo.wait_for(cond, timeout, what)
    except AssertionError as e:
        return str(e)[:3000]
    return None


def fault_totals(topo: Topology) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {"up": Counter(), "down": Counter()}
    for r in topo.relays:
        if r.faults is not None:
            for direction, c in r.faults.stats.items():
                out[direction].update(c)
    return {d: dict(sorted(c.items())) for d, c in out.items()}


# ------------------------------------------------------------------ 1: a bad serial line

# 1% of the bytes corrupted, in bursts of 32 bytes on average (2.8 ms of noise at 115,200
# baud): independent 1% byte errors would spoil 99% of 440-byte frames and test only backoff.
LINES = {
    "1 line: 1% of bytes corrupted (bursts), 5% of frames lost": FaultSpec(
        flip=0.01, burst=32, lose=0.05),
    "1b line: every fault (drops, flips, dup, truncation, delay, disconnects)": FaultSpec(
        drop=0.0002, flip=0.002, burst=16, lose=0.02, duplicate=0.02, truncate=0.02,
        delay=0.05, delay_max_s=0.2, disconnect=0.002, disconnect_s=0.5),
}


@pytest.mark.parametrize("name", list(LINES))
async def test_faulty_line_loses_nothing_accepts_nothing_corrupt(tmp_path: Path,
                                                                 name: str) -> None:
    nodes = size(2, 4)
    readings = size(1_500, 10_000)
    packs = packs_for(readings, nodes)
    topo = Topology(tmp_path, n_nodes=nodes, interval_ms=60, sample_limit=packs,
                    faults=LINES[name], fault_seed=1, gateway_extra=API)
    t0 = time.monotonic()
    try:
        await topo.start()
        problem = await settle(topo, lambda: all_sampled(topo, packs) and drained(topo)
                               and upstream_has_all(topo), size(180, 900), "all delivered")
        metrics = stop_gateway(topo)
        t = tally(topo)
        record({"scenario": name, **t.row(), "accepted_forged": None,
                "seconds": round(time.monotonic() - t0, 1), "nodes": nodes,
                "line_faults": fault_totals(topo), "gateway_rejected": metrics["frames_rejected"],
                "frames_per_commit": round(sum(metrics["frames_received"].values())
                                           / max(1, metrics["commits"]), 2),
                "conflicting_duplicates": t.conflicting_duplicates,
                "out_of_order": t.out_of_order})
        assert problem is None, problem
        assert t.sent >= readings
        assert (t.lost, t.accepted_corrupt, t.conflicting_duplicates) == (0, 0, 0), t
        assert t.delivered == t.sent
        st = fault_totals(topo)
        # the line really was bad: frames were damaged and lost, and the gateway saw it
        assert st["up"].get("frames_damaged", 0) + st["up"].get("frames_truncated", 0) > 0
        assert sum(metrics["frames_rejected"].values()) > 0
    finally:
        await topo.stop()


# ------------------------------------------------------------------ 2: gateway SIGKILLed


async def test_gateway_sigkilled_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    kills = size(3, 20)
    nodes = size(2, 4)
    readings = size(800, 10_000)
    packs = packs_for(readings, nodes)
    rng = random.Random(2)
    # sampling spans the kills: about 1.7 s of gateway life per kill
    interval = max(20, int(1700 * kills / packs))
    topo = Topology(tmp_path, n_nodes=nodes, interval_ms=interval, sample_limit=packs,
                    gateway_extra=API)
    t0 = time.monotonic()
    try:
        await topo.start()
        uptimes = []
        for _ in range(kills):
            up = rng.uniform(0.2, 2.5)  # a random moment: starting, committing, posting...
            uptimes.append(round(up, 2))
            await asyncio.sleep(up)
            topo.kill_gateway(signal.SIGKILL)
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            topo.start_gateway()
        problem = await settle(topo, lambda: all_sampled(topo, packs) and drained(topo)
                               and upstream_has_all(topo), size(180, 900), "all delivered")
        stop_gateway(topo)
        t = tally(topo)
        record({"scenario": "2 gateway SIGKILLed at random moments", **t.row(),
                "accepted_forged": None, "kills": kills, "seconds": round(time.monotonic() - t0, 1),
                "conflicting_duplicates": t.conflicting_duplicates, "nodes": nodes})
        assert problem is None, problem
        assert t.sent >= readings
        assert (t.lost, t.accepted_corrupt) == (0, 0), t
        assert t.conflicting_duplicates == 0  # a repeat upstream is always the same reading
        assert len(uptimes) == kills
    finally:
        await topo.stop()


# ------------------------------------------------------------------ 3: a day without upstream


def _queue_rows(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(con.execute("SELECT coalesce(sum(readings), 0) FROM frames").fetchone()[0])
    finally:
        con.close()


class QueueIds:
    """Each queued frame's id (its place in the gateway's arrival order), as first seen."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.of: dict[tuple[str, int], int] = {}
        self._last = 0

    def poll(self) -> None:
        if not self.db.exists():
            return
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)
            try:
                rows = con.execute("SELECT id, node, seq FROM frames WHERE id > ? ORDER BY id",
                                   (self._last,)).fetchall()
            finally:
                con.close()
        except sqlite3.OperationalError:  # (the gateway creating its tables): next time
            return
        for fid, node, seq in rows:
            self.of.setdefault((node, seq), fid)
            self._last = fid


def _assert_oldest_evicted(topo: Topology, missing: dict[str, list[str]],
                           ids: dict[tuple[str, int], int]) -> None:
    """What evict_oldest promises (agent/queue/diskcap.py): by arrival at the gateway, the
    batch the sink was retrying through the outage stays, the frames right after it are
    evicted, every later one is kept. By sequence number a node's evicted frames need not be
    one run: a frame the node sent again arrives after the ones it sent meanwhile."""
    def frame(rid: str) -> tuple[str, int]:
        node, seq, _ = rid.rsplit(":", 2)
        return node, int(seq)

    up = topo.upstream.arrival
    first_post = min(up.values())
    in_flight = {frame(r) for r, at in up.items() if at == first_post}
    evicted = {frame(r) for rids in missing.values() for r in rids}
    kept = {frame(r) for r in up} - in_flight
    unseen = sorted(f for f in in_flight | evicted | kept if f not in ids)
    assert not unseen, f"frames never seen in the queue: {unseen[:10]}"
    runs = [sorted(ids[f] for f in group) for group in (in_flight, evicted, kept)]
    by_node = {n: sorted(s for m, s in evicted if m == n) for n in missing}
    assert runs[0][-1] < runs[1][0] and runs[1][-1] < runs[2][0], (
        f"in flight ids {runs[0][0]}-{runs[0][-1]}, evicted {runs[1][0]}-{runs[1][-1]}, "
        f"kept {runs[2][0]}-{runs[2][-1]}; evicted seqs {by_node}")


@pytest.mark.parametrize("policy", ["pause_intake", "evict_oldest"])
async def test_day_long_upstream_outage_under_a_disk_cap(tmp_path: Path, policy: str) -> None:
    """A compressed clock: one simulated minute is `interval` ms of wall time, for everything.

    Nodes sample once a (simulated) minute; the outage lasts `day` samples (1440 = 24 h);
    the gateway's upstream backoff cap, 60 s in the field, is scaled by the same factor.
    Node retransmission timers are not scaled: they only make the final drain slower.
    """
    nodes = 2
    # the queue keeps a frame (~450 bytes with its index entry, 21 readings) as one row:
    # ~1,700 frames pass the smallest cap's high mark (1 MiB less the WAL budget and margin)
    day = size(1100, 1440)
    interval = 20
    k = 60_000 / interval  # simulated seconds per wall second
    cap_mb = 1
    topo = Topology(tmp_path, n_nodes=nodes, interval_ms=interval, sample_limit=day,
                    node_extra={"max_frames": day + 100},
                    gateway_extra=API + f'\n[queue]\nmax_mb = {cap_mb}\npolicy = "{policy}"\n')
    t0 = time.monotonic()
    db = tmp_path / "gw-state" / "queue.sqlite"
    most = {"disk": 0, "outbox": 0}
    # (node, seq) → frame id: the gateway's arrival order, read while the frames are queued
    # (a frame is evicted only after ~1,500 newer ones arrived: seconds after it was seen)
    ids = QueueIds(db)

    async def watch() -> None:
        while True:
            most["disk"] = max(most["disk"], disk_bytes(db))
            for n in topo.nodes:
                with contextlib.suppress(FileNotFoundError):  # before the node's first boot
                    most["outbox"] = max(most["outbox"], len(topo.outbox(n)))
            ids.poll()
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        await topo.start(gateway=False)
        assert topo.gw_config is not None
        text = topo.gw_config.read_text()
        # deliveries recorded as they come: "backlog delivered" is an empty queue here, and
        # grouped records ([queue] deliver_every_s) keep delivered rows up to 300 s longer
        assert "[queue]\n" in text
        topo.gw_config.write_text(text.replace(
            "[sinks.http]\n", f"[sinks.http]\nbackoff_initial_s = {0.5 * 60 / k:.4f}\n"
                              f"backoff_max_s = {60 / k:.4f}\n").replace(
            "[queue]\n", "[queue]\ndeliver_every_s = 0\n"))
        port = int(topo.upstream.url.rsplit(":", 1)[1].split("/")[0])
        await topo.upstream.stop()  # down from before the first sample to after the last
        topo.start_gateway()
        # evict_oldest acknowledges everything: the outage lasts until the gateway has every
        # frame (a loaded machine's nodes send behind their sampling, and the cap must be
        # reached while upstream is down); pause_intake leaves the rest in the nodes' outboxes
        if policy == "evict_oldest":
            outage_over = lambda: all_sampled(topo, day) and drained(topo)  # noqa: E731
        else:
            outage_over = lambda: all_sampled(topo, day)  # noqa: E731
        problem = await settle(topo, outage_over, size(120, 400), "a day of samples")
        outage_s = time.monotonic() - t0
        await topo.upstream.start(port=port)
        problem = problem or await settle(
            topo, lambda: drained(topo) and _queue_rows(db) == 0, size(180, 600),
            "backlog delivered after the outage")
        metrics = stop_gateway(topo)
        t = tally(topo, evicted=int(metrics.get("evictions", 0)))
        cap = int(cap_mb * (1 << 20))
        missing = sum(len(v) for v in t.missing.values())
        record({"scenario": f"3 upstream down 24 h (compressed clock), disk cap, {policy}",
                **t.row(), "accepted_forged": None, "evicted": t.evicted,
                "cap_bytes": cap, "max_disk_bytes": most["disk"],
                "max_node_outbox": most["outbox"], "out_of_order": t.out_of_order,
                "queue_full_refusals": metrics["frames_rejected"].get("queue_full", 0),
                "simulated_hours": round(day / 60, 1), "time_compression_nominal": int(k),
                "time_compression_measured": int(day * 60 / outage_s),
                "outage_wall_s": round(outage_s, 1), "seconds": round(time.monotonic() - t0, 1)})
        assert problem is None, problem
        assert most["disk"] <= cap, f"queue files reached {most['disk']} bytes, cap {cap}"
        assert t.accepted_corrupt == 0 and t.lost == 0, t
        if policy == "evict_oldest":
            assert t.evicted > 0 and missing == t.evicted  # each gap counted, no more, no less
            ids.poll()
            _assert_oldest_evicted(topo, t.missing, ids.of)
        else:
            assert missing == 0 and t.evicted == 0
            assert metrics["frames_rejected"].get("queue_full", 0) > 0  # the cap was reached
            assert most["outbox"] > 20  # and the nodes held the rest meanwhile
        assert t.out_of_order == 0, f"{t.out_of_order} packs overtook an older one"
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await topo.stop()


# ------------------------------------------------------------------ 4: node power cuts


@dataclass
class Flash:
    """What a power cut left on a node's flash."""

    frames: dict[int, bytes]  # complete, authentic frames by sequence number: durable packs
    corrupt: int  # files that are not a complete, authentic frame named by its own number
    writing: set[int]  # frames whose write the cut interrupted (`.tmp`): never durable
    reserved: int  # the reserved sequence on flash


def _flash(state: Path, key: bytes, node_id: str) -> Flash:
    frames: dict[int, bytes] = {}
    corrupt = 0
    writing = set()
    for p in (state / "outbox").iterdir():
        if p.name.endswith(".tmp"):
            writing.add(int(p.name[:-4]))
            continue
        body = p.read_bytes()
        try:
            m = protocol.parse_mac0(body)
            protocol.verify_mac0(key, m)
            protocol.resolve_pack(m.payload, node=node_id)
            ok = m.seq == int(p.name) and m.kid == node_id.encode()
        except (FrameError, ValueError):
            ok = False
        if ok:
            frames[m.seq] = body
        else:
            corrupt += 1
    return Flash(frames, corrupt, writing, int((state / "seq").read_bytes()))


def _queued(db: Path, node_id: str) -> set[int]:
    """Sequence numbers the gateway's queue still holds for a node (acknowledged, not sent)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {int(r[0]) for r in con.execute("SELECT seq FROM frames WHERE node = ?",
                                               (node_id,))}
    finally:
        con.close()


async def test_node_power_cut_during_outbox_writes(tmp_path: Path) -> None:
    cuts = size(8, 100)
    rng = random.Random(4)
    # a 4 KB sector erase takes ~45 ms on an ESP32's flash: a frame write takes ~40 + 28 x 2 ms
    # here, a sequence reservation 40 + 2 ms
    topo = Topology(tmp_path, n_nodes=1, interval_ms=40,
                    node_extra={"slow_flash": {"erase_ms": 40, "piece": 16, "delay_ms": 2}},
                    gateway_extra=API)
    t0 = time.monotonic()
    landed: Counter[str] = Counter()
    attempts = checked = corrupt_files = reserve_behind = most_waiting = 0
    cut_while_writing: set[int] = set()  # packs a cut caught before they were durable
    try:
        await topo.start()
        node = topo.nodes[0]
        state = node.state_dir
        node.kill()
        node.entry = SLOW_FLASH  # from here on the node writes its flash slowly
        # the gateway is down for the first half: frames pile up in the outbox across many
        # power cuts (and the sequence gaps each boot leaves), then it comes back
        topo.kill_gateway(signal.SIGTERM)
        while sum(landed.values()) < cuts and attempts < cuts * 4:
            gateway_down = topo.gateway is None or topo.gateway.poll() is not None
            if sum(landed.values()) == cuts // 2 and gateway_down:
                topo.start_gateway()
            attempts += 1
            boot_ns = time.time_ns()
            node.start(stdout=subprocess.PIPE)
            target = "frame" if rng.random() < 0.75 else "seq"
            # skip a few writes at random so cuts land at every stage of a run
            await asyncio.sleep(rng.uniform(0.0, 0.4))

            def writing(target: str = target, boot_ns: int = boot_ns) -> bool:
                if target == "seq":
                    with contextlib.suppress(FileNotFoundError):
                        return (state / "seq.tmp").stat().st_mtime_ns >= boot_ns
                    return False
                return any(p.name.endswith(".tmp") for p in (state / "outbox").iterdir())

            deadline = time.monotonic() + 30
            while not writing():  # watching the flash closely: a write lasts milliseconds
                if time.monotonic() > deadline:
                    topo.collect_output()
                    raise AssertionError(f"no {target} write within 30 s (cut {attempts}); node:\n"
                                         + topo.output(node)[-1500:])
                await asyncio.sleep(0.0005)
            # a random moment inside the write
            await asyncio.sleep(rng.uniform(0.0, 0.09 if target == "frame" else 0.04))
            node.kill(signal.SIGKILL)
            topo.collect_output()
            if writing():
                landed[target] += 1
            flash = _flash(state, node.key, node.node_id)
            checked += len(flash.frames) + flash.corrupt
            most_waiting = max(most_waiting, len(flash.frames) + flash.corrupt)
            corrupt_files += flash.corrupt
            # a pack is sealed once it is durable: its file complete and renamed into place.
            # The node reports it just after, so a cut can land between the two: the flash
            # shows it here (and the wire later), and it counts as sent
            topo.flash_frames.setdefault(node.node_id, {}).update(flash.frames)
            cut_while_writing |= flash.writing
            used = [*sealed_seqs(topo, node.node_id), *flash.frames, *flash.writing,
                    *(protocol.parse_mac0(b).seq for b in topo.wires[node.node_id].data_frames)]
            if used and flash.reserved <= max(used):
                reserve_behind += 1  # the flash would hand out a number already used
        # last boot: the normal entry, a few samples, then everything must drain
        node.entry = None
        node.extra["sample_limit"] = 3
        reported = len(sealed_seqs(topo, node.node_id))
        node.start(stdout=subprocess.PIPE)
        # every durable pack upstream, by id: the last pack acknowledged may still sit in the
        # gateway's batch when the node's outbox is already empty
        problem = await settle(topo, lambda: drained(topo) and upstream_has_all(topo)
                               and len(sealed_seqs(topo, node.node_id)) >= reported + 3,
                               size(60, 180), "drain")
        stop_gateway(topo)
        t = tally(topo)
        nid = node.node_id
        durable = packs(topo, nid)
        on_wire = {protocol.parse_mac0(b).seq for b in topo.wires[nid].data_frames}
        upstream = {int(rid.split(":")[1]) for rid in topo.upstream.readings}
        # where each pack missing upstream is: still waiting (the wait timed out) or gone
        missing = {int(rid.split(":")[1]) for rid in t.missing.get(nid, [])}
        queued = _queued(tmp_path / "gw-state" / "queue.sqlite", nid)
        on_node = set(topo.outbox(node))
        record({"scenario": "4 node power-cut during outbox writes", **t.row(),
                "accepted_forged": None, "cuts_landed_in_writes": dict(landed),
                "attempts": attempts, "packs_durable": len(durable),
                "packs_durable_unreported": len(set(durable) - set(sealed_seqs(topo, nid))),
                "packs_not_durable_at_cut": len(cut_while_writing),
                "not_durable_surfaced": len(cut_while_writing & (set(durable) | on_wire
                                                                 | upstream)),
                "missing_packs": {"on_node_flash": len(missing & on_node),
                                  "in_gateway_queue": len(missing & queued),
                                  "gone": len(missing - on_node - queued)},
                "outbox_files_checked": checked,
                "corrupt_outbox_files": corrupt_files, "corrupt_frames_sent": t.corrupt_frames_sent,
                "max_outbox_at_a_cut": most_waiting,
                "seq_reused": t.seq_reused, "seq_reservation_behind": reserve_behind,
                "seconds": round(time.monotonic() - t0, 1)})
        assert problem is None, problem
        # a pack a cut caught mid-write is gone (at most the reading being taken) and its
        # number is never used again: it never reaches the wire, the flash or upstream
        assert cut_while_writing and not cut_while_writing & (set(durable) | on_wire | upstream)
        assert sum(landed.values()) == cuts, f"only {dict(landed)} of {attempts} cuts landed"
        assert landed["frame"] and landed["seq"]
        assert corrupt_files == 0 and t.corrupt_frames_sent == 0
        assert t.seq_reused == 0 and reserve_behind == 0
        assert (t.lost, t.accepted_corrupt) == (0, 0), t
        assert t.sent > 0 and most_waiting > cuts // 2  # frames really waited through cuts
    finally:
        await topo.stop()


async def test_a_pack_cut_between_its_write_and_its_report_is_sealed_and_delivered(
        tmp_path: Path) -> None:
    """Found by scenario 4 under CPU load: the node reports a pack just after its file is
    durable, so a cut can land between the two. That pack is sealed (the flash holds it), the
    node sends it after the reboot, and the scenario must wait for it like any other."""
    topo = Topology(tmp_path, n_nodes=1, interval_ms=100,
                    node_extra={"slow_flash": {"after_write_ms": 3000}}, gateway_extra=API)
    try:
        await topo.start()
        node = topo.nodes[0]
        await topo.wait_for(lambda: len(topo.sampled(node)) >= 2, 30, "first packs")
        node.kill()
        node.entry = SLOW_FLASH  # a long pause after each frame's write, before its report
        node.start(stdout=subprocess.PIPE)

        def unreported() -> set[int]:
            return set(topo.outbox(node)) - set(topo.sampled(node))

        await topo.wait_for(lambda: bool(unreported()), 30, "a frame written, not yet reported")
        node.kill(signal.SIGKILL)
        topo.collect_output()
        cut = unreported()
        assert len(cut) == 1, cut
        flash = _flash(node.state_dir, node.key, node.node_id)
        assert cut <= set(flash.frames) and not flash.writing
        topo.flash_frames[node.node_id] = flash.frames
        assert cut <= set(packs(topo, node.node_id))  # sealed: it counts as sent
        node.entry = None
        node.extra["sample_limit"] = 2
        reported = len(sealed_seqs(topo, node.node_id))
        node.start(stdout=subprocess.PIPE)
        await topo.wait_for(lambda: drained(topo) and upstream_has_all(topo)
                            and len(sealed_seqs(topo, node.node_id)) >= reported + 2, 60,
                            "every durable pack upstream")
        stop_gateway(topo)
        t = tally(topo)
        assert not cut & set(sealed_seqs(topo, node.node_id))  # never reported, yet:
        assert all(f"{node.node_id}:{seq}:0" in topo.upstream.readings for seq in cut)
        assert (t.lost, t.accepted_corrupt, t.seq_reused) == (0, 0, 0), t
        assert t.delivered == t.sent
    finally:
        await topo.stop()


# ------------------------------------------------------------------ found by scenario 1


class DropAcksFor:
    """A line that loses the first `times` ACKs naming one sequence number, nothing else."""

    def __init__(self, seq: int, times: int) -> None:
        self.seq, self.left = seq, times
        self.deframer = protocol.Deframer()

    def feed(self, direction: str, data: bytes, deliver: Callable[[bytes], None]) -> None:
        if direction == "up":
            deliver(data)
            return
        for chunk in self.deframer.feed(data):
            if chunk is None:
                continue
            body = protocol.decode_frame(chunk)[1]
            seqs = cbor2.loads(protocol.parse_mac0(body).payload)[1]
            if self.seq in seqs and self.left > 0:
                self.left -= 1
                continue
            deliver(b"\x00" + chunk + b"\x00")

    def close(self) -> None:
        pass


async def test_a_frame_whose_ack_was_lost_is_never_stranded(tmp_path: Path) -> None:
    """Regression: the frame's ACK is lost while newer frames keep flowing; when it is resent,
    the gateway must still recognise it (and acknowledge it again) rather than call it a
    replay, or the node keeps it, and a window slot, forever."""
    topo = Topology(tmp_path, n_nodes=1, interval_ms=20, sample_limit=150, gateway_extra=API)
    try:
        await topo.start(gateway=False)
        topo.relays[0].faults = DropAcksFor(2, times=3)  # type: ignore[assignment]
        topo.start_gateway()
        problem = await settle(topo, lambda: all_sampled(topo, 150) and drained(topo)
                               and upstream_has_all(topo), 90, "drain with three ACKs lost")
        metrics = stop_gateway(topo)
        assert problem is None, problem
        assert metrics["frames_rejected"].get("replay", 0) == 0
        assert metrics["duplicates"].get("SL-0001", 0) >= 1  # seq 2 came again, re-ACKed
        assert tally(topo).lost == 0
    finally:
        await topo.stop()


# ------------------------------------------------------------------ 6: disk full, read-only

# The gateway runs in a mount namespace of its own, its state directory on a small ext4
# image: ENOSPC is the kernel's, and so is the read-only remount after a filesystem error.
MOUNT = ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -o loop,errors=remount-ro "$1" "$2" && shift 2 && exec "$@"', "sh"]


def _ext4(img: Path, mb: int) -> None:
    subprocess.run(["truncate", "-s", f"{mb}M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True)


def _inside(topo: Topology, path: Path) -> Path:
    """A path as the gateway sees it, in its own mount namespace."""
    assert topo.gateway is not None
    return Path(f"/proc/{topo.gateway.pid}/root") / path.relative_to("/")


def _fill(path: Path) -> int:
    """Write until the filesystem says ENOSPC; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    n = 0
    try:
        while True:
            n += os.write(fd, bytes(1 << 16))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return n


def _device(topo: Topology, mountpoint: Path) -> str:
    assert topo.gateway is not None
    for line in Path(f"/proc/{topo.gateway.pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            return Path(fields[fields.index("-") + 2]).name
    raise AssertionError(f"{mountpoint} is not mounted in the gateway's namespace")


async def _acks_stop(topo: Topology, seconds: float) -> tuple[int, int]:
    """ACK frames the gateway sent, and frames the node kept, over an observation window."""
    wire, node = topo.wires["SL-0001"], topo.nodes[0]
    await asyncio.sleep(0.5)  # ACKs for commits that completed just before the fault
    acks, waiting = wire.ack_frames, len(topo.outbox(node))
    await asyncio.sleep(seconds)  # nodes sample and send on: nothing may be acknowledged
    return wire.ack_frames - acks, len(topo.outbox(node)) - waiting


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
async def test_state_dir_full_or_read_only(tmp_path: Path, fault: str) -> None:
    state = tmp_path / "gw-state"
    state.mkdir()
    img = tmp_path / "state.ext4"
    _ext4(img, 16)
    packs = size(150, 600)
    # read_only: deliveries recorded as they come ([queue] deliver_every_s = 0), so the record
    # that meets the read-only store is written inside this test's window; grouped records
    # take the same path later (tests/gateway/test_queue_pacing.py)
    extra = API + ("\n[queue]\ndeliver_every_s = 0\n" if fault == "read_only" else "")
    topo = Topology(tmp_path, n_nodes=1, interval_ms=50, sample_limit=packs, gateway_extra=extra)
    topo.gateway_wrapper = [*MOUNT, str(img), str(state)]
    t0 = time.monotonic()
    try:
        await topo.start()
        node = topo.nodes[0]
        await topo.wait_for(lambda: len(topo.upstream.readings) > 100, 30, "readings flowing")
        port = int(topo.upstream.url.rsplit(":", 1)[1].split("/")[0])
        await topo.upstream.stop()  # the queue must grow, not reuse the pages it frees
        acks = topo.wires[node.node_id].ack_frames
        await topo.wait_for(lambda: topo.wires[node.node_id].ack_frames > acks + 3, 30,
                            "readings queued, waiting for upstream")
        if fault == "disk_full":
            filled = _fill(_inside(topo, state / "filler"))
        else:
            filled = 0
            Path(f"/sys/fs/ext4/{_device(topo, state)}/trigger_fs_error").write_text("lantern\n")
        await topo.wait_for(lambda: "commit failed" in topo.gateway_log(), 60,
                            "the gateway to report the failing store")
        if fault == "read_only":  # upstream takes the waiting batch; the queue cannot note it
            await topo.upstream.start(port=port)
            await topo.wait_for(lambda: "cannot record a delivered batch" in topo.gateway_log(),
                                60, "the forwarder to meet the read-only store")
        acked_during, kept_during = await _acks_stop(topo, 3.0)
        alive = topo.gateway is not None and topo.gateway.poll() is None
        log = topo.gateway_log()
        if fault == "disk_full":
            _inside(topo, state / "filler").unlink()  # space returns: no restart
        else:
            # an ext4 error cannot be undone while mounted: stop, fsck, mount, start again,
            # as the operator (or systemd after a reboot) would
            stop_gateway(topo)
            subprocess.run(["e2fsck", "-fy", str(img)], capture_output=True)
            topo.start_gateway()
        if fault == "disk_full":
            await topo.upstream.start(port=port)
        problem = await settle(topo, lambda: all_sampled(topo, packs) and drained(topo)
                               and upstream_has_all(topo), size(120, 300), "recovery")
        stop_gateway(topo)
        t = tally(topo)
        record({"scenario": f"6 gateway state dir {fault.replace('_', ' ')}", **t.row(),
                "accepted_forged": None, "acks_during_fault": acked_during,
                "frames_kept_by_node_during_fault": kept_during,
                "gateway_alive_during_fault": alive,
                "store_errors": sum(m["store_errors"] for m in counters_of_every_run(topo)),
                "filler_bytes": filled, "seconds": round(time.monotonic() - t0, 1)})
        assert problem is None, problem
        assert alive, log[-3000:]
        assert acked_during == 0 and kept_during > 0, (acked_during, kept_during)
        assert log.count("commit failed") == 1, "logged once per outage, with what to check"
        # disk_full: the group commit meets it on the intake log (deliveries recorded in
        # rounds, the default); read_only: in SQLite ([queue] deliver_every_s = 0 above)
        reason = (f"intake log {state}/queue.sqlite-intake: No space left on device"
                  if fault == "disk_full" else "disk I/O error")
        assert f"{state}/queue.sqlite: commit failed ({reason})" in log
        assert t.conflicting_duplicates == 0  # a batch sent again is the same readings
        if fault == "disk_full":
            assert "commits work again" in topo.gateway_log()  # by itself, same process
        assert (t.lost, t.accepted_corrupt) == (0, 0), t
        assert node.node_id in topo.upstream.readings[next(iter(topo.upstream.readings))]["n"]
    finally:
        await topo.stop()
