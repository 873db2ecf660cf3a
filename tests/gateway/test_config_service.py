"""Service config: [api] and [history], the shipped example, and `lantern gateway check-config`.

A bad config, a missing key file and a key file others can read must each give one clear
line on stderr and a non-zero exit.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lantern.agent.config import load_config, write_secret
from lantern.agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "gateway.example.toml"
KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

BASE = """\
[gateway]
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB0"

[sinks.http]
url = "http://127.0.0.1:9/in"

"""


def write(d: Path, extra: str) -> Path:
    p = d / "gateway.toml"
    p.write_text(BASE + extra)
    return p


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return str(exc.value)


# ---------------------------------------------------------------- [api], [history]


def test_api_defaults_to_loopback(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert (cfg.api.enabled, cfg.api.host, cfg.api.port, cfg.api.token_file) == (
        True, "127.0.0.1", 8470, None)
    assert (cfg.history.keep_hours, cfg.history.max_samples) == (24.0, 50_000)


def test_api_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nhost = "0.0.0.0"\n')
    msg = error_of(path)
    assert "line 11" in msg and "api.host" in msg and "token_file" in msg, msg
    write_secret(tmp_path / "api.token", "a-long-random-token\n")
    cfg = load_config(write(tmp_path, '[api]\nhost = "0.0.0.0"\ntoken_file = "api.token"\n'))
    assert cfg.api.token_file == tmp_path / "api.token"
    # ::1 is loopback too
    assert load_config(write(tmp_path, '[api]\nhost = "::1"\n')).api.host == "::1"


def test_api_token_readable_by_others_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "api.token"
    token.write_text("tok\n")
    token.chmod(0o644)
    msg = error_of(write(tmp_path, '[api]\ntoken_file = "api.token"\n'))
    assert "chmod 600" in msg and "api.token_file" in msg and "0644" in msg


def test_api_empty_token_is_refused(tmp_path: Path) -> None:
    write_secret(tmp_path / "api.token", "\n")
    msg = error_of(write(tmp_path, '[api]\ntoken_file = "api.token"\n'))
    assert "api.token_file" in msg and "empty" in msg


@pytest.mark.parametrize(("extra", "key", "line", "fragment"), [
    ("[api]\nport = 70000\n", "api.port", 11, "0..65535"),
    ('[api]\nport = "8470"\n', "api.port", 11, "expected int"),
    ('[api]\nhost = "gateway.local"\n', "api.host", 11, "IP address"),
    ("[api]\nprot = 8470\n", "api.prot", 11, "unknown key"),
    ('[api]\nenabled = "yes"\n', "api.enabled", 11, "expected bool"),
    ("[history]\nkeep_hours = 0\n", "history.keep_hours", 11, "> 0"),
    ("[history]\nmax_samples = 5\n", "history.max_samples", 11, "100.."),
    ("[history]\nkeep = 3\n", "history.keep", 11, "unknown key"),
])
def test_bad_service_settings_name_line_key_and_fix(tmp_path: Path, extra: str, key: str,
                                                    line: int, fragment: str) -> None:
    path = write(tmp_path, extra)
    msg = error_of(path)
    assert path.name in msg and key in msg and fragment in msg, msg
    assert re.search(rf"\bline {line}\b", msg), msg


# ---------------------------------------------------------------- check-config, the example


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lantern", "gateway", "check-config",
                           "--config", str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The shipped example, copied as an operator would, beside its key file."""
    shutil.copy(EXAMPLE, tmp_path / "gateway.toml")
    write_secret(tmp_path / "keys.toml", f'[nodes]\n"SL-0001" = "{KEY}"\n')
    return tmp_path / "gateway.toml"


def test_example_config_passes_check_config(example: Path) -> None:
    r = check_config(example)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{example}: OK (1 serial links, 1 node keys)")
    assert "status page and API: http://127.0.0.1:8470/" in r.stdout
    assert "https://platform.example/senml" in r.stdout
    assert r.stderr == ""


