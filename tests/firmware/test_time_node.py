"""A node whose clock starts at the epoch (an ESP32 after a power cut) seals no wrong time.

The firmware on the MicroPython unix port with node.json `clock_at_epoch` (node/hal/unix.py:
its clock counts from 1970 at every boot until the gateway's time sets it), the gateway's real
ingest and serial link in this process (tests/helpers/gateway_node.py), and a gateway clock the
test switches (the kernel's adjtimex state, tests/helpers/timecheck.py). Every reading's time
is checked against the host's clock through the pack's own `uptime`: boot + uptime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lantern.agent.timesync import BEFORE, GATEWAY_UNSYNCED, RELATIVE, TimeSync
from tests.helpers.gateway_node import NodeLine, node_line
from tests.helpers.timecheck import KernelClock, Pack, packs, use_clock

pytestmark = pytest.mark.micropython

NODE = "SL-0001"
SLACK_S = 4  # the node's start (imports, sensors) lies between the host's stamp and uptime 0


def _flag(p: Pack) -> int:
    return int(p.value("time.q") or 0)


def _held(out: str) -> int:
    """Samples the node held (each cycle without a time prints one of the two)."""
    return out.count("sample held") + out.count("time request")


@contextlib.asynccontextmanager
async def epoch_node(tmp_path: Path, **extra: object
                     ) -> AsyncIterator[tuple[NodeLine, KernelClock, TimeSync, float]]:
    """A node whose clock starts at the epoch, behind a gateway whose clock is unsynchronised
    (the test switches it); and the host's time just before the node started."""
    kernel = KernelClock(synchronized=False)
    ts = TimeSync(probe=kernel)
    t0 = time.time()
    async with node_line(tmp_path, NODE, interval_ms=400,
                         extra={"clock_at_epoch": True, **extra}) as line:
        use_clock(line.ingest, ts)
        yield line, kernel, ts, t0


async def test_held_until_the_gateway_syncs_then_timed_right(tmp_path: Path) -> None:
    async with epoch_node(tmp_path, sample_limit=10) as (line, kernel, ts, t0):
        # the gateway is unsynchronised: ACKs carry no time, the node holds its samples
        await line.until(lambda: _held(line.output()) >= 3, 30,
                         "three samples held while the gateway's clock is unsynchronised")
        sealed = [ln for ln in line.output().splitlines() if ln.startswith("sample seq=")]
        assert sealed and all("(time request" in ln for ln in sealed)  # no time sealed
        assert ts.withheld >= 1
        kernel.synchronized = True
        await line.until(lambda: line.output().count("(held)") >= 3
                         and line.output().count("(time request") + 10
                         <= line.output().count("sample seq="), 60,
                         "every sample sealed once the gateway synced")
        await line.until(lambda: len([p for p in packs(line.state_dir / "queue.sqlite", NODE, ts)
                                      if p.value("uptime") is not None]) >= 10, 30,
                         "all packs acknowledged")
        got = packs(line.state_dir / "queue.sqlite", NODE, ts)
    requests = [p for p in got if p.value("uptime") is None]
    readings = [p for p in got if p.value("uptime") is not None]
    assert len(readings) == 10
    assert requests and all(_flag(p) & RELATIVE for p in requests)
    # a time request received while the gateway was unsynchronised: flagged, not dated 1970
    for p in requests:
        assert min(p.times) > t0 - 60, p
    for p in readings:
        true = t0 + p.value("uptime")
        (t,) = p.times
        assert true - 1 <= t <= true + SLACK_S, (p.seq, t - true, p.records)
        assert _flag(p) == 0, p  # held, then timed exactly: no flag needed
    # the held ones came after the sync, in their sampling order
    assert [p.value("uptime") for p in readings] == sorted(p.value("uptime") for p in readings)


async def test_power_cut_before_any_sync_flags_the_held_samples(tmp_path: Path) -> None:
    async with epoch_node(tmp_path) as (line, kernel, ts, t0):
        await line.until(lambda: _held(line.output()) >= 3, 30,
                         "three samples held")
        line.node.kill()  # power cut: the board's clock is gone, the held samples are not
        cut = time.time()
        held_before = _held(line.output())
        await asyncio.sleep(1.5)  # dark: the next boot's clock starts at the epoch again
        t1 = time.time()
        line.start_node()
        await line.until(lambda: line.output().count("lantern node") >= 2, 30, "the reboot")
        kernel.synchronized = True
        await line.until(lambda: line.output().count("(held)") >= held_before - 1, 60,
                         "the first run's samples sealed")
        await line.until(lambda: len([p for p in packs(line.state_dir / "queue.sqlite", NODE, ts)
                                      if _flag(p) & BEFORE]) >= 2, 30, "them acknowledged")
        got = packs(line.state_dir / "queue.sqlite", NODE, ts)
    before = [p for p in got if _flag(p) & BEFORE]
    later = [p for p in got if p.value("uptime") is not None and not _flag(p)]
    assert len(before) >= 2
    for p in before:
        (t,) = p.times
        # an upper bound: the second boot's start; taken before the cut
        assert t0 + p.value("uptime") - 1 <= cut <= t + 1, (t - cut, p.records)
        assert t <= t1 + SLACK_S, (t - t1, p.records)
    for p in later:  # the second run's own: exact
        (t,) = p.times
        assert t1 + p.value("uptime") - 1 <= t <= t1 + p.value("uptime") + SLACK_S, p.records


async def test_a_full_hold_sends_the_oldest_relative_to_its_receipt(tmp_path: Path) -> None:
    async with epoch_node(tmp_path, max_untimed=2) as (line, kernel, ts, t0):
        await line.until(lambda: line.output().count("(held)") >= 3, 30,
                         "samples sealed out of a full hold")
        kernel.synchronized = True
        await asyncio.sleep(1.2)  # the gateway's state is read again (CHECK_S)
        await line.until(lambda: any(p.value("uptime") is not None and not _flag(p)
                                     for p in packs(line.state_dir / "queue.sqlite", NODE, ts)),
                         30, "a pack timed by the node")
        got = packs(line.state_dir / "queue.sqlite", NODE, ts)
    relative = [p for p in got if p.value("uptime") is not None and _flag(p) & RELATIVE]
    assert len(relative) >= 3
    for p in relative:
        (t,) = {r["t"] for r in p.records}
        true = t0 + p.value("uptime")
        # received within a second of sealing, while this test's gateway was unsynchronised
        # (its clock right all along: the step is 0, so receipt + offset is the reading's time)
        assert true - 1 <= t <= true + SLACK_S, (t - true, p.records)
        assert not _flag(p) & GATEWAY_UNSYNCED  # its receipt time was corrected (by 0 s)
