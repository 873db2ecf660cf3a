from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hil_tests.harness.topology import Topology
from lantern.tools.street.sim import MICROPYTHON

from .twin import TwinNode


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.esp32_twin)


@pytest.fixture
def micropython() -> Path:
    """The unix port the twin runs on (hil_tests' fixture too): missing is a failure, not a skip."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    return MICROPYTHON


@pytest.fixture
async def street(tmp_path: Path, micropython: Path) -> AsyncIterator[Topology]:
    """One twin node, its relay, the real gateway and an upstream (not started yet)."""
    topo = Topology(tmp_path, n_nodes=1, interval_ms=300_000, node_class=TwinNode)
    yield topo
    await topo.stop()
