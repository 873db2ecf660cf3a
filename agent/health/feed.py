"""The queue's frames into the health monitor, where readings are durable.

The monitor is one more consumer of the durable queue (agent/queue/forward.py), beside the
sinks, with a cursor of its own: a frame is fed to it once it is committed (and so
acknowledged), and leaves the queue only after every sink and the monitor have it. A crash
between the monitor's commit and the cursor's feeds the same frames again; the monitor takes
a sample no newer than the lamp's latest as a backlog (counted, never integrated twice).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..ngsi import split_name
from ..queue.resolve import Batch
from .service import HealthService, Pack

NAME = "health"  # its cursor in the queue; no sink has this name


def packs(records: list[dict[str, Any]]) -> list[Pack]:
    """Resolved SenML records → (node, time, {short name: value}) per node and time, the
    `<name>.q` flags included; text and boolean records say nothing the monitor reads."""
    out: defaultdict[tuple[str, float], dict[str, Any]] = defaultdict(dict)
    for r in records:
        v = r.get("v")
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        try:
            node, name = split_name(str(r.get("n", "")))
            t = float(r["t"])
        except (ValueError, KeyError, TypeError):
            continue
        out[(node, t)][name] = v
    return [(node, t, readings) for (node, t), readings in out.items()]


class HealthSink:
    """The monitor as the forward stage sees a sink: a batch is taken once it is committed
    in the monitor's own store (health.sqlite)."""

    name = NAME

    def __init__(self, service: HealthService) -> None:
        self.service = service
        self.fed = 0  # packs fed

    async def send(self, batch: Batch) -> None:
        got = packs(batch.records())
        await self.service.feed_many(got)
        self.fed += len(got)
