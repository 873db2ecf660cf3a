"""`make bench` keeps working: every benchmark's code path with tiny sizes, results well-formed.

Figures from this run mean nothing (seconds-long, on a busy CI machine) and nothing here
depends on speed; the numbers come only from `make bench` (docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lantern.agent.units import UNITS
from lantern.tools.street.sim import MICROPYTHON

ROOT = Path(__file__).resolve().parents[1]
NODE_RED_JS = ROOT / ".build/node-red/node_modules/node-red/red.js"

pytestmark = pytest.mark.micropython


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v >= 0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # `make test` installs both first; a missing one is an error, never a skip
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    assert NODE_RED_JS.exists(), f"{NODE_RED_JS} missing: run `make node-red`"
    work = tmp_path_factory.mktemp("bench")
    out = work / "results.json"
    # its own workdir: a `make bench` running at the same time keeps its state
    r = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(out),
                        "--workdir", str(work)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-4000:]
    printed = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert json.loads(out.read_text()) == printed
    return dict(printed)


SECTIONS = ["gateway_ingest", "vs_node_red", "link_utilisation", "node_cycle", "e2e_latency_ms",
            "node_energy", "ota_verify", "ota_transfer", "ota_transfer_ble", "idle",
            "cpu_budget", "disk_wear", "x25519"]


def test_every_section_ran(results: dict[str, Any]) -> None:
    for name in SECTIONS:
        assert "error" not in results[name], results[name]
        assert _number(results[name]["took_s"])
    assert results["machine"]["cores"] >= 1
    assert len(results["load_at_start"]) == 3


def test_x25519_on_both_vms(results: dict[str, Any]) -> None:
    """A key rotation's node work (issue 17), timed on the unix port and the QEMU board."""
    for vm in ("unix", "qemu"):
        r = results["x25519"][vm]
        assert r["runs"] >= 1
        for k in ("x25519_ms", "public_ms", "rekey_ms", "hkdf_ms"):
            assert _number(r[k]) and r[k] > 0, (vm, k, r)
        assert r["rekey_ms"] >= r["x25519_ms"]  # a rekey does the agreement and more


def test_gateway_ingest(results: dict[str, Any]) -> None:
    gi = results["gateway_ingest"]
    for k in ("frames_per_s", "readings_per_s", "cpu_us_per_frame", "peak_rss_mb", "commits"):
        assert _number(gi[k]) and gi[k] > 0, k
    assert gi["all_acked"] is True
    assert gi["rejected"] == {}
    assert gi["readings_per_s"] == pytest.approx(gi["frames_per_s"] * gi["readings_per_frame"],
                                                 rel=0.01)


@pytest.mark.parametrize("peer", ["lantern", "node_red"])
def test_vs_node_red_peer(results: dict[str, Any], peer: str) -> None:
    p = results["vs_node_red"][peer]
    assert p["trials"], "at least one trial ran"
    for t in p["trials"]:
        assert set(t) >= {"rate", "frames", "readings_delivered", "readings_sent", "ok"}
        assert t["readings_delivered"] <= t["readings_sent"]
        if t["ok"]:
            assert t["readings_delivered"] == t["readings_sent"]
    assert _number(p["idle_rss_mb"]) and p["idle_rss_mb"] > 5
    best = [t["rate"] for t in p["trials"] if t["ok"]]
    assert p["sustained_frames_per_s"] == max(best, default=0)


def test_vs_node_red_ratios(results: dict[str, Any]) -> None:
    vs = results["vs_node_red"]
    lantern, nr = vs["lantern"]["sustained_frames_per_s"], vs["node_red"]["sustained_frames_per_s"]
    if nr:
        assert vs["throughput_ratio"] == pytest.approx(lantern / nr, abs=0.01)
    assert vs["idle_rss_ratio"] == pytest.approx(
        vs["lantern"]["idle_rss_mb"] / vs["node_red"]["idle_rss_mb"], abs=0.01)


@pytest.mark.parametrize("baud", ["115200", "921600"])
def test_link_utilisation(results: dict[str, Any], baud: str) -> None:
    lu = results["link_utilisation"][baud]
    assert lu["frames"] > 0 and lu["frames_acked"] == lu["frames"]
    assert lu["readings_per_frame"] > 0
    # the line model never carries more than its rate (a bug in the pacing would show here)
    assert 0 < lu["utilisation"] <= 1.05
    assert lu["readings_per_s"] <= lu["line_limit_readings_per_s"] * 1.05


