"""The node's energy estimate: every state charged at the board's current model, the arithmetic
pinned down on a one-chip board, and the typical schedule against the naive one on the
simulated street (bench/node_energy.py gives the day-long figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from node import board as boards
from node.sampler import Sampler

from tests.helpers.clock import VirtualClock, street

BOARDS = Path(__file__).resolve().parents[2] / "boards"
FIVE_MIN = 300_000
MCU = {"active_ma": 40, "light_sleep_ma": 0.8, "deep_sleep_ua": 10, "boot_ms": 1000}


def one_bme280(power: dict[str, Any], check: bool = True) -> dict[str, Any]:
    b = {"name": "t", "hal": "unix", "i2c": {"i2c0": {}},
            "sensors": [{"chip": "bme280", "bus": "i2c0", "power": power}],
            "power": {"active_ma": 40, "sleep_ua": 10, "supply_v": 4.0, "mcu": MCU,
                      "radio": {"uart_ma": 2, "uart_pack_ms": 50}, "cell": {"mah": 3500}}}
    if check:
        boards.validate(b)  # normalises the address: the slot is bme280@0x76
    return b


def test_energy_arithmetic_on_one_chip(clock: VirtualClock) -> None:
    b = one_bme280({"measure_ma": 0.5, "sleep_ua": 1, "warmup_ms": 0, "measure_ms": 10})
    buses, scale, _ = street(b, clock)
    cfg = {"interval_ms": FIVE_MIN, "power_down": True, "deep_sleep": True}
    s = Sampler(b, buses, scale, log=lambda m: None, cfg=cfg, lightsleep=clock.sleep_ms)
    assert s.energy() is None
    t0 = clock.ms
    s.sample_blocking()
    cycle = clock.ms - t0
    # woken 10 ms ahead, then two more oversampled readings 10 ms apart
    assert cycle == 30
    e = s.energy()
    assert e is not None
    rest = FIVE_MIN - cycle - 1000
    mcu = 30 * 0.8 + 1000 * 40 + rest * 0.010  # waits in light sleep, boot, deep sleep
    chip = 30 * 0.5 + (rest + 1000) * 0.001  # measuring while awake, then asleep
    radio = 50 * 2
    assert e["by"]["mcu"] == pytest.approx(mcu * 4.0 / 1000)
    assert e["by"]["bme280@0x76"] == pytest.approx(chip * 4.0 / 1000)
    assert e["by"]["radio"] == pytest.approx(radio * 4.0 / 1000)
    total = (mcu + chip + radio) * 4.0 / 1000
    assert e["mj_interval"] == pytest.approx(total)
    assert e["mj_reading"] == pytest.approx(total / 3)  # temperature, humidity, pressure
    ma = (mcu + chip + radio) / FIVE_MIN
    assert e["mah_day"] == pytest.approx(ma * 24)
    assert e["days"] == pytest.approx(3500 / (ma * 24))
    s.awake(150)  # the node's own work after sampling: active instead of deep sleep
    assert s.energy()["by"]["mcu"] == pytest.approx((mcu + 150 * (40 - 0.010)) * 4.0 / 1000)


def test_a_chip_left_on_is_charged_all_interval(clock: VirtualClock) -> None:
    b = one_bme280({"measure_ma": 0.5, "sleep_ua": 1})
    buses, scale, _ = street(b, clock)
    s = Sampler(b, buses, scale, log=lambda m: None,
                cfg={"interval_ms": FIVE_MIN, "power_down": False})
    s.sample_blocking()
    e = s.energy()
    assert e is not None
    assert e["by"]["bme280@0x76"] == pytest.approx(FIVE_MIN * 0.5 * 4.0 / 1000)
    assert e["by"]["mcu"] == pytest.approx(FIVE_MIN * 40 * 4.0 / 1000)  # never asleep


def day(clock: VirtualClock, name: str, cfg: dict[str, Any], light: bool) -> dict[str, Any]:
    b = json.loads((BOARDS / f"{name}.json").read_text())
    boards.validate(b)
    buses, scale, _ = street(b, clock)
    s = Sampler(b, buses, scale, log=lambda m: None, cfg={"interval_ms": FIVE_MIN, **cfg},
                lightsleep=clock.sleep_ms if light else None)
    for _ in range(12):
        t0 = clock.ms
        s.sample_blocking()
        clock.ms = t0 + FIVE_MIN
    e = s.energy()
    assert e is not None
    return e


@pytest.mark.parametrize("name", ["unix-sim", "unix-sim-pms", "esp32-c3-devkitm-1"])
def test_typical_schedule_against_always_on(clock: VirtualClock, name: str) -> None:
    typical = day(clock, name, {"cadence_ms": {"sps30": 900_000, "pms5003": 900_000},
                                "power_down": True, "deep_sleep": True}, True)
    naive = day(clock, name, {"power_down": False}, False)
    assert naive["mah_day"] >= 10 * typical["mah_day"]
    assert typical["days"] >= 30
    # the particulate fan dominates the typical budget; the MCU the naive one's runner-up
    pm = max(typical["by"].items(), key=lambda kv: kv[1])[0]
    assert pm.split("@")[0] in ("sps30", "pms5003")


@pytest.mark.parametrize("bad", [
    ({"measure_ma": -1}, "sensors[0].power.measure_ma: expected a number >= 0"),
    ({"fan_ma": 3}, "sensors[0].power.fan_ma: unknown figure"),
])
def test_board_rejects_a_bad_current_model(bad: tuple[dict[str, Any], str]) -> None:
    b = one_bme280(bad[0], check=False)
    with pytest.raises(boards.BoardError, match=bad[1].replace("[", r"\[").replace("]", r"\]")):
        boards.validate(b)


def test_every_board_carries_a_full_current_model() -> None:
    from node.board import MCU_POWER, SENSOR_POWER

    for path in BOARDS.glob("*.json"):
        if path.name == "board.schema.json":
            continue
        b = json.loads(path.read_text())
        boards.validate(b, path.name)
        assert set(b["power"]["mcu"]) == set(MCU_POWER), path.name
        assert b["power"]["cell"]["mah"] > 0
        for spec in b["sensors"]:
            assert set(spec["power"]) == set(SENSOR_POWER), (path.name, spec["chip"])
