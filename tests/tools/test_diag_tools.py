"""`lantern diag` on CPython: the gateway report's verdicts, the node view's problem rules and
terminal rendering, and what the tools say when a gateway cannot be read.

Against live nodes on MicroPython and a running gateway: hil_tests/test_diag.py.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from rich.console import Console

from lantern.agent.config import write_secret
from lantern.tools.field import diag_gateway as dg
from lantern.tools.field import diag_view as dv
from lantern.tools.field.nodelink import Identity, Reading

NOW = 1_764_331_200.0


def api_answers(**over: Any) -> dict[str, Any]:
    """What fetch() gathers from a healthy gateway with two nodes (shapes of agent/api.py)."""
    node = {"configured": True, "last_seen": NOW - 5, "age_s": 5.0, "interval_s": 60.0,
            "link": "serial:/dev/ttyUSB0", "last_seq": 7, "outbox": 0, "battery": None,
            "duplicates": 0, "flags": []}
    raw = {
        "health": {"status": "ok", "live": True, "ready": True},
        "status": {"version": "0.1.0", "summary": "2/2 nodes seen",
                   "queue": {"readings": 0, "bytes": 0, "oldest_age_s": None,
                             "dead_letters": 0, "evictions": 0},
                   "upstream": {"http": {"state": "ok"}},
                   "links": [{"name": "serial:/dev/ttyUSB0", "up": True}],
                   "counters": {"frames_rejected": {"crc": 2}}},
        "nodes": {"now": NOW, "nodes": [dict(node, id="SL-0001"), dict(node, id="SL-0002")]},
        "readings": {"SL-0001": {"node": "SL-0001", "gaps": []},
                     "SL-0002": {"node": "SL-0002", "gaps": [[NOW - 900, NOW - 600]]}},
    }
    raw.update(over)
    return raw


def test_healthy_gateway() -> None:
    rep = dg.report("http://x/", api_answers())
    assert (rep["state"], rep["exit"], rep["problems"]) == ("healthy", 0, [])
    assert rep["rejections"] == {"crc": 2}
    n2 = rep["nodes"][1]
    assert (n2["gaps"], n2["gap_s"]) == (1, 300.0)
    assert rep["notes"] == ["node SL-0002: 1 gap(s) in the last hour, 300 s without readings"]


@pytest.mark.parametrize(("change", "problem"), [
    (lambda r: r["nodes"]["nodes"][0].update(flags=["stale"], age_s=400.0),
     "node SL-0001: stale (last seen 7 min ago)"),
    (lambda r: r["nodes"]["nodes"][1].update(flags=["never seen"], age_s=None),
     "node SL-0002: never seen"),
    (lambda r: r["status"]["upstream"].update(http={"state": "failing"}), "upstream http: failing"),
    (lambda r: r["status"]["links"][0].update(up=False), "link serial:/dev/ttyUSB0: down"),
    (lambda r: r["status"]["queue"].update(oldest_age_s=4000.0),
     "queue: the oldest reading has waited 67 min for upstream"),
    (lambda r: r["health"].update(status="degraded"), "gateway reports itself degraded"),
])
def test_degraded_gateway_says_why(change: Any, problem: str) -> None:
    raw = copy.deepcopy(api_answers())
    change(raw)
    rep = dg.report("http://x/", raw)
    assert (rep["state"], rep["exit"]) == ("degraded", 1)
    assert problem in rep["problems"]


def test_security_rejections_are_pointed_out() -> None:
    raw = api_answers()
    raw["status"]["counters"]["frames_rejected"] = {"mac": 3, "crc": 9}
    notes = dg.report("http://x/", raw)["notes"]
    assert any(n.startswith("3 frames rejected as mac") for n in notes)
    assert not any("as crc" in n for n in notes)


def test_renders_for_a_person() -> None:
    raw = api_answers()
    raw["nodes"]["nodes"][0]["flags"] = ["stale"]
    console = Console(record=True, width=140)
    dg.render(dg.report("http://x/", raw), console)
    text = console.export_text()
    assert "gateway DEGRADED at http://x/" in text and "✗ node SL-0001: stale" in text
    assert "rejected frames: crc 2" in text and "SL-0002" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_and_token_errors_say_what_to_do() -> None:
    url = f"http://127.0.0.1:{_free_port()}/"
    rep = await dg.diagnose(url, None, 2.0)
    assert (rep["state"], rep["exit"]) == ("unreachable", 2)
    assert rep["problems"][0].startswith(f"no gateway API at {url}")

    async def locked(request: web.Request) -> web.Response:
        return web.Response(status=401, text="a bearer token is required")

    app = web.Application()
    app.router.add_get("/{tail:.*}", locked)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        rep = await dg.diagnose(f"http://127.0.0.1:{port}/", None, 2.0)
        assert rep["exit"] == 2 and "pass --token-file" in rep["problems"][0]
    finally:
        await runner.cleanup()


def test_url_and_token_come_from_the_gateway_config(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_secret(keys, '[nodes]\n"SL-1" = "' + "00" * 32 + '"\n')
    write_secret(tmp_path / "token", "s3cret\n")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nstate_dir = "{tmp_path}"\nkeys_file = "keys.toml"\n'
                   '[[links.serial]]\nport = "/dev/ttyUSB0"\n[sinks.http]\n'
                   'url = "http://127.0.0.1:9/"\n[api]\nport = 9123\ntoken_file = "token"\n')
    assert dg.url_from_config(cfg) == ("http://127.0.0.1:9123/", tmp_path / "token")


# ---- node view ----

STATUS: dict[str, Any] = {
    "id": "SL-0001", "fw": "0.1.0", "board": "unix-sim", "mpy": "1.25.0", "platform": "linux",
    "cfg": {"interval_ms": 60000, "max_frames": 1000, "pole": "42", "location": [52.3, 4.9]},
    "outbox": 2, "evicted": 0, "next_seq": 9, "clock": {"now_ms": 0, "synced": True},
    "link": {"sent": 5, "retransmits": 1, "acked": 4, "rx_errors": 0, "crc_errors": 0,
             "bad_acks": 0, "last_ack_age_ms": 1500},
    "battery": None, "heap": {"free": 60000, "peak": 50000}, "uptime_s": 100, "cycle_ms": 40,
    "sensors": [["bme280@0x76", True, 0], ["scd4x@0x62", True, 3]], "faults": [],
}


@pytest.mark.parametrize(("change", "problem"), [
    ({"faults": [["outbox_full", 2, "3 oldest frames dropped"]]},
     "fault outbox_full (x2): 3 oldest frames dropped"),
    ({"clock": {"now_ms": 0, "synced": False}}, "clock never set by a gateway"),
    ({"outbox": 25}, "25 frames waiting in the outbox"),
    ({"heap": {"free": 9000, "peak": 1}}, "heap low: 9000 bytes free"),
    ({"sensors": [["scd4x@0x62", False, 7]]}, "sensor scd4x@0x62 not answering"),
])
def test_node_problems(change: dict[str, Any], problem: str) -> None:
    assert dv.node_problems(STATUS, 10.0) == []
    assert any(p.startswith(problem) for p in dv.node_problems({**STATUS, **change}, 10.0))


def test_clock_offset_and_self_test_failures_are_problems() -> None:
    assert dv.node_problems(STATUS, -7200.0) == ["clock is -7.2 s off this computer's"]
    tests = [{"name": "bme280@0x76", "ok": False, "error": "NackError: no acknowledge"}]
    assert dv.node_problems(STATUS, 0.0, tests) == [
        "self-test bme280@0x76: FAIL (NackError: no acknowledge)"]


def test_node_report_and_view() -> None:
    ident = Identity("SL-0001", "0.1.0", "unix-sim", 5, 0, 1, True)
    pack = Reading("SL-0001", 8, True, [
        {"n": "urn:dev:lantern:SL-0001:battery", "u": "V", "v": 3.9, "t": NOW},
        {"n": "urn:dev:lantern:SL-0001:pm2_5", "u": "ug/m3", "v": 7.5, "t": NOW},
        {"n": "urn:dev:lantern:SL-0001:pm2_5.q", "v": 1, "t": NOW},
        {"n": "urn:dev:lantern:SL-0001:co2.q", "v": 129, "t": NOW}])
    rep = dv.node_report("/dev/ttyUSB0", ident, dict(STATUS), 0.012, 150.0, pack)
    assert rep["healthy"] and rep["battery"] == {"n": "battery", "v": 3.9, "u": "V"}
    assert rep["latest"]["values"]["pm2_5"] == {"v": 7.5, "u": "ug/m3"}
    console = Console(record=True, width=140)
    console.print(dv.render_node(rep))
    text = console.export_text()
    for want in ("SL-0001", "key verified", "every 60 s", "pole 42", "3.9 V", "last ACK",
                 "1.5 s ago", "round trip 12 ms", "+0.15 s", "warmup", "warmup, failed",
                 "no problems found"):
        assert want in text, want
    assert "receive failures" not in text  # shown only when the node survived some
    status = dict(STATUS, link=dict(STATUS["link"], rx_failures=3, tx_failures=2,
                                    advert_failures=1), seal_errors=4)
    rep = dv.node_report("/dev/ttyUSB0", ident, status, 0.012, 150.0, pack)
    console = Console(record=True, width=200)
    console.print(dv.render_node(rep))
    text = console.export_text()
    for want in ("receive failures 3", "send failures 2", "advert failures 1"):
        assert want in text, want
    assert rep["problems"] == ["4 packs lost since boot: the node could not save a sequence "
                               "number (flash full or failing)"]


def test_jsonable() -> None:
    assert dv.jsonable({1: b"\x01\xff", "x": (1, [b""])}) == {"1": "01ff", "x": [1, [""]]}


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    tok.chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "lantern", "diag", "gateway", "--url",
                        "http://127.0.0.1:9/", "--token-file", str(tok)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "lets other users read a secret" in r.stderr, r.stderr
    assert "s3cret" not in r.stderr + r.stdout
