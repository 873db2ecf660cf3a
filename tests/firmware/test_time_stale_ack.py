"""A relay that holds an authentic ACK back cannot set a node's clock to a stale time.

The attack: whoever sits on the link (a BLE relay, a tap on the serial line) cannot forge an
ACK, but can record one and deliver it late. The node's time request is acknowledged with the
gateway's time; the relay keeps that ACK (and every later one) while the node resends its
request and holds its samples, then delivers the first, by now stale, ACK alone. A node that
took its time from it would seal every held sample that much too early, without a flag.

The firmware on the MicroPython unix port with node.json `clock_at_epoch` (its clock starts at
1970), its real UART link and window (node/window.py, shared with the BLE link), the gateway's
real ingest and serial link (tests/helpers/gateway_node.py), a synchronised gateway clock.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from lantern.agent.timesync import TimeSync
from lantern.tools.street.faults import Deliver, Faults, FaultSpec
from tests.helpers.gateway_node import node_line
from tests.helpers.timecheck import KernelClock, packs, use_clock

pytestmark = pytest.mark.micropython

NODE = "SL-0001"
SLACK_S = 4  # the node's start (imports, sensors) lies between the host's stamp and uptime 0
STALE_S = 20  # how long the relay holds the ACK back (node/window.py TIME_FRESH_MS is 15 s)
SAMPLES = 60


class AckThief(Faults):
    """The link in the gateway → node direction kept back, frame by frame, until `release`."""

    def __init__(self) -> None:
        super().__init__(FaultSpec(), 0)
        self.kept: list[bytes] = []
        self.first_at: float | None = None
        self._partial = b""
        self._holding = True
        self._deliver: Deliver | None = None

    def feed(self, direction: str, data: bytes, deliver: Deliver) -> None:
        if direction == "up" or not self._holding:
            deliver(data)
            return
        self._deliver = deliver
        *frames, self._partial = (self._partial + data).split(b"\x00")
        for f in frames:
            if f:
                self.kept.append(f + b"\x00")
                if self.first_at is None:
                    self.first_at = time.monotonic()

    def release(self) -> None:
        """The first ACK kept, alone; the link passes everything from now on."""
        assert self._deliver is not None
        self._holding = False
        self._deliver(self.kept[0] + self._partial)


async def test_a_delayed_authentic_ack_does_not_set_the_clock_back(tmp_path: Path) -> None:
    ts = TimeSync(probe=KernelClock(synchronized=True))
    t0 = time.time()
    thief = AckThief()
    async with node_line(tmp_path, NODE, interval_ms=400,
                         extra={"clock_at_epoch": True, "sample_limit": SAMPLES}) as line:
        use_clock(line.ingest, ts)
        line.relay.faults = thief
        await line.until(lambda: thief.first_at is not None, 30,
                         "the gateway's ACK of the time request (kept by the relay)")
        assert thief.first_at is not None
        await asyncio.sleep(STALE_S - (time.monotonic() - thief.first_at))  # the attack's delay
        assert len(thief.kept) >= 2  # the node resent its request: the gateway ACKed it again
        thief.release()
        await line.until(lambda: len([p for p in packs(line.state_dir / "queue.sqlite", NODE, ts)
                                      if p.value("uptime") is not None]) >= SAMPLES, 60,
                         "every sample sealed and acknowledged")
        got = packs(line.state_dir / "queue.sqlite", NODE, ts)
        out = line.output()
    readings = [p for p in got if p.value("uptime") is not None]
    assert len(readings) == SAMPLES
    held = [p for p in readings if p.value("uptime") < STALE_S]
    assert len(held) >= 20, [p.value("uptime") for p in readings]
    for p in readings:
        true = t0 + p.value("uptime")
        (t,) = p.times
        # the stale ACK's time would put the held samples STALE_S early
        assert true - 1 <= t <= true + SLACK_S, (p.seq, round(t - true, 1), p.records)
        assert p.value("time.q") is None, p.records
    assert "no time taken from it" in out
