"""The gateway's clock (agent/timesync.py): the kernel's state, ACKs without a time while it is
unsynchronised, receipt times corrected by the step it takes, relative SenML times resolved."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import cbor2
import pytest
from node.window import open_ack
from prometheus_client import CollectorRegistry, generate_latest

from lantern.agent import protocol
from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.links.ble_session import start_message
from lantern.agent.queue.store import Accepted, Store
from lantern.agent.timesync import (
    GATEWAY_UNSYNCED,
    ClockState,
    TimeSync,
    read_adjtimex,
    read_timesyncd,
)
from lantern.tools.street.sim import gateway_toml
from tests.helpers.api import commit
from tests.helpers.timecheck import KernelClock

KEY = bytes(range(32))
KID = b"SL-0042"
Y2001 = 978_307_200


class Clocks:
    """A wall clock that can step, and a monotonic one that cannot."""

    def __init__(self, wall: float) -> None:
        self.mono = 100.0
        self.offset = wall - self.mono

    def wall(self) -> float:
        return self.mono + self.offset

    def tick(self, s: float) -> None:
        self.mono += s


def test_the_kernel_state_is_read_here() -> None:
    st = read_adjtimex()  # this machine's kernel, read only
    assert st.source == "adjtimex" and isinstance(st.synchronized, bool)
    assert st.maxerror_s is not None and st.maxerror_s >= 0 and "status 0x" in st.detail


def test_timesyncd_flag_file(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    assert read_timesyncd(flag).synchronized is False
    flag.touch()
    assert read_timesyncd(flag) == ClockState(True, "timesyncd", None, str(flag))


def test_no_time_in_acks_while_unsynchronised() -> None:
    kernel = KernelClock(False)
    c = Clocks(1_000.0)
    ts = TimeSync(probe=kernel, wall=c.wall, mono=lambda: c.mono)
    nk = protocol.NodeKey(KEY, KID)
    frame = ts.ack(nk, [5, 6])
    ftype, body = protocol.decode_frame(protocol.Deframer().feed(frame)[0])
    assert ftype == protocol.ACK
    seqs, gw_ms, ack = open_ack(body, KID, KEY)  # the node's own check: authentic
    assert seqs == [5, 6] and gw_ms is None and ack == {1: [5, 6]}
    assert ts.withheld == 1 and ts.health()["acks_without_time"] == 1

    kernel.synchronized = True
    ts = TimeSync(probe=kernel)
    frame = ts.ack(nk, [7])
    _, body = protocol.decode_frame(protocol.Deframer().feed(frame)[0])
    seqs, gw_ms, _ = open_ack(body, KID, KEY)
    assert seqs == [7] and isinstance(gw_ms, int) and gw_ms > 1_700_000_000_000


def test_ack_without_time_vector() -> None:
    """docs/protocol.md "Time": the bytes of an ACK for seq 6 from an unsynchronised gateway."""
    ts = TimeSync(probe=KernelClock(False))
    frame = ts.ack(protocol.NodeKey(KEY, KID), [6])
    doc = (Path(__file__).resolve().parents[2] / "docs/protocol.md").read_text()
    assert frame.hex() in doc.replace("\n", ""), frame.hex()


def test_a_step_on_syncing_corrects_what_was_stamped_before() -> None:
    kernel = KernelClock(False)
    c = Clocks(1_000.0)  # the Pi came up at its last saved time, far behind
    ts = TimeSync(probe=kernel, wall=c.wall, mono=lambda: c.mono)
    assert ts.synchronized is False and ts.ack_time_ms() is None
    received = c.wall()
    assert ts.correct(received) == (received, False)  # no step known yet: flagged
    c.tick(5)
    ts.state()  # (read again after CHECK_S)
    c.tick(5)
    kernel.synchronized = True
    c.offset += 1_764_331_200.0 - 1_000.0  # NTP steps the wall clock; monotonic runs on
    assert ts.synchronized
    assert ts.correct(received) == (pytest.approx(1_764_331_200.0), True)
    assert ts.correct(c.wall()) == (c.wall(), True)  # stamped synchronised: as it is


def test_relative_times_resolved_and_flagged(tmp_path: Path) -> None:
    kernel = KernelClock(False)
    c = Clocks(1_000.0)
    path = tmp_path / "clock.json"
    ts = TimeSync(probe=kernel, wall=c.wall, mono=lambda: c.mono, path=path)
    ts.state()
    # a time request: base time 0 ("now"); and a sample from a full hold, 30 s old
    request = [{"n": "urn:dev:lantern:SL-0042:time.q", "t": 0, "v": 1}]
    full = [{"n": "urn:dev:lantern:SL-0042:temperature", "t": -30, "u": "Cel", "v": 21.5},
            {"n": "urn:dev:lantern:SL-0042:time.q", "t": -30, "v": 1}]
    received = c.wall()
    # the gateway stops before its clock syncs: after a restart the span stays unknown
    ts2 = TimeSync(probe=KernelClock(True), wall=c.wall, mono=lambda: c.mono, path=path)
    got = ts2.fix_times([dict(r) for r in request], received)
    assert got == [{"n": request[0]["n"], "t": 1_000, "v": 1 | GATEWAY_UNSYNCED}]
    assert ts2.flagged == 1
    # the same gateway syncs: corrected by the step, no flag
    c.tick(2)
    kernel.synchronized = True
    c.offset += 500.0
    got = ts.fix_times([dict(r) for r in full], received)
    assert [r["t"] for r in got] == [1_470, 1_470] and got[1]["v"] == 1
    assert ts.corrected == 1
    saved = json.loads(path.read_text())["spans"]
    assert saved[0][2] == pytest.approx(500.0)
    # absolute times are left as they are; a pack without a time.q gets one when flagged
    absolute = [{"n": "urn:dev:lantern:SL-0042:uptime", "t": 1_764_331_200, "v": 3}]
    assert ts.fix_times([dict(r) for r in absolute], received) == absolute
    ts3 = TimeSync(probe=KernelClock(False), wall=c.wall, mono=lambda: c.mono)
    bare = [{"n": "urn:dev:lantern:SL-0042:uptime", "t": 0, "v": 3}]
    got = ts3.fix_times(bare, c.wall())
    assert got[-1]["n"].endswith(":time.q") and got[-1]["v"] == GATEWAY_UNSYNCED


def test_metrics_and_health() -> None:
    kernel = KernelClock(False)
    ts = TimeSync(probe=kernel)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ts.collector())
    text = generate_latest(reg).decode()
    assert "lantern_clock_synchronized 0.0" in text
    assert "lantern_clock_maxerror_seconds 16.0" in text
    h = ts.health()
    assert h["synchronized"] is False and h["source"] == "adjtimex" and h["mode"] == "kernel"
    trust = TimeSync(probe=kernel, mode="trust")
    assert trust.synchronized and trust.ack_time_ms() is not None
    with pytest.raises(ValueError, match="'kernel' or 'trust'"):
        TimeSync(mode="ntp")


def test_a_probe_that_fails_is_unknown_and_logged_once(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    calls = []

    def broken() -> ClockState:
        calls.append(1)
        raise OSError(1, "Operation not permitted")

    t = [0.0]
    ts = TimeSync(probe=broken, mono=lambda: t[0])
    assert ts.state().source == "unknown" and not ts.synchronized
    t[0] += 2
    ts.state()
    assert len(calls) == 2
    assert len([r for r in caplog.records if "cannot read" in r.message]) == 1


GATEWAY_TOML = """[gateway]
state_dir = "state"
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB-lantern-test"

