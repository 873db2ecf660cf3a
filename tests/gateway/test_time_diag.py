"""Clock trouble where a technician looks: `lantern diag gateway` names an unsynchronised gateway
clock in one line, `lantern diag node` shows the samples a node holds for the time, and
`lantern gateway check-config` lists [clock]."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from rich.console import Console

from lantern.agent.cli import describe
from lantern.agent.config import load_config
from lantern.agent.timesync import TimeSync
from lantern.tools.field import diag_gateway as dg
from lantern.tools.field import diag_view as dv
from lantern.tools.field.nodelink import Identity
from tests.helpers.timecheck import KernelClock

NOW = 1_764_331_200.0
# a STATUS as node/commands.py answers it, only what the view reads
STATUS: dict[str, Any] = {
    "mpy": "1.25.0", "platform": "linux", "cfg": {"interval_ms": 60000}, "outbox": 0,
    "next_seq": 3, "clock": {"now_ms": 0, "synced": True}, "link": {},
    "heap": {"free": 60000, "peak": 50000}, "sensors": [], "faults": []}


def api_answers() -> dict[str, Any]:
    """What fetch() gathers from a gateway with no nodes (shapes of agent/api.py)."""
    return {"health": {"status": "ok"},
            "status": {"summary": "0 nodes", "upstream": {}, "links": [],
                       "queue": {"readings": 0, "bytes": 0, "oldest_age_s": None},
                       "counters": {}},
            "nodes": {"now": NOW, "nodes": []}, "readings": {}}


def _unsynced() -> dict[str, Any]:
    ts = TimeSync(probe=KernelClock(False), wall=lambda: NOW - 7200)
    ts.ack_time_ms()  # one ACK went out without the time
    return ts.health()


def test_diag_gateway_names_an_unsynchronised_clock_in_one_line() -> None:
    raw = copy.deepcopy(api_answers())
    raw["health"].update(status="degraded", clock=_unsynced())
    rep = dg.report("http://x/", raw)
    assert rep["state"] == "degraded"
    clock = [p for p in rep["problems"] if "clock" in p and "NOT synchronised" in p]
    assert len(clock) == 1, rep["problems"]
    line = clock[0]
    for want in ("adjtimex: test", "2.0 h ago", "nodes are not given the time",
                 "hold their samples", "time.q"):
        assert want in line, (want, line)
    assert "gateway reports itself degraded (its clock, above)" in rep["problems"]
    console = Console(record=True, width=400)
    dg.render(rep, console)
    text = console.export_text()
    assert line in text and "clock: NOT synchronised (adjtimex, mode kernel), 1 ACKs" in text


def test_diag_gateway_synchronised_clock_is_no_problem() -> None:
    raw = copy.deepcopy(api_answers())
    health = TimeSync(probe=KernelClock(True)).health()
    raw["health"].update(clock=health)
    rep = dg.report("http://x/", raw)
    assert rep["state"] == "healthy" and rep["problems"] == []
    raw["health"]["clock"] = dict(health, state_refused=1)
    assert any("clock.json.bad" in n for n in dg.report("http://x/", raw)["notes"])


def test_diag_node_shows_held_samples() -> None:
    st = dict(STATUS, clock={"now_ms": 0, "synced": False}, held=17)
    problems = dv.node_problems(st, None)
    assert any(p.startswith("clock never set") and "(17 held)" in p for p in problems)
    ident = Identity("SL-0001", "0.1.0", "unix-sim", 5, 0, 1, True)
    rep = dv.node_report("/dev/ttyUSB0", ident, st, 0.01, 0.0, None)
    console = Console(record=True, width=200)
    console.print(dv.render_node(rep))
    assert "17 held for the time" in console.export_text()
    # an older node's STATUS has no "held": nothing said about it
    rep = dv.node_report("/dev/ttyUSB0", ident, dict(STATUS), 0.01, 0.0, None)
    console = Console(record=True, width=200)
    console.print(dv.render_node(rep))
    assert "held" not in console.export_text() and rep["healthy"]


def test_check_config_lists_the_clock(tmp_path: Path) -> None:
    for mode in ("kernel", "trust"):
        conf = tmp_path / f"{mode}.toml"
        conf.write_text('[gateway]\nstate_dir = "state"\nkeys_file = "keys.toml"\n\n'
                        '[[links.serial]]\nport = "/dev/ttyUSB0"\n\n[sinks.http]\n'
                        f'url = "http://127.0.0.1:9/"\n\n[clock]\nmode = "{mode}"\n')
        text = describe(load_config(conf))
        assert f"  clock:   mode {mode}: " in text, text
