"""Corrections on the MicroPython VM (docs/corrections.md): a humidity sweep on the simulated
street and a node at 800 m, run by the real sampler, drivers and chip models.

The same script runs on the unix port and on CPython; the packs must agree, and on the port's
own output: every PM reading kept raw, its corrected value equal to the method's formula
computed here from the values the node sent, and close to the street's dry mass; CO2 at 800 m
right once the chip has the node's pressure, 9 % low without it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from node.senml import quantize

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_EXTMOD = ROOT / ".build/micropython/extmod"
HELPERS = ROOT / "tests/helpers"  # vm_clock.py: a virtual clock both VMs can import
MP = [str(MICROPYTHON), "-X", "heapsize=2M"]
MP_ENV = {"MICROPYPATH": f"{FIRMWARE}:{HELPERS}:{MP_EXTMOD}"}

pytestmark = pytest.mark.micropython

# runs unchanged on both interpreters; argv: board file, run file (JSON)
SCRIPT = r"""
import json, sys

from vm_clock import Clock, install

clock = install(Clock(1764288000000 + 10 * 3600000))  # 10:00 UTC
from node import board as boards
from node.sampler import Sampler
from sim import street

with open(sys.argv[1]) as f:
    b = json.load(f)
with open(sys.argv[2]) as f:  # a file: an argv string over 255 bytes crashes the unix port
    run = json.load(f)
boards.validate(b)
buses, scale, sc = street.build(b, {"seed": 7}, "SL-0005", wall_ms=clock.ms)
sc.node_alt = run["alt_m"]  # the post's altitude: the street's pressure follows it
sc.aerosol_kappa = run["kappa"]  # the street's aerosol takes up water
rh = [50.0]
if run["sweep"]:
    sc.humidity = lambda t: rh[0]
s = Sampler(b, buses, scale, log=lambda m: None, cfg=run["cfg"])
for h in run["sweep"] or [None] * run["n"]:
    if h is not None:
        rh[0] = h
    clock.ms += 60000
    v = s.sample_blocking()
    t = sc.t(clock.ms)
    print(json.dumps({"v": v, "pm2_5": sc.pm2_5(t), "co2": sc.co2(t),
                      "pressure": sc.pressure(t)}))
"""

KAPPA = 0.4  # the node's default and the simulated street's aerosol
SWEEP = [30, 30, 30, 40, 50, 60, 70, 75, 80, 85, 88, 90, 92, 94, 95, 96, 97, 97.5, 98.5, 99]


def run(cmd: list[str], env: dict[str, str], tmp: Path, board: str, spec: dict[str, Any],
        name: str) -> list[dict[str, Any]]:
    script = tmp / "corrections.py"
    script.write_text(SCRIPT)
    runfile = tmp / f"{name}.json"
    runfile.write_text(json.dumps(spec))
    r = subprocess.run([*cmd, str(script), str(ROOT / "boards" / f"{board}.json"), str(runfile)],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    return [json.loads(line) for line in r.stdout.splitlines()]


def both(tmp: Path, board: str, spec: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The unix port's intervals, after checking that CPython sampled the same packs."""
    assert MICROPYTHON.exists(), "run `make micropython`"
    mp = run(MP, MP_ENV, tmp, board, spec, name)
    cp = run([sys.executable], {"PYTHONPATH": f"{FIRMWARE}:{HELPERS}"}, tmp, board, spec, name)
    assert len(mp) == len(cp)
    for i, (m, c) in enumerate(zip(mp, cp, strict=True)):
        assert sorted(m["v"]) == sorted(c["v"]), f"interval {i}"
        for k, x in m["v"].items():
            assert math.isclose(x, c["v"][k], rel_tol=1e-6, abs_tol=0.011), (i, k, x, c["v"][k])
    return mp


def formula(raw: float, rh: float) -> int:
    """Crilley et al. 2018 (docs/corrections.md), written here from the paper's form, not
    imported from the node: PM / (1 + (kappa / 1.65) / (1 / aw - 1))."""
    aw = rh / 100
    return quantize(raw / (1 + (KAPPA / 1.65) / (1 / aw - 1)), 0)  # type: ignore[no-any-return]


@pytest.mark.parametrize("board", ["unix-sim", "unix-sim-pms"])
def test_humidity_sweep_corrected_by_the_formula_raw_kept(board: str, tmp_path: Path) -> None:
    out = both(tmp_path, board, {"alt_m": 30, "kappa": KAPPA, "sweep": SWEEP, "n": 0,
                                 "cfg": {}}, "sweep")
    names = ("pm1", "pm2_5", "pm4", "pm10") if board == "unix-sim" else ("pm1", "pm2_5", "pm10")
    corrected = 0
    for i, (h, step) in enumerate(zip(SWEEP, out, strict=True)):
        v = step["v"]
        rh = v["humidity"]
        assert abs(rh - h) < 1, (i, rh, h)  # the BME280 saw the street's humidity
        for name in names:
            assert name in v, (i, name)  # the raw reading always goes out
            if rh >= 98:
                # too humid to correct: the raw value alone, flagged on the corrected name
                assert name + "_corr" not in v and v[name + "_corr.q"] & 2, (i, name)
                continue
            assert v[name + "_corr"] == formula(v[name], rh), (i, name, v[name], rh)
            corrected += 1
        if rh < 98 and v["pm2_5"] > 3:
            # the correction takes the humidity's growth out again: the street's dry PM2.5
            dry = step["pm2_5"]
            assert abs(v["pm2_5_corr"] - dry) <= 1.5 + 0.15 * dry, (i, rh, v, dry)
        assert "pm_kappa" not in v  # the default kappa is documented, not sent
    assert corrected >= len(names) * (len(SWEEP) - 2)
    # the sweep did what it is for: humid air inflates the raw reading several times
    wet, dry = out[-3]["v"], out[0]["v"]
    assert wet["pm2_5"] > 4 * dry["pm2_5"] and abs(wet["pm2_5_corr"] - dry["pm2_5_corr"]) <= 2


def co2_errors(out: list[dict[str, Any]]) -> list[float]:
    return [s["v"]["co2"] / s["co2"] - 1 for s in out if "co2" in s["v"]]


def test_co2_at_800_m_corrected_by_the_nodes_pressure(tmp_path: Path) -> None:
    spec = {"alt_m": 800, "kappa": 0, "sweep": [], "n": 25, "cfg": {}}
    on = both(tmp_path, "unix-sim", spec, "co2_on")
    off = run(MP, MP_ENV, tmp_path, "unix-sim",
              {**spec, "cfg": {"corrections": {"co2_pressure": False}}}, "co2_off")
    assert all(88000 < s["v"]["pressure"] < 94000 for s in on)  # the post is at 800 m
    p_ratio = sum(s["pressure"] for s in on) / len(on) / 101325
    # the first interval has no pressure yet: the chip assumes sea level
    first, rest = co2_errors(on)[0], co2_errors(on)[1:]
    assert abs(first - (p_ratio - 1)) < 0.03
    assert len(rest) >= 20 and abs(sum(rest) / len(rest)) < 0.01, rest
    uncompensated = co2_errors(off)
    assert abs(sum(uncompensated) / len(uncompensated) - (p_ratio - 1)) < 0.01, uncompensated
    assert sum(uncompensated) / len(uncompensated) < -0.07  # 9 % low without the pressure
