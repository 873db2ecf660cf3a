"""`lantern gateway check-config` tells the operator what [health] will do, without its secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.alerts

LANTERN = [sys.executable, "-m", "lantern"]

BASE = """\
[gateway]
state_dir = "state"
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB-lantern-test"

[sinks.http]
url = "http://127.0.0.1:9/senml"
"""

HEALTH = """
[health]
grid_g_per_kwh = 350

[health.lamp]
rating_w = 60

[health.lamps."SL-0042"]
rating_w = 36

[health.webhook]
url = "https://ops.example/hooks/lantern?key=query-secret"
token_file = "hook.token"
"""


def check_config(tmp: Path, text: str) -> subprocess.CompletedProcess[str]:
    keys = tmp / "keys.toml"
    keys.write_text('[nodes]\n"SL-0042" = "' + "ab" * 32 + '"\n')
    keys.chmod(0o600)
    token = tmp / "hook.token"
    token.write_text("token-secret\n")
    token.chmod(0o600)
    cfg = tmp / "gateway.toml"
    cfg.write_text(text)
    return subprocess.run([*LANTERN, "gateway", "check-config", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)


def health_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert r.returncode == 0, r
    return [line for line in r.stdout.splitlines() if line.startswith("  health:")]


def test_check_config_shows_the_health_line_without_its_secrets(tmp_path: Path) -> None:
    r = check_config(tmp_path, BASE + HEALTH)
    [line] = health_lines(r)
    assert "350 gCO2e/kWh" in line and "60 W lamps, 1 configured by node" in line, line
    assert "webhook https://ops.example/hooks/lantern" in line, line
    out = r.stdout + r.stderr
    assert "query-secret" not in out and "token-secret" not in out, out


def test_check_config_says_when_health_is_off(tmp_path: Path) -> None:
    [line] = health_lines(check_config(tmp_path, BASE))
    assert "no [health]" in line, line
