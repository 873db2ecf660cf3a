"""The alert rules ship with the gateway: install.sh lays them out beside its docs (from a
clone as here, or from the offline bundle's prometheus/, which packaging/dist.py fills)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.install import ROOT, install

pytestmark = pytest.mark.alerts


def test_install_lays_out_the_alert_rules(tmp_path: Path) -> None:
    r = install(tmp_path / "root")
    assert r.returncode == 0, r.stdout + r.stderr
    shipped = tmp_path / "root/opt/lantern/share/doc/lantern/prometheus"
    for name in ("lantern-alerts.yml", "lantern-alerts.test.yml"):
        assert (shipped / name).read_bytes() == (ROOT / "packaging/prometheus" / name
                                                 ).read_bytes()
        assert (shipped / name).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "root/opt/lantern/share/doc/lantern/alerts.md").exists()
