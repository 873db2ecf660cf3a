"""The drivers, the sampler and the simulated street on the MicroPython VM itself.

The same scripted run (a virtual clock, a board, faults) happens on MicroPython and on CPython;
both must produce the same readings and flags interval by interval. CPython is where the other
driver tests look closely; this shows the VM the firmware really runs on agrees with them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_EXTMOD = ROOT / ".build/micropython/extmod"

pytestmark = pytest.mark.micropython

# runs unchanged on both interpreters
SCRIPT = r"""
import json, sys

PERIOD = 1 << 30


class Clock:
    def __init__(self):
        self.ms = 1764288000000

    def ticks_ms(self):
        return self.ms % PERIOD

    def ticks_add(self, t, d):
        return (t + d) % PERIOD

    def ticks_diff(self, a, b):
        return ((a - b + PERIOD // 2) % PERIOD) - PERIOD // 2

    def sleep_ms(self, ms):
        self.ms += ms

    def time_ns(self):
        return self.ms * 1000000


clock = Clock()
import node.sampler, node.drivers.scd4x, node.drivers.sps30, node.drivers.bh1750
import node.drivers.pms5003, sim.scenario, sim.bus
for m in (node.sampler, node.drivers.scd4x, node.drivers.sps30, node.drivers.bh1750,
          node.drivers.pms5003, sim.scenario, sim.bus):
    m.time = clock
from node import board as boards
from node.sampler import Sampler
from sim import street

name = sys.argv[1]
with open(sys.argv[2]) as f:  # a file: an argv string over 255 bytes crashes the unix port
    faults = json.load(f)
with open(name) as f:
    b = json.load(f)
boards.validate(b)
buses, scale, _ = street.build(b, {"seed": 7, "speed": 12, "faults": faults}, "SL-0003",
                               wall_ms=clock.ms)
s = Sampler(b, buses, scale, log=lambda m: None)
for i in range(int(sys.argv[3])):
    clock.ms += 30000
    print(json.dumps(s.sample_blocking()))
"""

FAULTS = [{"chip": "sps30", "kind": "unplug", "from_h": 3, "to_h": 5},
          {"chip": "scd4x", "kind": "crc", "from_h": 1, "to_h": 9, "rate": 0.3},
          {"chip": "bme280", "kind": "stuck", "from_h": 6, "to_h": 8},
          {"chip": "bus", "kind": "slow", "from_h": 8, "to_h": 9, "rate": 0.2}]


def run(cmd: list[str], env: dict[str, str], script: Path, board: str, n: int) -> list[Any]:
    faults = script.with_name("faults.json")
    faults.write_text(json.dumps(FAULTS if board == "unix-sim" else []))
    r = subprocess.run([*cmd, str(script), str(ROOT / "boards" / f"{board}.json"), str(faults),
                        str(n)], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    return [json.loads(line) for line in r.stdout.splitlines()]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def rounding_apart(a: Any, b: Any) -> bool:
    """One step apart in the last decimal a driver rounded to: a value on a .5 boundary."""
    if not (isinstance(a, float) and isinstance(b, float)):
        return False
    places = max(len(repr(x).partition(".")[2]) for x in (a, b))
    return abs(a - b) <= 10.0 ** -places * 1.000001


@pytest.mark.parametrize("board", ["unix-sim", "unix-sim-pms"])
def test_micropython_and_cpython_sample_alike(board: str, tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), "run `make micropython`"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    n = 120  # 30 s intervals at 12x: six simulated minutes each, twelve hours in all
    mp = run([str(MICROPYTHON), "-X", "heapsize=2M"],
             {"MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}"}, script, board, n)
    cp = run([sys.executable], {"PYTHONPATH": str(FIRMWARE)}, script, board, n)
    assert len(mp) == len(cp) == n
    boundary = 0
    for i, (m, c) in enumerate(zip(mp, cp, strict=True)):
        assert sorted(m) == sorted(c), f"interval {i}: {sorted(set(m) ^ set(c))}"
        diff = {k: (m[k], c[k]) for k in m if not same(m[k], c[k])}
        boundary += len(diff)
        assert all(rounding_apart(*d) for d in diff.values()), f"interval {i}: {diff}"
    # round() may break a tie differently on the two VMs; anything more would be a real gap
    assert boundary <= n * 15 // 200
    flags: dict[str, int] = {}
    for m in mp:
        for k, v in m.items():
            if k.endswith(".q"):
                flags[k] = flags.get(k, 0) | v
    if board == "unix-sim":  # each injected fault shows up where it was injected
        assert flags["pm2_5.q"] & 256  # absent (unplugged)
        assert flags["co2.q"] & 16  # crc
        assert flags["temperature.q"] & 8  # stuck
        assert any(v & 64 for v in flags.values())  # timeout on the slow bus
