"""The adversarial tier: each finding of a security review as the test that failed before its
fix, and property/fuzz tests that go where those findings went (peer-controlled sizes and
nesting, exception types nobody handles, state that grows under hostile traffic)."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.adversarial)