def test_node_cycle(results: dict[str, Any]) -> None:
    nc = results["node_cycle"]
    for k in ("cycle_us", "sample_us", "seal_us", "mac_us", "frame_us", "heap_high_water",
              "wire_bytes", "senml_json_bytes"):
        assert _number(nc[k]) and nc[k] > 0, k
    assert nc["heap_in_use_idle"] < nc["heap_high_water"] <= nc["heap_total"]
    assert nc["wire_bytes_per_reading"] == pytest.approx(
        nc["wire_bytes"] / nc["records_per_pack"], abs=0.1)
    assert nc["cycle_us"] >= nc["cycle_without_sample_us"]
    # the SenML-JSON twin: the resolved pack with its base name and every unit
    twin = json.loads(nc["example_senml_json"])
    assert len(twin) == nc["records_per_pack"]
    assert twin[0]["bn"] == "urn:dev:lantern:SL-0042:" and "bt" in twin[0]
    assert twin[0]["u"] and all("u" in r for r in twin if r["n"] in UNITS)
    assert nc["wire_vs_senml_json"] == pytest.approx(nc["wire_bytes"] / nc["senml_json_bytes"],
                                                     abs=0.001)
    # the node sent neither: undoing each convention costs bytes
    assert nc["wire_bytes"] < nc["wire_bytes_with_bn"] < nc["wire_bytes_with_bn_and_units"]
    assert nc["wire_bytes"] < nc["wire_bytes_with_units"] < nc["wire_bytes_with_bn_and_units"]
    assert nc["back_to_back"]["wire_bytes"] > 0


def test_e2e_latency(results: dict[str, Any]) -> None:
    e = results["e2e_latency_ms"]
    assert e["frames"] > 0
    assert 0 < e["p50"] <= e["p99"] <= e["max"]


def test_targets_are_reported(results: dict[str, Any]) -> None:
    t = results["targets"]
    assert {"ingest_frames_per_s", "vs_node_red_throughput", "vs_node_red_rss",
            "link_115200", "link_921600", "wire_vs_senml_json", "e2e_p99_ms",
            "idle_rss_vs_node_red", "idle_wakeups_per_s"} <= set(t)
    for v in t.values():
        assert isinstance(v["met"], bool) and v["target"]


def test_node_energy(results: dict[str, Any]) -> None:
    ne = results["node_energy"]
    for board in ("esp32-c3-devkitm-1", "esp32-devkitc"):
        for schedule in ("typical", "naive"):
            r = ne[board][schedule]
            for k in ("mah_per_day", "mj_per_interval", "mj_per_reading", "days_on_cell"):
                assert _number(r[k]) and r[k] > 0, (board, schedule, k, r[k])
            assert r["intervals"] == 12  # one simulated hour at 5 min
            assert {"mcu", "radio"} <= set(r["mj_per_interval_by"])
        assert ne[board]["naive"]["mah_per_day"] > ne[board]["typical"]["mah_per_day"]
        assert results["targets"][f"node_energy_{board}_days"]["measured"] == \
            ne[board]["typical"]["days_on_cell"]



def test_ota_verify(results: dict[str, Any]) -> None:
    """The node's bundle check, as bench/ota.py runs it on the unix port and the QEMU board."""
    ov = results["ota_verify"]
    for where in ("unix", "qemu"):
        r = ov[where]
        assert r["files"] > 10 and r["envelope_bytes"] > 100, r
        for k in ("verify_ms", "manifest_ms", "heap_peak_bytes"):
            assert _number(r[k]) and r[k] > 0, (where, k, r[k])
        assert r["manifest_ms"] >= r["verify_ms"]  # the manifest check includes a verify


def test_disk_wear(results: dict[str, Any]) -> None:
    """Bytes the gateway process wrote, per sealed pack byte, before and after the levers of
    issue 22 (commit window, deliveries recorded together), on the same street and run."""
    dw = results["disk_wear"]
    for profile in ("before", "now"):
        for s in dw[profile]:
            assert s["frames_acked"] == s["frames"] > 0, s
            assert s["write_amplification_whole_run"] == pytest.approx(
                s["disk_bytes"] / s["sealed_pack_bytes"], rel=0.01)
            # after the first period: the whole run less what that period wrote
            assert 0 <= s["first_period_disk_bytes"] <= s["disk_bytes"], s
            assert s["write_amplification"] > 0 and s["bytes_per_frame"] == round(
                (s["disk_bytes"] - s["first_period_disk_bytes"])
                / (s["frames"] - s["nodes"])), s  # (each node's seq 0 is the first period)
            assert s["sealed_pack_bytes"] > 0 and s["sd_life_years"] > 0
            # the street's kernel writeback ran on its clock, and what it wrote back per
            # file is part of what the gateway wrote, never more
            expire = int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) / 100
            assert s["writeback_every_s"] == expire and s["writebacks"] > 0, s
            by_file = s["written_back_bytes_by_file"]
            if by_file is None:  # a kernel without cachestat(2) (before Linux 6.5)
                assert s["synced_by_gateway_bytes"] is None
            else:
                assert all(n > 0 for n in by_file.values()), by_file
                assert s["synced_by_gateway_bytes"] == (
                    s["disk_bytes"] - sum(by_file.values())) >= 0, s
    # the levers only take writes away, and the ACK still waits for the disk (<= 10 s)
    assert dw["now"][0]["disk_bytes"] < dw["before"][0]["disk_bytes"]
    assert 0 < dw["ack_delay_max_s"] <= 10
    t = results["targets"]
    assert t["disk_write_amplification"]["measured"]["now"] == dw["write_amplification"]
    assert t["sd_card_life_years"]["measured"] == dw["sd_life_years"]


