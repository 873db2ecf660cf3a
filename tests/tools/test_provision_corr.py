"""`lantern provision node --offset NAME=VALUE --kappa K`: per-node calibration written into
node.json as the node reads it (docs/corrections.md); a bad value is one line and exit 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from node.drivers import corrections

from lantern.agent.cli import main as lantern
from lantern.tools.field import provision_steps as ps

BASE = ["provision", "node", "--board", "esp32-devkitc", "--id", "SL-0042", "--port",
        "/dev/ttyUSB0", "--dry-run"]


def _node_json(out: str) -> dict[str, object]:
    """The node.json the dry run prints (its config step's last line)."""
    line = next(x.strip() for x in out.splitlines() if x.strip().startswith('{"id"'))
    cfg: dict[str, object] = json.loads(line)
    return cfg


def test_offsets_and_kappa_go_into_node_json(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = lantern([*BASE, "--keys", str(tmp_path / "k.toml"), "--out", str(tmp_path / "s"),
                    "--offset", "temperature=-0.8", "--offset", "humidity=3",
                    "--offset", "sound=1.5", "--kappa", "0.25"])
    out = capsys.readouterr().out
    assert code == 0, out
    cfg = _node_json(out)
    assert cfg["offsets"] == {"temperature": -0.8, "humidity": 3.0, "LAeq": 1.5, "LAmax": 1.5}
    assert cfg["corrections"] == {"kappa": 0.25}
    # the node's own check takes every entry (it logs and drops what it refuses)
    said: list[str] = []
    fix = corrections.setup(cfg, said.append)
    assert said == [] and fix["kappa"] == 0.25 and fix["offsets"] == cfg["offsets"]


def test_without_options_node_json_has_no_calibration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert lantern([*BASE, "--keys", str(tmp_path / "k.toml")]) == 0
    cfg = _node_json(capsys.readouterr().out)
    assert "offsets" not in cfg and "corrections" not in cfg


def test_zero_offsets_are_left_out() -> None:
    assert ps.calibration(["LAeq=0", "LAmax=0.0"], None) == {}
    assert ps.calibration(["LAeq=2", "LAmax=0"], "0") == {
        "offsets": {"LAeq": 2.0}, "corrections": {"kappa": 0.0}}


@pytest.mark.parametrize(("argv", "says"), [
    (["--offset", "pressure=3"], "--offset 'pressure=3': expected NAME=VALUE with NAME one of"),
    (["--offset", "temperature"], "--offset 'temperature': expected NAME=VALUE"),
    (["--offset", "temperature=warm"], "temperature takes a number from -20 to 20 (Cel)"),
    (["--offset", "temperature=nan"], "temperature takes a number from -20 to 20 (Cel)"),
    (["--offset", "humidity=inf"], "humidity takes a number from -50 to 50 (%RH)"),
    (["--offset", "LAeq=41"], "LAeq takes a number from -40 to 40 (dB)"),
    (["--offset", "sound=1", "--offset", "LAmax=2"], "LAmax is given twice"),
    (["--kappa", "2.5"], "--kappa '2.5': the aerosol's hygroscopicity is a number from 0 to 2"),
    (["--kappa", "-0.1"], "--kappa '-0.1'"),
    (["--kappa", "NaN"], "--kappa 'NaN'"),
    (["--kappa", "lots"], "--kappa 'lots'"),
])
def test_a_bad_value_is_one_line_and_exit_1(tmp_path: Path, argv: list[str], says: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = lantern([*BASE, "--keys", str(tmp_path / "k.toml"), *argv])
    err = capsys.readouterr().err
    assert code == 1
    first = err.splitlines()[0]
    assert first.startswith("lantern provision: step check failed: ") and says in first, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_limits_are_finite_and_cover_the_node_names() -> None:
    assert set(ps.OFFSET_LIMITS) == set(corrections.OFFSETS)
    assert all(math.isfinite(v) and v > 0 for v in ps.OFFSET_LIMITS.values())
