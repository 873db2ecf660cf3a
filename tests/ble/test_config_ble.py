"""[[links.ble]] in the gateway config: defaults, devices, and errors that name line and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lantern.agent.config import load_config, write_secret
from lantern.agent.errors import ConfigError

BASE = """\
[gateway]
state_dir = "state"
keys_file = "keys.toml"

[sinks.http]
url = "https://platform.example/senml"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(BASE + text)
    return p


def test_ble_only_gateway_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "\n[[links.ble]]\n"))
    assert cfg.serial == [] and len(cfg.ble) == 1
    b = cfg.ble[0]
    assert (b.adapter, b.max_connections, b.scanning_mode) == ("hci0", 3, "passive")
    assert b.require_encrypted_adverts and b.devices == ()


def test_devices_with_bindkey_file(tmp_path: Path) -> None:
    write_secret(tmp_path / "park.key", "231d39c1d7cc1ab1aee224cd096db932\n")
    cfg = load_config(write(tmp_path, """
[[links.ble]]
adapter = "hci1"
max_connections = 5
backoff_max_s = 30

[[links.ble.devices]]
address = "a4:c1:38:00:11:22"
name = "park-1"
bindkey_file = "park.key"

[[links.ble.devices]]
address = "A4:C1:38:00:11:23"
name = "kiosk"
"""))
    (b,) = cfg.ble
    assert (b.adapter, b.max_connections, b.backoff_max_s) == ("hci1", 5, 30.0)
    park, kiosk = b.devices
    assert park.address == "A4:C1:38:00:11:22" and park.name == "park-1"
    assert park.bindkey == bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
    assert kiosk.bindkey is None


@pytest.mark.parametrize("text, where", [
    ("\n[[links.ble]]\nmax_connections = 0\n", r"line 9: links\.ble\[0\]\.max_connections: must"),
    ("\n[[links.ble]]\nscanning_mode = \"loud\"\n", r"line 9: links\.ble\[0\]\.scanning_mode"),
    ("\n[[links.ble]]\nconnect_timeout_s = -1\n", r"line 9: links\.ble\[0\]\.connect_timeout_s"),
    ("\n[[links.ble]]\nmax_conections = 2\n", r"links\.ble\[0\]\.max_conections: unknown key"),
    ("\n[[links.ble]]\n\n[[links.ble.devices]]\naddress = \"A4:C1:38\"\nname = \"x\"\n",
     r"line 11: links\.ble\.devices\[0\]\.address: expected an address"),
    ("\n[[links.ble]]\n\n[[links.ble.devices]]\naddress = \"A4:C1:38:00:11:22\"\n",
     r"links\.ble\.devices\[0\]\.name: missing"),
])
def test_bad_ble_config_names_line_and_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        load_config(write(tmp_path, text))


def test_bindkey_file_must_be_private_and_well_formed(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("231d39c1d7cc1ab1aee224cd096db932")
    os.chmod(key, 0o644)
    text = ("\n[[links.ble]]\n\n[[links.ble.devices]]\naddress = \"A4:C1:38:00:11:22\"\n"
            "name = \"p\"\nbindkey_file = \"k\"\n")
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(write(tmp_path, text))
    write_secret(key, "not hex")
    with pytest.raises(ConfigError, match="expected 32 hex digits"):
        load_config(write(tmp_path, text))
