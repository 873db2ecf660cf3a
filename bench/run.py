"""`make bench`: every benchmark in one run; prints one JSON object and writes it to a file.

  python -m bench.run [--out bench/results.json] [--smoke] [--only NAME ...]
                      [--pack-from RESULTS.json]

--smoke runs every code path with tiny sizes in seconds (tests/test_bench_smoke.py); its
figures mean nothing. docs/performance.md explains each figure and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import (
    cpu_budget,
    disk_wear,
    e2e,
    frames,
    idle,
    ingest,
    link,
    node_cycle,
    node_energy,
    ota,
    throughput,
    x25519,
)
from .peers import NODE_RED_HOME

ROOT = Path(__file__).resolve().parents[1]
WORKDIR = ROOT / ".build/bench"

FULL: dict[str, dict[str, Any]] = {
    "gateway_ingest": {"n_frames": 100_000},
    "vs_node_red": {"duration_s": 5.0, "start": 500, "cap": 64_000, "steps": 4},
    "link_utilisation": {"seconds": 8.0},
    "node_cycle": {"cycles": 500},
    "e2e_latency_ms": {"nodes": 6, "interval_ms": 500, "seconds": 30.0},
    "node_energy": {"hours": 24.0},
    "ota_verify": {"qemu_runs": 3, "unix_runs": 21},
    "ota_transfer": {"bauds": (115200, 921600), "window": 4},
    "ota_transfer_ble": {"mtus": (247, 23), "window": 4},
    "idle": {"seconds": 60.0},
    "disk_wear": {},  # disk_wear.STREETS
    "cpu_budget": {"streets": (20, 200), "minutes": 20.0, "frames_per_s": 40.0},
    "x25519": {"qemu_runs": 5, "unix_runs": 21},
}
SMOKE: dict[str, dict[str, Any]] = {
    "gateway_ingest": {"n_frames": 400, "n_nodes": 8},
    "vs_node_red": {"duration_s": 0.5, "start": 40, "cap": 40, "steps": 0},
    "link_utilisation": {"seconds": 0.3},
    "node_cycle": {"cycles": 10},
    "e2e_latency_ms": {"nodes": 2, "interval_ms": 250, "seconds": 2.0},
    "node_energy": {"hours": 1.0},
    "ota_verify": {"qemu_runs": 1, "unix_runs": 1},
    "ota_transfer": {"bauds": (921600,), "window": 4},
    "ota_transfer_ble": {"mtus": (247,), "window": 4},
    "idle": {"seconds": 2.0, "settle_s": 0.5},
    "disk_wear": {"streets": ((4, 60.0, 2.0, 8.0),), "levers": ("now_without_commit_window",)},
    "cpu_budget": {"streets": (4,), "minutes": 2.0, "frames_per_s": 40.0},
    "x25519": {"qemu_runs": 1, "unix_runs": 1},
}


def _loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unavailable"


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    nr_pkg = NODE_RED_HOME / "node_modules/node-red/package.json"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "micropython": _version([str(ROOT / ".build/micropython/unix/micropython"), "-c",
                                 "import sys; print(sys.implementation.version)"]),
        "node": _version(["node", "--version"]),
        "node_red": json.loads(nr_pkg.read_text())["version"] if nr_pkg.exists() else "missing",
    }


def sections(sizes: dict[str, dict[str, Any]], w: Path) -> dict[str, Callable[[], Any]]:
    # node_cycle first: the pack the firmware really seals becomes the gateway benches' traffic
    return {
        "node_cycle": lambda: _node_cycle(w, **sizes["node_cycle"]),
        "gateway_ingest": lambda: ingest.run(w, **sizes["gateway_ingest"]),
        "vs_node_red": lambda: asyncio.run(throughput.run(w, **sizes["vs_node_red"])),
        "link_utilisation": lambda: asyncio.run(link.run(
            w, frame_bytes=_measured.get("wire_bytes", 205), **sizes["link_utilisation"])),
        "e2e_latency_ms": lambda: asyncio.run(e2e.run(w, **sizes["e2e_latency_ms"])),
        "node_energy": lambda: node_energy.run(**sizes["node_energy"]),
        "ota_verify": lambda: ota.run(w / "ota", **sizes["ota_verify"]),
        "ota_transfer": lambda: ota.ota_transfer(w / "ota_transfer", **sizes["ota_transfer"]),
        # no target: a virtual radio has no line rate (its figures: bench/ota_ble.py)
        "ota_transfer_ble": lambda: ota.ota_transfer_ble(w / "ota_transfer_ble",
                                                         **sizes["ota_transfer_ble"]),
        "idle": lambda: idle.run(w, **sizes["idle"]),
        # after node_cycle: it sends the firmware's pack
        "disk_wear": lambda: asyncio.run(disk_wear.run(w, **sizes["disk_wear"])),
        "cpu_budget": lambda: asyncio.run(cpu_budget.run(w, **sizes["cpu_budget"])),
        # a key rotation's work on the node (issue 17): unix port and the QEMU board
        "x25519": lambda: x25519.run(w / "x25519", **sizes["x25519"]),
    }


_measured: dict[str, Any] = {}


def _node_cycle(w: Path, cycles: int) -> dict[str, Any]:
    res = node_cycle.run(w, cycles)
    if "pack_from" not in _measured:
        frames.use_template(bytes.fromhex(res["pack_cbor_hex"]))
    _measured["wire_bytes"] = res["wire_bytes"]
    return res


def _target(measured: Any, ok: bool, target: str) -> dict[str, Any]:
    return {"target": target, "measured": measured, "met": ok}


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against what was measured (a section that failed is skipped)."""
    out: dict[str, Any] = {}
    gi = r.get("gateway_ingest", {})
    if "frames_per_s" in gi:
        out["ingest_frames_per_s"] = _target(gi["frames_per_s"], gi["frames_per_s"] >= 20000,
                                             ">= 20000 with durability on")
    vs = r.get("vs_node_red", {})
    if "throughput_ratio" in vs:
        tr, rr = vs["throughput_ratio"], vs.get("rss_ratio")
        out["vs_node_red_throughput"] = _target(tr, tr is not None and tr >= 5, ">= 5x")
        out["vs_node_red_rss"] = _target(rr, rr is not None and rr <= 1 / 3, "<= 1/3")
    lu = r.get("link_utilisation", {})
    for baud, res in lu.items():
        if isinstance(res, dict) and "utilisation" in res:
            out[f"link_{baud}"] = _target(
                res["utilisation"], res["utilisation"] >= 0.9 and res["readings_lost"] == 0,
                ">= 0.90 of line rate, nothing lost")
    nc = r.get("node_cycle", {})
    if "wire_vs_senml_json" in nc:
        out["wire_vs_senml_json"] = _target(nc["wire_vs_senml_json"],
                                            nc["wire_vs_senml_json"] <= 0.5, "<= 0.5")
    e = r.get("e2e_latency_ms", {})
    if "p99" in e:
        out["e2e_p99_ms"] = _target(e["p99"], e["p99"] <= 1500, "<= 1500 with a 1 s window")
    ne = r.get("node_energy", {})
    for board in node_energy.BOARDS_RUN:
        res = ne.get(board)
        if not isinstance(res, dict):
            continue
        days = res["typical"]["days_on_cell"]
        out[f"node_energy_{board}_days"] = _target(
            days, days >= 30, ">= 30 days on 3.5 Ah, no lamp power (typical schedule)")
        ratio = res["naive_vs_typical"]
        out[f"node_energy_{board}_naive_ratio"] = _target(
            ratio, ratio >= 10, "naive mAh/day >= 10x typical")
    idl = r.get("idle", {})
    if "rss_ratio" in idl:
        out["idle_rss_vs_node_red"] = _target(idl["rss_ratio"], idl["rss_ratio"] <= 1 / 3,
                                              "<= 1/3 of idle Node-RED's, 20 silent links each")
        w = idl["lantern"]["wakeups_per_s"]
        out["idle_wakeups_per_s"] = _target(w, w <= 2, "<= 2 per second, 20 silent links")
    dw = r.get("disk_wear", {})
    if "write_amplification" in dw:
        wa, delay = dw["write_amplification"], dw["ack_delay_max_s"]
        before = dw["before"][0]
        out["disk_write_amplification"] = _target(
            {"now": wa, "before": before["write_amplification"],
             "now_whole_run": dw["now"][0].get("write_amplification_whole_run"),
             "before_whole_run": before.get("write_amplification_whole_run"),
             "ack_delay_max_s": delay,
             "before_ack_delay_max_s": (before["ack_delay_s"] or {}).get("max"),
             "upstream_delay_p99_s": (dw["now"][0].get("upstream_delay_s") or {}).get("p99"),
             "queue": dw["now"][0].get("queue"),
             # one lever of `now` changed at a time: what it saves, what it costs
             "levers": {name: {"write_amplification": lv["write_amplification"],
                               "ack_delay_max_s": (lv["ack_delay_s"] or {}).get("max"),
                               "upstream_delay_p99_s":
                                   (lv.get("upstream_delay_s") or {}).get("p99")}
                        for name, lv in dw.get("levers", {}).items()}},
            wa <= 8 and delay is not None and delay <= 10,
            "<= 8 at 20 nodes x 1 frame/min after the first minute, ACK delay <= 10 s "
            "(before: same run)")
        out["sd_card_life_years"] = _target(
            dw["sd_life_years"], dw["sd_life_years"] >= 10,
            f">= 10 years, {dw['card']['name']}, {dw['card']['tbw_bytes'] / 1e12:g} TBW")
    for baud, res in r.get("ota_transfer", {}).items():
        if isinstance(res, dict) and "bundle_fraction_of_line_rate" in res:
            f = res["bundle_fraction_of_line_rate"]
            out[f"ota_transfer_{baud}"] = _target(
                f, f >= 0.8 and res["outcome"] == "updated", ">= 0.8 of line rate, node updated")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench/results.json"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code paths")
    p.add_argument("--only", nargs="*", help="run only these sections")
    p.add_argument("--workdir", default=str(WORKDIR),
                   help="state, logs and ptys' configs of this run (one run per directory)")
    p.add_argument("--pack-from", help="gateway traffic from the pack node_cycle recorded in "
                   "this results file (compare runs on the same pack); default: this run's")
    args = p.parse_args(argv)
    if args.pack_from:
        nc = json.loads(Path(args.pack_from).read_text())["node_cycle"]
        frames.use_template(bytes.fromhex(nc["pack_cbor_hex"]),
                            f"the firmware's pack recorded in {args.pack_from}")
        _measured["pack_from"] = args.pack_from
        _measured.setdefault("wire_bytes", nc["wire_bytes"])
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result: dict[str, Any] = {"kind": "smoke (figures meaningless)" if args.smoke else "full",
                              "machine": machine(), "load_at_start": _loadavg()}
    failed = False
    for name, fn in sections(SMOKE if args.smoke else FULL, workdir).items():
        if args.only and name not in args.only:
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        load = _loadavg()
        try:
            res = fn()
        except Exception as e:  # one broken section must not hide the others
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
            failed = True
        res["load_1m_before_after"] = [load[0], _loadavg()[0]]
        res["took_s"] = round(time.monotonic() - started, 1)
        result[name] = res
    result["targets"] = targets(result)
    result["took_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(result, indent=2)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
