"""The Prometheus rules shipped with the gateway: `promtool check rules`, `promtool test rules`,
and every metric they use is one the gateway exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from lantern import CHECKOUT
from lantern.agent.health.metrics import HealthCollector
from lantern.agent.health.notify import Webhook
from lantern.agent.health.service import HealthService
from lantern.agent.health.settings import Settings
from lantern.agent.metrics import Gauges, LanternCollector, Metrics

pytestmark = pytest.mark.alerts

RULES = Path(CHECKOUT) / "packaging" / "prometheus" / "lantern-alerts.yml"
TESTS = RULES.with_name("lantern-alerts.test.yml")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_promtool_check_rules() -> None:
    r = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 12 rules found" in r.stdout


def test_promtool_test_rules() -> None:
    r = promtool("test", "rules", TESTS.name, cwd=TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_test_rules_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same file expecting the lamp alert too early does."""
    shutil.copy(RULES, tmp_path / RULES.name)
    text = TESTS.read_text()
    wrong = text.replace("- eval_time: 3m\n        alertname: LanternLampFault\n"
                         "        exp_alerts: []",
                         "- eval_time: 3m\n        alertname: LanternLampFault\n"
                         "        exp_alerts:\n          - exp_labels: {node: SL-0042}")
    assert wrong != text
    (tmp_path / TESTS.name).write_text(wrong)
    r = promtool("test", "rules", TESTS.name, cwd=tmp_path)
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def exported() -> set[str]:
    """Every sample name the gateway's /metrics shows, its collectors filled with a street."""
    m = Metrics()
    m.frames_rejected["mac"] += 1
    g = Gauges(last_seen={"SL-1": 1.0}, upstream_up={"http": True}, queue_readings=1)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LanternCollector(m, lambda: g, "test"))
    svc = HealthService(Settings(), Path("/nonexistent"), [Webhook("http://x/", None)])
    for i in range(4):
        svc.health.feed("SL-1", 1e9 + 300 * i, {"lamp_power": 36.0, "illuminance": 0.1 + i,
                                                "battery": 3.1})
    reg.register(HealthCollector(svc))
    text = generate_latest(reg).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_the_rules_use_only_metrics_the_gateway_exports() -> None:
    names = exported()
    used = set(re.findall(r"\blantern_[a-z0-9_]+", RULES.read_text()))
    assert used, "no metric found in the rules"
    assert used <= names, f"not exported: {sorted(used - names)}"
    assert {"lantern_health_condition", "lantern_lamp_dayburn_kwh_total",
            "lantern_street_energy_kwh_total", "lantern_street_co2e_kg_total",
            "lantern_health_raised_total", "lantern_alert_outbox"} <= names
