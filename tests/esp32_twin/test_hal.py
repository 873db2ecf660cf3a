"""hal/esp32.py's parts one at a time on the twin: LED, NVS, the RTC's clock, RTC memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from .twin import DEEPSLEEP_RESET, LED_PIN, WDT_RESET, TwinNode

HAL = "import json\nfrom node.hal import esp32 as hal\nhal._board = json.load(open('board.json'))\n"


@pytest.fixture
def board(tmp_path: Path, micropython: Path) -> TwinNode:
    return TwinNode("SL-0001", tmp_path)


def test_identify_blinks_the_led_the_board_names(board: TwinNode) -> None:
    out = board.exec(HAL + "import asyncio\nasync def main():\n"
                     "    print('led', hal.identify(1))\n    await asyncio.sleep_ms(1200)\n"
                     "asyncio.run(main())\nhal._board.pop('led')\n"
                     "print('none', hal.identify(1))\n")
    assert "led True" in out and "none False" in out, out
    changes = board.led_changes()
    assert {p for p, _ in changes} == {LED_PIN}
    levels = [v for _, v in changes]
    assert levels[:4] == [1, 0, 1, 0] and levels[-1] == 0 and len(levels) >= 4, levels


def test_nvs_settings_outlive_a_reflashed_filesystem(board: TwinNode) -> None:
    board.exec(HAL + "hal.nvs_set('interval_ms', 600000)\n")
    assert board.nvs_i32("interval_ms") == 600000
    out = board.exec(HAL + "print(hal.nvs_get('interval_ms'), hal.nvs_get('nothing', -1))\n"
                     "import esp32\nn = esp32.NVS('lantern')\nn.set_i32('pending', 1)\n")
    assert "600000 -1" in out, out
    assert board.nvs_i32("pending") is None  # set without commit(): not in flash
    # the node adopts it over the file a filesystem reflash would have taken
    out = board.exec(HAL + "from node import app, start\ncfg = start.load_config('node.json')\n"
                     "n = app.Node(cfg, hal, hal._board)\n"
                     "n.attach_diagnostics(type('L', (), {})())\n"
                     "print('interval', n.interval_ms)\n")
    assert "interval 600000" in out, out


def test_the_rtc_keeps_the_gateways_time_through_sleep_not_a_power_cut(board: TwinNode) -> None:
    gw_ms = 1_796_000_000_123
    clock = "from node.clock import Clock\nc = Clock(hal)\nprint('clock', c.synced, c.now_ms())\n"
    out = board.exec(HAL + clock + f"c.set_ms({gw_ms})\nprint('set', c.synced, c.now_ms())\n")
    assert "clock False 9466848" in out, out  # a fresh board: 2000-01-01, the port's epoch
    assert "set True 1796000000" in out, out
    for reset in (DEEPSLEEP_RESET, WDT_RESET):
        out = board.exec(HAL + clock, reset=reset)
        synced, now = out.split("clock ")[1].split()[:2]
        assert synced == "True" and gw_ms <= int(now) < gw_ms + 60_000, out
    board.power_on()
    out = board.exec(HAL + clock)
    synced, now = out.split("clock ")[1].split()[:2]
    assert synced == "False" and 946_684_800_000 <= int(now) < 946_684_800_000 + 60_000, out
    assert board.rtc_counters() is None  # RTC memory gone with the power
