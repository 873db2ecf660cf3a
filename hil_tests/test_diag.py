"""`lantern diag node` against nodes running the firmware on MicroPython, over their link.

The CLI runs as its own process, as a technician runs it, on the port the gateway would use
(the relay's gateway side); the relay's tap sees every byte, so the tests can prove that the
tool never acknowledged a DATA frame. `lantern diag gateway` runs against a gateway process.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lantern.agent import protocol
from lantern.tools.field import nodelink as nl
from lantern.tools.street.sim import Relay

from .harness.topology import Topology

CLI = [sys.executable, "-m", "lantern"]


async def lantern(*args: str, timeout: float = 90) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop that relays the node's bytes."""
    proc = await asyncio.create_subprocess_exec(*CLI, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def diag_json(topo: Topology, *args: str, node: int = 0) -> tuple[int, Any]:
    code, out, err = await lantern("diag", "node", *args, "--port",
                                   topo.relays[node].gateway_port, "--keys",
                                   str(topo.workdir / "keys.toml"), "--timeout", "5", "--json")
    assert out.strip(), f"no JSON (exit {code}): {err}"
    return code, json.loads(out.strip().splitlines()[-1])


async def started(tmp_path: Path, **kw: Any) -> Topology:
    topo = Topology(tmp_path, n_nodes=1, **kw)
    await topo.start(gateway=False)  # the tool takes the gateway's place on the link
    await topo.wait_for(lambda: len(topo.sampled(topo.nodes[0])) >= 2, 60, "two samples")
    return topo


async def test_status_shows_the_node_and_never_acknowledges(tmp_path: Path) -> None:
    topo = await started(tmp_path, interval_ms=500)
    try:
        node = topo.nodes[0]
        code, rep = await diag_json(topo, "status")
        assert code == 1, rep  # a node no gateway has acknowledged has an unsynced clock
        ident, st = rep["identity"], rep["status"]
        assert ident == {"id": "SL-0001", "firmware": "0.1.0", "board": "unix-sim",
                         "protocol": 1, "verified": True}
        assert st["mpy"] == "1.25.0" and st["platform"] == "linux"
        assert st["cfg"]["interval_ms"] == 500
        assert st["clock"]["synced"] is False
        assert any("clock never set" in p for p in rep["problems"])
        assert st["link"]["acked"] == 0 and st["link"]["last_ack_age_ms"] is None
        assert st["link"]["sent"] >= 1
        assert st["heap"]["free"] > 0 and st["uptime_s"] >= 0
        assert [s[0] for s in st["sensors"]] and all(s[1] for s in st["sensors"])
        # the energy model (node/sampler.py: the board's currents for the microcontroller, the
        # radio and every sensor): per interval, per reading, a day, the cell's days
        e = st["energy"]
        assert e["mj_interval"] > 0 and e["mj_reading"] > 0 and e["mah_day"] > 0, e
        assert e["days"] == pytest.approx(3500 / e["mah_day"], rel=0.01, abs=0.1), e  # 3.5 Ah
        assert e["saving"] is False, e
        # the newest pack, verified under the node key and decoded
        lat = rep["latest"]
        assert lat["verified"] is True and lat["node"] == "SL-0001"
        # the tool asks for the status, then for the newest pack: one sealed in between
        # (a 500 ms interval on a busy machine) is newer than the status counted
        assert lat["seq"] >= st["next_seq"] - 1
        assert {"uptime", "heap_free"} <= set(lat["values"])
        # nothing acknowledged: every sealed frame is still in the node's outbox
        assert lat["seq"] in topo.outbox(node)
        topo.collect_output()
        assert topo.wires["SL-0001"].ack_frames == 0
        assert set(topo.sampled(node)) <= set(topo.outbox(node))
        assert st["outbox"] >= 2
    finally:
        await topo.stop()


async def test_self_test_reads_every_sensor(tmp_path: Path) -> None:
    topo = await started(tmp_path, interval_ms=1000)
    try:
        code, rep = await diag_json(topo, "self-test")
        topo.collect_output()
        assert "self_test" in rep, (rep, [line for line in topo.output(
            topo.nodes[0]).splitlines() if not line.startswith("sample seq=")])
        tests = rep["self_test"]
        assert tests, rep
        assert (code, rep["ok"]) == (0, True), tests  # the default street: every chip healthy
        for t in tests:
            assert set(t) >= {"name", "ok", "values", "raw", "error", "ms", "i"}
            assert t["ok"] == (t["error"] is None)
            if t["ok"]:
                assert t["values"]
        assert [t["i"] for t in tests] == list(range(len(tests)))
    finally:
        await topo.stop()


async def test_commands_change_the_node(tmp_path: Path) -> None:
    topo = await started(tmp_path, interval_ms=500, node_extra={"max_frames": 3},
                         sample_limit=6)
    node = topo.nodes[0]
    try:
        await topo.wait_for(lambda: len(topo.sampled(node)) >= 6, 60, "six samples")
        _, rep = await diag_json(topo, "status")
        assert "status" in rep, rep
        assert rep["status"]["evicted"] == 3
        assert ["outbox_full", 1, "3 oldest frames dropped"] in rep["status"]["faults"]

        code, res = await diag_json(topo, "clear-faults")
        assert code == 0 and res["result"]["cleared"] >= 1
        code, res = await diag_json(topo, "set-interval", "2.5")
        assert (code, res["result"]) == (0, {"interval_ms": 2500})
        assert (node.state_dir / "interval_ms").read_text() == "2500"
        code, res = await diag_json(topo, "sync-time")
        assert code == 0 and res["ok"]
        code, res = await diag_json(topo, "identify", "3")
        assert res["result"] == {"identify_s": 3, "how": "console"}
        await topo.wait_for(lambda: "identify: node SL-0001 is here (3 s)" in topo.output(node),
                            30, "the identify line on the node's console")

        code, rep = await diag_json(topo, "status")
        st = rep["status"]
        assert st["faults"] == [] and st["cfg"]["interval_ms"] == 2500
        assert st["clock"]["synced"] is True
        assert abs(rep["clock_offset_ms"]) < 2000
        assert code == 0, rep["problems"]
        assert st["cmd"]["accepted"] >= 6
    finally:
        await topo.stop()


async def test_reboot_and_replay(tmp_path: Path) -> None:
    topo = await started(tmp_path, interval_ms=500)
    node = topo.nodes[0]
    t = nl.SerialTransport(topo.relays[0].gateway_port, 115200)
    await t.open()
    try:
        s = nl.NodeSession(t, {node.node_id: node.key}, timeout=5)
        await s.probe()
        code, res, _ = await s.command(nl.OP_SET_INTERVAL, {1: 1500})
        assert (code, res) == (0, {"interval_ms": 1500})
        # recorded on the line: this exact frame will be played back after the reboot.
        # (Its counter comes from the session: the clock alone can repeat the last command's
        # counter when the node answered within the millisecond, and the node refuses it.)
        counter = s.next_counter()
        reboot = nl.command_frame(node.key, node.node_id, counter, nl.OP_REBOOT)
        t.send(reboot)
        f = await s.wait_for_frame((protocol.STATUS, protocol.REPLY), 5)
        assert f is not None and f[0] == protocol.REPLY, f
        _, replied_to, payload = nl.unseal(node.key, f[1], protocol.REPLY)
        assert replied_to == counter and payload[3] == {"rebooting": True}
        assert node.proc is not None
        deadline = time.monotonic() + 10
        while node.proc.poll() is None and time.monotonic() < deadline:
            await s.watch(0.1)
        topo.collect_output()
        console = [ln for ln in topo.output(node).splitlines() if not ln.startswith("sample seq=")]
        # the unix board's reset: its supervisor restarts it
        assert node.proc.returncode == 75, console[-30:]
        assert "reboot requested over the link" in console
        node.start(stdout=subprocess.PIPE)
        await topo.wait_for(lambda: topo.output(node).count("lantern node SL-0001") == 2, 60,
                            "the node to start again")
        s2 = nl.NodeSession(t, {node.node_id: node.key}, timeout=5)
        ident = await s2.probe()
        assert ident.floor == counter  # kept in flash across the reboot
        f = None
        for _ in range(5):  # the replay, repeated as a tool would if no answer came
            t.send(reboot)
            f = await s2.wait_for_frame((protocol.STATUS, protocol.REPLY), 1.0)
            if f:
                break
        assert f is not None and f[0] == protocol.STATUS
        assert nl.parse_status(f[1], node.key).reason == nl.R_REPLAY
        await asyncio.sleep(0.5)
        assert node.proc.poll() is None  # still running: the replayed reboot did nothing
        code, st, _ = await s2.command(nl.OP_STATUS)
        assert st["cfg"]["interval_ms"] == 1500  # the interval survived the reboot
        assert st["uptime_s"] < 30
    finally:
        await t.close()
        await topo.stop()


async def test_helpful_errors(tmp_path: Path) -> None:
    silent = Relay("nobody")  # a port with nothing on the other end
    silent.start()
    try:
        code, _, err = await lantern("diag", "node", "--port", silent.gateway_port,
                                       "--timeout", "0.5")
        assert code == 2
        assert re.search(rf"no node answered on {silent.gateway_port} at 115200 baud: is it "
                         r"powered\? is another program holding the port\? try --baud 921600",
                         err), err
        code, _, err = await lantern("diag", "node", "--port", "/dev/nonexistent-tty")
        assert code == 2 and "cannot open /dev/nonexistent-tty" in err
    finally:
        silent.close()
    topo = await started(tmp_path, interval_ms=1000)
    try:
        wrong = tmp_path / "wrong.key"
        wrong.write_text("11" * 32)
        wrong.chmod(0o600)
        code, _, err = await lantern("diag", "node", "--port", topo.relays[0].gateway_port,
                                       "--key-file", str(wrong), "--id", "SL-0001")
        assert code == 3 and "does not verify under the key" in err, err
        code, _, err = await lantern("diag", "node", "--port", topo.relays[0].gateway_port,
                                       "--key-file", str(wrong), "--id", "SL-0009")
        assert code == 2 and "is SL-0001, not SL-0009" in err, err
        # without a key the tool still says who is there, and that it cannot ask more
        code, _, err = await lantern("diag", "node", "--port", topo.relays[0].gateway_port)
        assert code == 2 and "no key for node SL-0001" in err, err
    finally:
        await topo.stop()


async def test_live_json_lines(tmp_path: Path) -> None:
    topo = await started(tmp_path, interval_ms=300)
    try:
        code, out, err = await lantern(
            "diag", "node", "live", "--port", topo.relays[0].gateway_port, "--keys",
            str(topo.workdir / "keys.toml"), "--every", "1", "--seconds", "2.5", "--json")
        lines = [json.loads(x) for x in out.splitlines()]
        assert len(lines) >= 2, err
        assert code == (0 if lines[-1]["healthy"] else 1)
        assert lines[-1]["status"]["uptime_s"] >= lines[0]["status"]["uptime_s"]
        seen = [r for line in lines for r in line["seen_on_line"]]
        assert seen and all(r["verified"] and r["node"] == "SL-0001" for r in seen)
        assert topo.wires["SL-0001"].ack_frames == 0
    finally:
        await topo.stop()


URL_LINE = re.compile(r"status page and API at (http://127\.0\.0\.1:\d+/)")


async def diag_gateway(url: str, *extra: str) -> tuple[int, Any, str]:
    code, out, err = await lantern("diag", "gateway", "--url", url, "--json", *extra)
    return code, json.loads(out), err


async def test_diag_gateway_healthy_degraded_unreachable(tmp_path: Path) -> None:
    topo = Topology(tmp_path, n_nodes=2, interval_ms=300, gateway_extra="\n[api]\nport = 0\n")
    await topo.start()
    try:
        await topo.wait_for(lambda: URL_LINE.search(topo.gateway_log()) is not None, 60,
                            "the gateway's API URL in its log")
        m = URL_LINE.search(topo.gateway_log())
        assert m
        url = m.group(1)
        ids = {n.node_id for n in topo.nodes}
        await topo.wait_for(lambda: {r["id"].split(":")[0] for r in
                                     topo.upstream.readings.values()} == ids, 60,
                            "readings from every node upstream")
        # "stale" is relative to a node's sampling interval, which the gateway learns from the
        # sample times it has seen (a whole-second clock: a few seconds of samples)
        deadline = time.monotonic() + 60
        while True:
            code, rep, err = await diag_gateway(url)
            if all(n["interval_s"] for n in rep["nodes"]) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert [n["interval_s"] for n in rep["nodes"]] == [1.0, 1.0], rep["nodes"]
        assert (code, rep["state"]) == (0, "healthy"), (rep, err)
        assert {n["id"] for n in rep["nodes"]} == ids
        for n in rep["nodes"]:
            assert n["configured"] and n["age_s"] < 30
            # sensors still warming up (the SPS30's first seconds) are normal, nothing else
            assert [f for f in n["flags"] if not f.endswith(": warmup")] == [], n["flags"]
            assert n["link"].startswith("serial:")
        assert rep["stale"] == [] and rep["never_seen"] == []
        assert rep["upstream"] == {"http": {"state": "ok"}}
        assert all(link["up"] for link in rep["links"]) and len(rep["links"]) == 2
        assert rep["counters"]["readings_stored"] > 0
        assert rep["problems"] == []

        code, out, _ = await lantern("diag", "gateway", "--url", url)  # the readable view
        assert code == 0 and "gateway HEALTHY" in out and "SL-0002" in out

        topo.nodes[1].kill()  # a node goes dark: the gateway must call it stale
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            code, rep, _ = await diag_gateway(url)
            if code == 1:
                break
            await asyncio.sleep(0.5)
        assert (code, rep["state"], rep["stale"]) == (1, "degraded", ["SL-0002"]), (
            rep["nodes"], topo.nodes[1].proc)
        assert any(p.startswith("node SL-0002: stale") for p in rep["problems"])
        seen = {n["id"]: n for n in rep["nodes"]}
        assert seen["SL-0002"]["missing_since"] is not None

        topo.kill_gateway()
        code, rep, _ = await diag_gateway(url, "--timeout", "3")
        assert (code, rep["state"]) == (2, "unreachable")
        assert "no gateway API at" in rep["problems"][0]
    finally:
        await topo.stop()


@pytest.mark.qemu
async def test_diag_a_qemu_board(tmp_path: Path) -> None:
    from .harness.qemu import QemuTopology, require_qemu

    require_qemu()
    topo = QemuTopology(tmp_path, n_nodes=1, interval_ms=500)
    await topo.start(gateway=False)
    try:
        # no gateway: the board's clock is never set, so it seals one time request and holds
        # its samples unsealed (docs/time.md)
        await topo.wait_for(lambda: "sample held" in topo.output(topo.nodes[0]), 60,
                            "a sample held")
        code, rep = await diag_json(topo, "status")
        st = rep["status"]
        assert rep["identity"]["board"] == "qemu-mps2-an385" and rep["identity"]["verified"]
        assert st["fw_file"] == "node/report.py"  # frozen into the image (STATUS is built there)
        assert st["outbox"] >= 1 and st["link"]["acked"] == 0
        assert st["heap"]["free"] > 20000
        code, rep = await diag_json(topo, "self-test")
        assert rep["self_test"] and all(t["ok"] for t in rep["self_test"]), rep
        code, res = await diag_json(topo, "set-interval", "1")
        assert (code, res["result"]) == (0, {"interval_ms": 1000})
        assert topo.wires["SL-0001"].ack_frames == 0
    finally:
        await topo.stop()
