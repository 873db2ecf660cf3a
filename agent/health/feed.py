"""The queue's frames into the health monitor, where readings are durable.

The monitor is one more consumer of the durable queue (agent/queue/forward.py), beside the
sinks, with a cursor of its own: a frame is fed to it once it is committed (and so
acknowledged), and leaves the queue only after every sink and the monitor have it. A crash
between the monitor's commit and the cursor's feeds the same frames again; the monitor takes
a sample no newer than the lamp's latest as a backlog (counted, never integrated twice).
"""

from __future__ import annotations

import logging
import sqlite3
from collections import defaultdict
from typing import Any

from ..ngsi import split_name
from ..queue.resolve import Batch
from .service import HealthService, Pack

NAME = "health"  # its cursor in the queue; no sink has this name

log = logging.getLogger("lantern.health")


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
    in the monitor's own store (health.sqlite).

    Its store failing (sqlite3.Error: disk trouble) keeps the batch, tried again with backoff
    like a sink's. Anything else is a bug of the monitor's on these readings: the batch is
    skipped (counted, its traceback logged once), never retried forever — the monitor must
    not hold the queue, and with it the nodes' data, behind one batch it cannot judge."""

    name = NAME

    def __init__(self, service: HealthService) -> None:
        self.service = service
        self.fed = 0  # packs fed
        self.skipped = 0  # batches the monitor failed on (a bug of ours)

    async def send(self, batch: Batch) -> None:
        got = packs(batch.records())
        try:
            await self.service.feed_many(got)
        except sqlite3.Error:
            raise
        except Exception as e:
            self.skipped += 1
            if self.skipped == 1:
                log.error("health: the monitor failed on frames %d to %d (%r); skipped, the "
                          "readings go on to the sinks. This is a bug: please report it with "
                          "this traceback", batch.first_id, batch.last_id, e, exc_info=True)
            return
        self.fed += len(got)
