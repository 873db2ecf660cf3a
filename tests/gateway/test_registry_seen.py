"""When the registry writes nodes' last-seen times (issue 22, SD-card wear): every node's
together, every SEEN_WRITE_S, and a node seen for the first time at once."""

from __future__ import annotations

from pathlib import Path

from lantern.agent import registry as registry_mod
from lantern.agent.registry import REGISTRY_FILE, Registry
from tests.helpers.fleet import T0

NODES = ("SL-0001", "SL-0002", "SL-0003")


def on_disk(path: Path) -> dict[str, float | None]:
    with Registry(path) as other:  # another process's view: only what was written
        return {n: r.last_seen for n in NODES if (r := other.get(n)) is not None}


def test_first_sightings_are_written_at_once_then_every_nodes_together_each_interval(
        tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    step = registry_mod.SEEN_WRITE_S
    with Registry(path) as reg:
        reg.sync_keys({n.encode(): bytes([i + 1]) * 32 for i, n in enumerate(NODES)}, now=T0)
        reg.observe({NODES[0]: T0 + 1}, {})  # the street's first node: written at once
        assert on_disk(path) == {NODES[0]: T0 + 1, NODES[1]: None, NODES[2]: None}
        reg.observe({NODES[0]: T0 + 61, NODES[1]: T0 + 61}, {})  # a new one: at once, both
        assert on_disk(path) == {NODES[0]: T0 + 61, NODES[1]: T0 + 61, NODES[2]: None}
        # known nodes: nothing until one of them is SEEN_WRITE_S older on disk than seen
        reg.observe({NODES[0]: T0 + 61 + step - 1, NODES[1]: T0 + 61 + step - 5}, {})
        assert on_disk(path)[NODES[0]] == T0 + 61
        reg.observe({NODES[0]: T0 + 61 + step, NODES[1]: T0 + 61 + step - 5}, {})
        assert on_disk(path) == {NODES[0]: T0 + 61 + step, NODES[1]: T0 + 56 + step,
                                 NODES[2]: None}  # (the other along with it)
        # and the gateway's own view is always the newest (Registry.live)
        live = {r.id: r.last_seen for r in reg.live({NODES[1]: T0 + 5000})}
        assert live[NODES[1]] == T0 + 5000
