"""The systemd unit (packaging/systemd/) and the install step (packaging/install.sh).

`systemd-analyze verify` and `systemd-analyze security --offline` check the unit as systemd
itself reads it; the installer runs into a DESTDIR, as a package build would.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.install import LANTERN, ROOT, install

UNIT = ROOT / "packaging" / "systemd" / "lantern-gateway.service"
ANALYZE = shutil.which("systemd-analyze")


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def localised(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's lantern (verify checks it exists)."""
    p = tmp_path / "lantern-gateway.service"
    p.write_text(UNIT.read_text().replace("/opt/lantern/bin/lantern", str(LANTERN)))
    return p


def test_unit_is_a_sandboxed_notify_service_with_a_watchdog() -> None:
    d = directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert re.fullmatch(r"\d+s", one["WatchdogSec"]) and int(one["WatchdogSec"][:-1]) >= 10
    assert one["Restart"] == "on-failure"
    assert one["User"] == "lantern" and one["StateDirectory"] == "lantern"
    assert set(one["SupplementaryGroups"].split()) == {"dialout", "bluetooth"}
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["ExecStart"].endswith("gateway run --config /etc/lantern/gateway.toml")
    assert "check-config" in one["ExecStartPre"]
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "char-ttyUSB rw" in d["DeviceAllow"] and one["DevicePolicy"] == "closed"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert ANALYZE, "systemd-analyze missing: `make deps` installs the systemd package"
    r = subprocess.run([ANALYZE, "verify", str(localised(tmp_path))], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # unknown keys and bad values are only warnings: there must be none
    assert r.stderr.strip() == "", r.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing binary are reported."""
    assert ANALYZE
    p = localised(tmp_path)
    p.write_text(p.read_text().replace("WatchdogSec=", "WatchdogSecs=")
                 .replace(str(LANTERN), "/nonexistent/lantern"))
    r = subprocess.run([ANALYZE, "verify", str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "WatchdogSecs" in r.stderr


def test_security_exposure_is_low(tmp_path: Path) -> None:
    assert ANALYZE
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager",
                        str(localised(tmp_path))], capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout  # systemd calls < 2 "OK"; 9.6 is a bare unit


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    dest = tmp_path / "root"
    r = install(dest)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "systemctl enable --now lantern-gateway" in r.stdout
    return dest


def test_install_lays_out_unit_config_and_keys(installed: Path) -> None:
    unit = installed / "etc/systemd/system/lantern-gateway.service"
    assert f"ExecStart={LANTERN} gateway run" in unit.read_text()
    assert mode(unit) == 0o644
    cfg = installed / "etc/lantern/gateway.toml"
    assert cfg.read_text() == (ROOT / "docs/gateway.example.toml").read_text()
    assert mode(cfg) == 0o640 and mode(cfg.parent) == 0o750
    keys = installed / "etc/lantern/keys.toml"
    assert mode(keys) == 0o600
    assert (installed / "opt/lantern/share/doc/lantern/gateway.md").exists()
    # what was installed passes the gateway's own check
    r = subprocess.run([str(LANTERN), "gateway", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "0 node keys" in r.stdout
    r = subprocess.run([ANALYZE or "systemd-analyze", "verify", str(unit)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_install_again_keeps_the_operators_files(installed: Path) -> None:
    cfg = installed / "etc/lantern/gateway.toml"
    keys = installed / "etc/lantern/keys.toml"
    cfg.write_text(cfg.read_text().replace("/dev/ttyUSB0", "/dev/ttyAMA0"))
    keys.write_text(keys.read_text() + '"SL-0001" = "' + "ab" * 32 + '"\n')
    r = install(installed)
    assert r.returncode == 0, r.stderr
    assert "/dev/ttyAMA0" in cfg.read_text() and "SL-0001" in keys.read_text()
    assert mode(keys) == 0o600
