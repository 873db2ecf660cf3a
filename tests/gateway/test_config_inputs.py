"""Config inputs check-config used to pass and run died on (issue 20): one line, file and line."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


# ---------------------------------------------------------------- what run needs from the machine

SERIAL = b'[[links.serial]]\nport = "/dev/ttyUSB-lantern-test"\n'


def check_config(cfg: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *LANTERN, "gateway", "check-config", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)


def one_error(r: subprocess.CompletedProcess[str], says: str) -> None:
    assert r.returncode == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_state_dir_that_is_a_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, SERIAL)
    (tmp_path / "state").write_text("")
    one_error(check_config(cfg), "gateway.state_dir is a file, not a directory")


def test_a_state_dir_the_user_cannot_write() -> None:
    """As the unprivileged user nobody (root may write anywhere), in a folder it can read."""
    with tempfile.TemporaryDirectory(prefix="lantern-test-") as d:
        tmp = Path(d)
        tmp.chmod(0o755)
        cfg = write(tmp, SERIAL)
        cfg.write_text(cfg.read_text().replace('state_dir = "state"',
                                               'state_dir = "locked/state"'))
        (tmp / "locked").mkdir(mode=0o755)
        os.chown(tmp / "keys.toml", 65534, 65534)
        r = check_config(cfg, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        one_error(r, f"{tmp / 'locked'}: is not writable, so {tmp / 'locked/state'} cannot be "
                     "created by nobody")


@pytest.mark.parametrize(("options", "says"), [
    ("ro", "the filesystem is read-only"),
    ("size=1m", "the disk is full"),
])
def test_a_read_only_or_full_state_dir(tmp_path: Path, options: str, says: str) -> None:
    """On a tmpfs of its own in a private mount namespace (unshare -m, as root)."""
    cfg = write(tmp_path, SERIAL)
    (tmp_path / "state").mkdir()
    script = (f"mount -t tmpfs -o {options} lantern-test {tmp_path / 'state'} && "
              + " ".join([*LANTERN, "gateway", "check-config", "--config", str(cfg)]))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    one_error(r, says)


def test_a_missing_serial_port_is_a_warning_and_the_unchecked_is_said(tmp_path: Path) -> None:
    r = check_config(write(tmp_path, SERIAL))
    assert r.returncode == 0, r
    assert "warning: /dev/ttyUSB-lantern-test: no such serial port now" in r.stdout
    assert "not checked: that the upstreams answer" in r.stdout