def test_ota_transfer(results: dict[str, Any]) -> None:
    """A whole bundle to a MicroPython node over a paced pty: it ends on the new version,
    and its fractions of the line rate are what its bytes and times say."""
    r = results["ota_transfer"]["921600"]
    assert (r["outcome"], r["boots"]) == ("updated", 2), r
    assert r["chunks"] > 10 and r["file_bytes"] < r["bundle_bytes"]
    assert 0 < r["bundle_fraction_of_line_rate"] <= 1.0
    assert r["bundle_fraction_of_line_rate"] == pytest.approx(
        r["bundle_bytes"] * 10 / 921600 / r["offer_to_apply_s"], abs=0.01)
    t = results["targets"]["ota_transfer_921600"]
    assert t["measured"] == r["bundle_fraction_of_line_rate"]


def test_ota_transfer_ble(results: dict[str, Any]) -> None:
    """A whole bundle over the gateway's BLE link through the virtual radio: the node ends on
    the new version with packs taken meanwhile, the figures are what the bytes and times
    say, and the real-radio estimate follows its formula. No target: no line rate."""
    r = results["ota_transfer_ble"]
    assert "no airtime" in r["meaning"]
    m = r["mtu_247"]
    assert (m["outcome"], m["version"], m["boots"]) == ("updated", "2.0.0", 2), m
    assert m["att_mtu_seen"] == [247]
    assert m["chunks"] > 10 and 0 <= m["chunks_resent"] < m["chunks"]
    assert m["file_bytes"] < m["bundle_bytes"]
    assert 0 < m["chunk_phase_s"] <= m["offer_to_apply_s"]
    assert m["file_bytes_per_s"] == pytest.approx(m["file_bytes"] / m["chunk_phase_s"],
                                                  rel=0.01)
    assert m["packs_taken_during_transfer"] >= 1
    e = r["estimate_real_radio"]["mtu_247"]
    assert e["file_bytes"] == m["file_bytes"] and e["segment_message_bytes"] == 243
    # the segments carry every file byte and each CHUNK's seal (>= 20 bytes), and the seal
    # costs a chunk at most one segment more than its bytes alone
    n = -(-e["file_bytes"] // e["chunk_bytes"])
    assert e["file_bytes"] + 20 * n <= e["ctrl_segments"] * 243
    assert e["ctrl_segments"] <= n * (-(-e["chunk_bytes"] // 243) + 1)
    for ms in (7.5, 30):
        f = e[f"interval_{ms:g}ms"]
        assert f["file_bytes_per_s"] == pytest.approx(
            e["file_bytes"] / (e["ctrl_segments"] * ms / 1000), rel=0.01)
    assert e["interval_7.5ms"]["file_bytes_per_s"] > e["interval_30ms"]["file_bytes_per_s"]
    assert not [k for k in results["targets"] if "ble" in k]


@pytest.mark.parametrize("peer", ["lantern", "node_red"])
def test_idle_peer(results: dict[str, Any], peer: str) -> None:
    """Both peers measured idle with 20 silent links: RSS, wake-ups, time to ready."""
    p = results["idle"][peer]
    assert p["links"] == 20
    assert _number(p["rss_mb"]) and p["rss_mb"] > 5
    assert _number(p["ready_s"]) and p["ready_s"] > 0
    w = p["wakeups"]
    assert w["threads"] >= 1 and w["seconds"] > 0
    assert _number(w["context_switches_per_s"]) and _number(w["schedstat_runs_per_s"])
    assert p["wakeups_per_s"] == w["context_switches_per_s"]
    assert "READY=1" in results["idle"]["lantern"]["ready_signal"]


def test_idle_targets(results: dict[str, Any]) -> None:
    idl, t = results["idle"], results["targets"]
    assert idl["rss_ratio"] == pytest.approx(
        idl["lantern"]["rss_mb"] / idl["node_red"]["rss_mb"], abs=0.01)
    assert t["idle_rss_vs_node_red"]["measured"] == idl["rss_ratio"]
    assert t["idle_wakeups_per_s"]["measured"] == idl["lantern"]["wakeups_per_s"]


def test_cpu_budget(results: dict[str, Any]) -> None:
    """Every street's readings arrived upstream and its figures add up."""
    cb = results["cpu_budget"]
    assert cb["streets"]
    for s in cb["streets"]:
        assert s["readings"] == s["frames"] * (s["readings"] // s["frames"]) > 0
        assert s["frames"] == s["nodes"] * s["street_minutes"]
        assert s["cpu_us_per_frame"] > 0 and s["cpu_us_per_reading"] > 0
        assert s["cpu_us_per_reading"] == pytest.approx(
            s["cpu_us_per_frame"] * s["frames"] / s["readings"], rel=0.01)
        # from the unrounded CPU time: the rounded figure can move it by one node
        assert abs(s["nodes_per_core_at_10pct"]
                   - 0.1 * 60 / (s["cpu_us_per_frame"] / 1e6)) <= 1 + 1e-6
    worst = max(cb["streets"], key=lambda s: s["cpu_us_per_reading"])
    assert cb["nodes_per_core_at_10pct"] == worst["nodes_per_core_at_10pct"]
