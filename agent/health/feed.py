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


STORE_TRIES = 3  # a batch health.sqlite could not save is tried this often, then let go


class HealthSink:
    """The monitor as the forward stage sees a sink: a batch is taken once it is committed
    in the monitor's own store (health.sqlite).

    The monitor's state is derived from readings: it never holds the queue, and with it the
    nodes' data. Its store failing (sqlite3.Error: disk trouble, a lock) keeps the batch for
    the forward stage to try again, STORE_TRIES times in all (a lock passes), then lets it go:
    counted (svc.skipped["store"], /metrics), said once per episode in one line. Anything else
    is a bug of the monitor's on these readings: the batch is skipped at once (counted, its
    traceback logged once)."""

    name = NAME

    def __init__(self, service: HealthService) -> None:
        self.service = service
        self.fed = 0  # packs fed
        self.skipped = 0  # batches the monitor let go (a bug of ours, or its store failing)
        self._tries: tuple[int, int, int, int] | None = None  # (batch, failures)
        self._store_down = False

    async def send(self, batch: Batch) -> None:
        got = packs(batch.records())
        try:
            await self.service.feed_many(got)
        except sqlite3.Error as e:
            same = (batch.first_id, batch.last_id, hash(tuple((n, t) for n, t, _ in got)))
            tries = 1 + (self._tries[3] if self._tries and self._tries[:3] == same else 0)
            self._tries = (*same, tries)
            if tries < STORE_TRIES:
                raise
            self._tries = None
            self._skip("store")
            if not self._store_down:
                self._store_down = True
                log.error("health: %s: %s; frames %d to %d let go after %d tries: their lamps "
                          "and sensors are not judged (counted in lantern_health_skipped_total), "
                          "the readings go on to the sinks", self.service.store.path, e,
                          batch.first_id, batch.last_id, tries)
            return
        except Exception as e:
            self._skip("bug")
            if self.service.skipped["bug"] == 1:
                log.error("health: the monitor failed on frames %d to %d (%r); skipped, the "
                          "readings go on to the sinks. This is a bug: please report it with "
                          "this traceback", batch.first_id, batch.last_id, e, exc_info=True)
            return
        if self._store_down:
            self._store_down = False
            log.info("health: %s takes batches again", self.service.store.path)
        self._tries = None
        self.fed += len(got)

    def _skip(self, why: str) -> None:
        self.skipped += 1
        self.service.skipped[why] += 1
