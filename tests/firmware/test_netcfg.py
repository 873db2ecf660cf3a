"""node/netcfg.py's checks: every setting the contract names, refused with its name when wrong
(the node's own rules; agent/fleetops.py checks the same before anything is sent)."""

import pytest
from node import netcfg

from lantern.agent import fleetops

pytestmark = pytest.mark.fleet

GOOD = [
    {"interval_ms": 1000}, {"interval_ms": 86400000}, {"kappa": 0}, {"kappa": 1.5},
    {"max_untimed": 0}, {"max_untimed": 4096}, {"window": 1}, {"window": 8},
    {"offsets": {"temperature": -0.4, "humidity": 2, "sound": 1.5}}, {},
]
BAD = [
    ({"interval_ms": 999}, "interval_ms"), ({"interval_ms": 1000.0}, "interval_ms"),
    ({"interval_ms": True}, "interval_ms"), ({"kappa": 1.51}, "kappa"),
    ({"kappa": float("nan")}, "kappa"), ({"kappa": "0.3"}, "kappa"),
    ({"max_untimed": -1}, "max_untimed"), ({"window": 0}, "window"), ({"window": 9}, "window"),
    ({"offsets": {"pressure": 1}}, "offsets.pressure"), ({"offsets": [1]}, "offsets"),
    ({"offsets": {"sound": float("inf")}}, "offsets.sound"),
    ({"offsets": {"temperature": 20.5}}, "offsets.temperature"),
    ({"ble_advert": True}, "ble_advert"), ({1: 2}, "1"),
]


@pytest.mark.parametrize("settings", GOOD)
def test_good_settings_pass_on_both_sides(settings: dict) -> None:
    assert netcfg.check(settings) is None
    fleetops.check_settings(settings)  # the gateway takes them too


@pytest.mark.parametrize(("settings", "name"), BAD)
def test_bad_settings_are_named(settings: dict, name: str) -> None:
    err = netcfg.check(settings)
    assert err is not None and err.startswith(name), err


def test_settings_land_where_the_boot_reads_them() -> None:
    cfg = {"id": "SL-1", "link": {"port": "/dev/x"}, "offsets": {"LAeq": 3}}
    netcfg._put(cfg, {"offsets": {"sound": 1, "humidity": -2}, "kappa": 0.3, "window": 2,
                      "max_untimed": 9, "interval_ms": 5000}, 7)
    assert cfg == {"id": "SL-1", "link": {"port": "/dev/x", "window": 2},
                   "offsets": {"LAeq": 1, "LAmax": 1, "humidity": -2},
                   "corrections": {"kappa": 0.3}, "max_untimed": 9, "interval_ms": 5000,
                   "config_version": 7}
