"""Every bad input of tests/helpers/bad_inputs.py: its exit code and one line, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.bad_inputs import CASES, Case, run


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_clear_line(case: Case, tmp_path: Path) -> None:
    r = run(case, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == case.code, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    assert "Traceback" not in r.stdout + r.stderr
    assert case.says in out, (case.says, r.stdout[-1500:], r.stderr[-1500:])
