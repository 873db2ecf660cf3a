"""The forward stage, per sink: batches out of the queue to a sink; frames leave after a 2xx.

Each sink has its own forwarder and its own cursor over the queue, so a slow or dead sink
never blocks another; a frame is deleted once every configured sink has confirmed it. A batch
holds whole frames, up to max_records readings; it goes when the next frame would not fit,
or when its oldest frame is max_age_s old.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from typing import Protocol

from ..metrics import Metrics
from ..sinks.http import RETRY_AFTER_MAX_S, DeliveryError
from .resolve import Batch
from .store import Store

log = logging.getLogger("lantern.forward")


class Sink(Protocol):
    name: str

    async def send(self, batch: Batch) -> None: ...


class Forwarder:
    def __init__(self, store: Store, sink: Sink, metrics: Metrics, new_data: asyncio.Event,
                 max_records: int, max_age_s: float,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 60.0,
                 all_sinks: list[str] | None = None) -> None:
        self.store = store
        self.sink = sink
        self.metrics = metrics
        self.new_data = new_data
        self.max_records = max_records
        self.max_age_s = max_age_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.upstream_ok: bool | None = None
        self.all_sinks = all_sinks or [sink.name]
        self.delivered = 0

    async def _wait_new(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.new_data.wait(), timeout)
        self.new_data.clear()

    async def run(self) -> None:
        cursor = await self.store.cursor(self.sink.name)
        failures = 0  # reads of the queue that failed in a row (logged once)
        while True:
            try:
                batch = await self.store.next_batch(self.max_records, cursor)
            except Exception as e:
                # sqlite3.Error: disk trouble. Anything else is a bug of ours (a frame that
                # fails to resolve is already a dead letter, batches.py): never end
                # this task over it, or the gateway stops, and stops again after a restart.
                self.metrics.store_errors += 1
                failures += 1
                if failures == 1:
                    log.error("%s: store %s: cannot read the queue (%r); retrying every "
                              "second", self.sink.name, self.store.path, e,
                              exc_info=not isinstance(e, sqlite3.Error))
                await asyncio.sleep(1.0)
                continue
            failures = 0
            if batch is None:
                await self._wait_new(None)
                continue
            age = time.time() - batch.first_received
            if not batch.full and age < self.max_age_s:
                # not sent yet: its lease goes back, it is read again (fuller) after the wait
                self.store.cap.release(batch.first_id, batch.last_id)
                await self._wait_new(self.max_age_s - age)
                continue
            await self._deliver(batch)
            cursor = batch.last_id

    def retry_delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the `failures`-th failed attempt in a row.

        Exponential backoff with full jitter (AWS architecture blog: spreads a fleet's retries
        apart). An upstream's Retry-After is a floor under that backoff, never a way round it:
        "0" or an HTTP-date already past (a server clock behind ours, a stale header from a
        cache) must not turn an overloaded upstream's 503s into a tight loop of POSTs. And it
        is honoured up to RETRY_AFTER_MAX_S only, so that one absurd or hostile header cannot
        hold the queue back for a year (docs/upstream.md).
        """
        cap = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(failures, 20))
        backoff = random.uniform(0, cap)
        if retry_after is None or not retry_after > backoff:  # (NaN included)
            return backoff
        return min(retry_after, max(RETRY_AFTER_MAX_S, backoff))

    async def _deliver(self, batch: Batch) -> None:
        failures = 0
        while True:
            try:
                await self.sink.send(batch)
            except Exception as e:  # (see below: the forwarder must live)
                failures += 1
                self.metrics.upstream_failures += 1
                retry_after = e.retry_after if isinstance(e, DeliveryError) else None
                delay = self.retry_delay(failures, retry_after)
                # sqlite3.Error: the health monitor's own store failing (agent/health/feed.py),
                # disk trouble like an upstream's: one line, no traceback
                if not isinstance(e, DeliveryError | sqlite3.Error):
                    # A sink's bug, not the upstream's answer. Ending this task would stop the
                    # gateway, and after a restart the same batch would stop it again: the
                    # batch is kept and retried like a failed delivery, and the traceback
                    # logged once for the report.
                    if failures == 1:
                        log.error("%s: the sink failed on a batch of %d readings (frames %d to "
                                  "%d): %r; kept, retrying with backoff. This is a bug: please "
                                  "report it with this traceback", self.sink.name,
                                  len(batch.rids), batch.first_id, batch.last_id, e,
                                  exc_info=True)
                elif failures == 1 or self.upstream_ok:
                    log.warning("%s: %s; %d readings kept, retrying in %.1fs",
                                self.sink.name, e, len(batch.rids), delay)
                self.upstream_ok = False
                await asyncio.sleep(delay)
                continue
            break
        if self.upstream_ok is False:
            log.info("%s: upstream accepts again after %d failed attempts", self.sink.name,
                     failures)
        self.upstream_ok = True
        failures = 0
        while True:
            try:
                await self.store.delivered_to(self.sink.name, batch, self.all_sinks)
                break
            except sqlite3.Error as e:
                # disk full or read-only: the sink has the batch, the queue cannot note it; keep
                # trying (a restart would resend it: a duplicate upstream, same reading ids)
                failures += 1
                self.metrics.store_errors += 1
                if failures == 1:
                    log.error("%s: store %s: cannot record a delivered batch (%s); retrying "
                              "every second", self.sink.name, self.store.path, e)
                await asyncio.sleep(1.0)
        self.delivered += len(batch.rids)
        self.metrics.readings_delivered += len(batch.rids)
