from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lantern.tools.street.sim import MICROPYTHON

from .harness.topology import Topology


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.micropython)


@pytest.fixture
def micropython() -> Path:
    # `make test` builds it first; a missing build is an error, never a skip
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    return MICROPYTHON


@pytest.fixture
async def topology(tmp_path: Path, micropython: Path) -> AsyncIterator[Topology]:
    topo = Topology(tmp_path)
    yield topo
    await topo.stop()