[sinks.http]
url = "http://127.0.0.1:9/"
"""


@pytest.mark.parametrize(("table", "mode"), [("", "kernel"), ('[clock]\nmode = "kernel"\n',
                                                             "kernel"),
                                             ('[clock]\nmode = "trust"\n', "trust")])
def test_clock_mode_config(tmp_path: Path, table: str, mode: str) -> None:
    (tmp_path / "gateway.toml").write_text(GATEWAY_TOML + table)
    assert load_config(tmp_path / "gateway.toml").clock.mode == mode


@pytest.mark.parametrize(("table", "says"), [
    ('[clock]\nmode = "ntp"\n', 'line 11: clock.mode: expected "kernel"'),
    ('[clock]\nmode = "trust"\nstep = true\n', "line 12: clock.step: unknown key; expected"),
    ('[clock]\nmode = 1\n', "clock.mode"),
])
def test_clock_config_refused(tmp_path: Path, table: str, says: str) -> None:
    (tmp_path / "gateway.toml").write_text(GATEWAY_TOML + table)
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(tmp_path / "gateway.toml")


def test_a_simulated_street_trusts_the_host_clock(tmp_path: Path) -> None:
    """tools/street/sim.py's config (lantern sim, lantern demo, the hil tests): nodes are given
    this machine's time even where no time daemon has synchronised it (docs/time.md)."""
    args = (tmp_path / "state", tmp_path / "keys.toml", ["/dev/pts/99"], "http://127.0.0.1:9/")
    (tmp_path / "gateway.toml").write_text(gateway_toml(*args))
    assert load_config(tmp_path / "gateway.toml").clock.mode == "trust"
    (tmp_path / "gateway.toml").write_text(gateway_toml(*args, clock=None))
    assert load_config(tmp_path / "gateway.toml").clock.mode == "kernel"


def test_the_ble_start_carries_no_time() -> None:
    """A start ACK names no frame, so no node sets its clock from it; it carries no time at all,
    synchronised or not (the ACKs of the drain carry it when the clock is synchronised)."""
    nonce = bytes(range(8))
    msg = start_message(KEY, KID.decode(), nonce)
    assert msg[0] == protocol.ACK
    seqs, gw_ms, ack = open_ack(msg[1:], KID, KEY)  # the node's own check: authentic
    assert seqs == [] and gw_ms is None and ack == {1: [], 3: nonce}


async def test_the_readings_api_shows_relative_times_anchored(tmp_path: Path) -> None:
    """The history behind /api/nodes/<id>/readings keeps what the queue resolved: a time request
    and a full hold's oldest sample at their receipt (less their age), never 1970."""
    request = cbor2.dumps([{0: "time.q", 2: 1, -3: 0}])
    full = cbor2.dumps([{0: "time.q", 2: 1, -3: -30}, {0: "uptime", 2: 40}])
    async with Store(tmp_path / "queue.sqlite") as store:
        store.out.clock = TimeSync(probe=KernelClock(True))
        t0 = time.time()
        await commit(store, [Accepted("SL-0042", 6, b"cose", None, pack=request, n=1),
                             Accepted("SL-0042", 8, b"cose", None, pack=full, n=2)])
        rows, more, times = await store.recent("SL-0042", 0, 100)
        t1 = time.time()
        overview = await store.overview()
    assert not more and len(rows) == 3, rows
    request_t = [r["t"] for r in rows if r["n"] == "time.q"]
    uptime_t = [r["t"] for r in rows if r["n"] == "uptime"]
    assert len(request_t) == 2 and uptime_t
    assert all(round(t0) - 31 <= t <= t1 + 1 for t in request_t + uptime_t), rows
    assert max(request_t) - uptime_t[0] == pytest.approx(30, abs=1), rows
    assert all(t > Y2001 for t in times)
    latest = overview["latest"]["SL-0042"]
    assert latest["uptime"]["t"] == uptime_t[0] and latest["time.q"]["t"] > Y2001
