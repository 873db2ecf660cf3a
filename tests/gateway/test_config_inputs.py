"""Config inputs check-config used to pass and run died on (issue 20): one line, file and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LANTERN = [sys.executable, "-m", "lantern"]


def write(tmp: Path, text: bytes) -> Path:
    keys = tmp / "keys.toml"
    keys.write_text('[nodes]\n"SL-0001" = "' + "ab" * 32 + '"\n')
    keys.chmod(0o600)
    cfg = tmp / "gateway.toml"
    cfg.write_bytes(b'[gateway]\nstate_dir = "state"\nkeys_file = "keys.toml"\n' + text
                    + b'\n[sinks.http]\nurl = "http://127.0.0.1:9/"\n')
    return cfg


@pytest.mark.parametrize(("text", "says"), [
    (b'[[links.serial]]\nport = "/dev/ttyUSB0"\nbaud = 99999999999999999\n',
     "line 6: links.serial[0].baud: must be 50 to 4000000"),
    (b'[[links.serial]]\nport = "/dev/ttyUSB0"\nbaud = 0\n',
     "line 6: links.serial[0].baud: must be 50 to 4000000"),
    (b'# Stra\xdfe 12\n[[links.serial]]\nport = "/dev/ttyUSB0"\n',
     "line 4: not UTF-8 text (byte 0xdf); save the file as UTF-8"),
])
def test_check_config_refuses_what_run_would_die_on(tmp_path: Path, text: bytes,
                                                      says: str) -> None:
    cfg = write(tmp_path, text)
    for action in ("check-config", "run"):
        r = subprocess.run([*LANTERN, "gateway", action, "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (action, r)
        assert r.stderr.strip() == f"lantern: {cfg} {says}" or \
            (says in r.stderr and len(r.stderr.strip().splitlines()) == 1), (action, r.stderr)
        assert "Traceback" not in r.stderr
