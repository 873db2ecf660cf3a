"""The street's generated configs are TOML that means what was written, for any folder name.

`lantern sim`'s links.toml and the gateway config of `lantern demo` and the tests name paths
under --dir; a quote, backslash, newline or control character in it made invalid TOML, or
TOML that says something else (review 3, left open by the packaging fix).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lantern.agent.configfile import toml_string as toml_str
from lantern.tools.street.sim import gateway_toml

ODD = ['a"b', "back\\slash", "new\nline", "tab\tand\x01ctl", "del\x7f", "é ü 日本", "plain"]


@pytest.mark.parametrize("text", ODD)
def test_a_string_reads_back_as_written(text: str) -> None:
    assert tomllib.loads(f"x = {toml_str(text)}")["x"] == text


@pytest.mark.parametrize("name", ODD)
def test_the_gateway_config_names_the_folder_as_it_is(name: str) -> None:
    d = Path("/tmp") / name
    cfg = tomllib.loads(gateway_toml(d / "state", d / "keys.toml", ["/dev/pts/7"],
                                     "http://127.0.0.1:9/"))
    assert cfg["gateway"] == {"state_dir": str(d / "state"), "keys_file": str(d / "keys.toml")}
    assert cfg["links"]["serial"] == [{"port": "/dev/pts/7", "baud": 115200}]