def test_example_is_commented_and_names_every_section() -> None:
    text = EXAMPLE.read_text()
    comments = [ln for ln in text.splitlines() if ln.lstrip().startswith("#")]
    assert len(comments) >= 20
    for section in ("[gateway]", "[[links.serial]]", "[batch]", "[sinks.http]", "[queue]",
                    "[api]", "[history]"):
        assert section in text, section


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
    return lines[0]


def test_missing_key_file_is_one_clear_error(example: Path) -> None:
    (example.parent / "keys.toml").unlink()
    line = one_error_line(check_config(example))
    assert line.startswith("lantern: ") and "keys.toml" in line and "node key file" in line
    assert "cannot read" in line and "No such file" in line


def test_key_file_readable_by_others_is_one_clear_error(example: Path) -> None:
    (example.parent / "keys.toml").chmod(0o644)
    line = one_error_line(check_config(example))
    assert "keys.toml" in line and "0644" in line and "chmod 600" in line


def test_bad_config_is_one_clear_error(example: Path) -> None:
    text = example.read_text().replace('policy = "pause_intake"', 'policy = "drop_everything"')
    example.write_text(text)
    lineno = text.splitlines().index('policy = "drop_everything"') + 1
    line = one_error_line(check_config(example))
    assert f"{example} line {lineno}: queue.policy" in line and "evict_oldest" in line


def test_not_toml_is_one_clear_error(example: Path) -> None:
    example.write_text(example.read_text() + "\n[api\n")
    line = one_error_line(check_config(example))
    assert "not valid TOML" in line and str(example) in line


def test_typo_in_the_example_is_one_clear_error(example: Path) -> None:
    """`baudrate =` must not run at 115200, nor `token =` unauthenticated: check-config says
    which file, line and key, and the keys the table expected."""
    text = example.read_text().replace("baud = 115200", "baudrate = 57600")
    example.write_text(text)
    lineno = text.splitlines().index("baudrate = 57600") + 1
    line = one_error_line(check_config(example))
    assert f"{example} line {lineno}: links.serial[0].baudrate: unknown key; expected baud or " \
           "port" in line, line


# ---------------------------------------------------------------- plug-ins, loaded when configured

IMPORTED = """
import sys
from lantern.agent.config import load_config
import lantern.agent.cli, lantern.agent.gateway
cfg = load_config(sys.argv[1])
print(" ".join(sorted(m for m in sys.modules)))
"""


@pytest.mark.parametrize(("extra", "loaded", "not_loaded"), [
    # a serial + HTTP gateway: neither bleak nor aiomqtt (nor the BLE link, nor the other sinks)
    ("", {"lantern.agent.links.serial", "lantern.agent.sinks.http"},
     {"bleak", "aiomqtt", "lantern.agent.links.ble", "lantern.agent.links.ble_config",
      "lantern.agent.sinks.mqtt", "lantern.agent.sinks.ngsi_ld", "lantern.tools.field",
      "lantern.tools.street", "rich", "esptool", "mpremote"}),
    # a BLE table is parsed without bleak: the link's factory loads it when the link is built
    ("[[links.ble]]\n[sinks.mqtt]\nhost = \"h\"\n",
     {"lantern.agent.links.ble_config", "lantern.agent.sinks.mqtt", "aiomqtt"},
     {"bleak", "lantern.agent.links.ble"}),
])
def test_a_plugin_is_imported_only_when_configured(tmp_path: Path, extra: str, loaded: set[str],
                                                   not_loaded: set[str]) -> None:
    r = subprocess.run([sys.executable, "-c", IMPORTED, str(write(tmp_path, extra))],
                       capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    modules = set(r.stdout.split())
    assert loaded <= modules, loaded - modules
    assert not not_loaded & modules, not_loaded & modules


def test_every_registered_plugin_names_itself() -> None:
    from lantern.agent import plugins

    for name in plugins.SINKS:
        assert plugins.sink(name).name == name and plugins.sink(name).keys
    for name in plugins.LINKS:
        assert plugins.link(name).name == name and plugins.link(name).keys
