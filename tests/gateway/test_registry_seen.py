"""When the registry writes nodes' last-seen times (issue 22, SD-card wear): together, every
SEEN_WRITE_S, and a node seen for the first time within FIRST_SEEN_WRITE_S."""

from __future__ import annotations

from pathlib import Path

import pytest

from lantern.agent import registry as registry_mod
from lantern.agent.registry import REGISTRY_FILE, Registry
from tests.helpers.fleet import T0

NODES = ("SL-0001", "SL-0002", "SL-0003")


def on_disk(path: Path) -> dict[str, float | None]:
    with Registry(path) as other:  # another process's view: only what was written
        return {n: r.last_seen for n in NODES if (r := other.get(n)) is not None}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_sightings_are_written_within_a_minute_together_then_all_every_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(registry_mod.time, "monotonic", clock)
    path = tmp_path / REGISTRY_FILE
    with Registry(path) as reg:
        reg.sync_keys({n.encode(): bytes([i + 1]) * 32 for i, n in enumerate(NODES)}, now=T0)
        reg.observe({NODES[0]: T0 + 1}, {})  # the street's first node: written at once
        assert on_disk(path) == {NODES[0]: T0 + 1, NODES[1]: None, NODES[2]: None}
        clock.now += 20
        reg.observe({NODES[0]: T0 + 21, NODES[1]: T0 + 21}, {})  # held: a minute not over
        clock.now += 20
        reg.observe({NODES[0]: T0 + 41, NODES[1]: T0 + 41, NODES[2]: T0 + 41}, {})
        assert on_disk(path) == {NODES[0]: T0 + 1, NODES[1]: None, NODES[2]: None}
        clock.now += 21  # a minute after the first write: both new ones, and the first's too
        reg.observe({NODES[0]: T0 + 62, NODES[1]: T0 + 62, NODES[2]: T0 + 61}, {})
        assert on_disk(path) == {NODES[0]: T0 + 62, NODES[1]: T0 + 62, NODES[2]: T0 + 61}
        # known nodes: nothing until one of them is SEEN_WRITE_S older on disk than seen
        step = registry_mod.SEEN_WRITE_S
        reg.observe({NODES[0]: T0 + 62 + step - 1, NODES[2]: T0 + 61 + step - 5}, {})
        assert on_disk(path)[NODES[0]] == T0 + 62
        reg.observe({NODES[0]: T0 + 62 + step, NODES[2]: T0 + 61 + step - 5}, {})
        assert on_disk(path) == {NODES[0]: T0 + 62 + step, NODES[1]: T0 + 62,
                                 NODES[2]: T0 + 61 + step - 5}  # (the others along with it)
        # and the gateway's own view is always the newest (Registry.live)
        live = {r.id: r.last_seen for r in reg.live({NODES[1]: T0 + 5000})}
        assert live[NODES[1]] == T0 + 5000
