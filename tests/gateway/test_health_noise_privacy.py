"""No audio leaves the sound module: the firmware holds levels (LAeq, LAmax), never samples,
and no pack field carries anything else from it (docs/alerts.md "Noise privacy")."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from node.drivers import CHIPS, pcba_dbm
from node.sampler import Sampler

from lantern import FIRMWARE
from lantern.agent import units
from tests.helpers.clock import VirtualClock, clock_fixture, one_chip, street

pytestmark = pytest.mark.alerts
__all__ = ["clock_fixture"]

HISTORY = 100  # the module's DBHISTORY: one dB level per second, newest first


def buffers(obj: object) -> dict[str, Any]:
    """Every attribute that can hold a sequence of numbers."""
    return {k: v for k, v in vars(obj).items()
            if isinstance(v, bytes | bytearray | memoryview | list | tuple | dict)
            or type(v).__name__ == "array"}


def test_the_driver_keeps_one_level_per_second_and_nothing_else(clock: VirtualClock) -> None:
    buses, _, _ = street(one_chip("pcba_dbm"), clock)
    drv = pcba_dbm.PCBADBM(buses["i2c"])
    for _ in range(20):
        clock.advance(60_000)
        out = drv.read()
        assert out is not None and set(out) == {"LAeq", "LAmax"}
        assert all(isinstance(v, int | float) for v in out.values())
        held = buffers(drv)
        # the register history it reads the levels from (≤ 100 whole-dB values: 100 s of
        # levels, not audio: a second of sound at 8 kHz would be 8000 samples) and one byte
        assert set(held) == {"_hist", "_one"}
        assert len(held["_hist"]) == HISTORY and len(held["_one"]) == 1
        assert all(v == 0 or 30 <= v <= 130 for v in held["_hist"])  # dB levels
        assert set(vars(drv)) == {"i2c", "address", "tavg_ms", "_where", "_hist", "_one",
                                  "version", "power"}


def test_the_driver_source_reads_levels_only() -> None:
    """No audio interface anywhere in the firmware (I2S, PDM, a sampled ADC microphone)."""
    src = Path(FIRMWARE) / "node"
    for path in src.rglob("*.py"):
        text = path.read_text()
        for word in ("I2S", "PDM", "i2s", "pdm_"):
            assert word not in text, f"{path}: {word}"
    tree = ast.parse((src / "drivers" / "pcba_dbm.py").read_text())
    regs = {t.id: n.value.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id.startswith("_REG_")
            and isinstance(n.value, ast.Call)}
    # what it can read: version, control, averaging time, reset, level, max, level history
    assert regs == {"_REG_VERSION": 0x00, "_REG_CONTROL": 0x06, "_REG_TAVG_HIGH": 0x07,
                    "_REG_RESET": 0x09, "_REG_DECIBEL": 0x0A, "_REG_MAX": 0x0C,
                    "_REG_HISTORY": 0x14}


def test_no_pack_field_carries_anything_but_levels(clock: VirtualClock) -> None:
    board = one_chip("pcba_dbm")
    buses, scale, _ = street(board, clock)
    s = Sampler(board, buses, scale, log=lambda m: None)
    seen: set[str] = set()
    for _ in range(10):
        clock.advance(60_000)
        v = s.sample_blocking()
        seen |= set(v)
        assert all(isinstance(x, int | float) for x in v.values())
    assert {n for n in seen if not n.endswith(".q")} == {"LAeq", "LAmax"}
    assert CHIPS["pcba_dbm"][3] == ("LAeq", "LAmax")
    # and the protocol has no name a sample buffer could travel under
    assert {n for n in units.UNITS if "sound" in n.lower() or "audio" in n.lower()} == set()
