"""Config of the NGSI-LD and MQTT sinks and of node places: good values load, bad ones say why."""

from __future__ import annotations

from pathlib import Path

import pytest

from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError

BASE = """[gateway]
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB0"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(BASE + text)
    return p


def test_all_sinks_and_nodes_load(tmp_path: Path) -> None:
    pw = tmp_path / "mqtt.pw"
    pw.write_text("x\n")
    pw.chmod(0o600)
    cfg = load_config(write(tmp_path, """
[sinks.ngsi_ld]
url = "http://orion:1026"
tenant = "city"

[sinks.mqtt]
host = "mqtt.local"
port = 8883
tls = true
username = "gw"
password_file = "mqtt.pw"
payload = "senml+cbor"
topic = "city/{node}/{measurement}"

[nodes."SL-0042"]
pole = 42
location = [52.37, 4.89]
"""))
    assert cfg.http is None
    assert cfg.ngsi_ld and cfg.ngsi_ld.tenant == "city"
    assert cfg.mqtt and cfg.mqtt.port == 8883 and cfg.mqtt.password_file == pw
    assert cfg.nodes["SL-0042"].pole == "42" and cfg.nodes["SL-0042"].lon == 4.89


@pytest.mark.parametrize(("text", "line", "key", "says"), [
    ('[sinks.ngsi_ld]\nurl = "orion:1026"\n', 8, "sinks.ngsi_ld.url", "http(s) URL"),
    ('[sinks.mqtt]\nport = 1883\n', 7, "sinks.mqtt.host", "missing"),
    ('[sinks.mqtt]\nhost = "h"\ntopic = "x/{lamp}"\n', 9, "sinks.mqtt.topic", "{node}"),
    ('[sinks.mqtt]\nhost = "h"\npayload = "xml"\n', 9, "sinks.mqtt.payload", "senml+cbor"),
    ('[sinks.kafka]\nurl = "x"\n', 7, "sinks.kafka", "unknown sink"),
    ('[sinks.http]\nurl = "http://x"\n[nodes."SL-1"]\nlocation = [95, 4]\n', 10,
     "nodes.SL-1.location", "latitude"),
])
def test_bad_sink_config_names_line_and_key(tmp_path: Path, text: str, line: int, key: str,
                                            says: str) -> None:
    path = write(tmp_path, "\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and f"line {line}" in msg and key in msg and says in msg, msg


def test_readable_mqtt_password_is_refused(tmp_path: Path) -> None:
    pw = tmp_path / "mqtt.pw"
    pw.write_text("x\n")
    pw.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(write(tmp_path, '\n[sinks.mqtt]\nhost = "h"\npassword_file = "mqtt.pw"\n'))
