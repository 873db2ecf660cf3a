"""The health monitor as a gateway service: detectors and their durable store on a thread of
their own, and one delivery task per alert target (webhook, MQTT) draining the outbox.

    async with HealthService(settings, state_dir, [Webhook(url, session)]) as health:
        await health.feed_many([(node, t, readings), ...])   # after the queue commits them
        await health.tick()                                  # every few seconds: silence

Notifications go out in the order their events happened, per target; one that fails is
tried again after a backoff (doubling up to `backoff_max_s`) before anything after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .alerts import Event
from .monitor import Health, LampView
from .notify import Target, body
from .settings import Settings
from .store import HealthStore

log = logging.getLogger("lantern.health")

Pack = tuple[str, float, dict[str, Any]]


class HealthService:
    def __init__(self, settings: Settings, state_dir: Path, targets: Sequence[Target] = (),
                 receiver: str = "lantern", external_url: str = "",
                 clock: Callable[[], float] = time.time, backoff_s: float = 1.0,
                 backoff_max_s: float = 300.0) -> None:
        self.health = Health(settings)
        self.store = HealthStore(state_dir)
        self.targets = list(targets)
        self.receiver = receiver
        self.external_url = external_url
        self.clock = clock
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.delivered: Counter[str] = Counter()  # by target
        self.failed: Counter[str] = Counter()  # attempts that failed, by target
        self.waiting: dict[str, int] = {}  # notifications in the outbox, by target
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lantern-health")
        self._wake = {t.name: asyncio.Event() for t in self.targets}
        self._empty = {t.name: asyncio.Event() for t in self.targets}  # set: nothing owed
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.stop_timeout_s = 15.0  # longer than a webhook's timeout

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def __aenter__(self) -> HealthService:
        await self._run(self._open)
        self._update_empty()
        for target in self.targets:
            self._tasks.append(asyncio.create_task(self._deliver(target),
                                                   name=f"health-{target.name}"))
        return self

    def _open(self) -> None:
        self.store.open()
        self.health.restore(self.store.load())
        self.waiting = self.store.waiting()

    def _update_empty(self) -> None:
        for name, ev in self._empty.items():
            if self.waiting.get(name):
                ev.clear()
            else:
                ev.set()

    async def drained(self, target: str) -> None:
        """Wait until every notification owed to `target` was delivered."""
        await self._empty[target].wait()

    async def __aexit__(self, *exc: object) -> None:
        # a delivery under way finishes (and leaves the outbox) before the stop: cancelled
        # between the target's answer and the delete, it would be sent again after a restart
        self._stopping = True
        for wake in self._wake.values():
            wake.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=self.stop_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._run(self.store.close)
        self._pool.shutdown(wait=True)

    async def feed_many(self, packs: Iterable[Pack]) -> list[Event]:
        """Packs as the queue committed them; their events, durable once this returns."""
        events: list[Event] = await self._run(self._feed, list(packs))
        self._update_empty()
        self._notify(events)
        return events

    async def feed(self, node: str, t: float, readings: dict[str, Any]) -> list[Event]:
        return await self.feed_many([(node, t, readings)])

    async def tick(self, now: float | None = None) -> list[Event]:
        events: list[Event] = await self._run(self._tick, self.clock() if now is None else now)
        self._update_empty()
        self._notify(events)
        return events

    def lamps(self, now: float | None = None) -> list[LampView]:
        return self.health.lamps(self.clock() if now is None else now)

    def _feed(self, packs: list[Pack]) -> list[Event]:
        events = []
        for node, t, readings in packs:
            events += self.health.feed(node, t, readings)
        self._save(events)
        return events

    def _tick(self, now: float) -> list[Event]:
        events = self.health.tick(now)
        if events:
            self._save(events)
        return events

    def _save(self, events: list[Event]) -> None:
        notes = [(t.name, body(e, self.receiver, self.external_url))
                 for e in events for t in self.targets]
        self.store.save(self.health.state(), notes)
        if notes:
            self.waiting = self.store.waiting()

    def _notify(self, events: list[Event]) -> None:
        for e in events:
            # one template per alert and status: the log's rate limit (agent/logsetup.py, per
            # template) then never folds one alert's raise into another's
            log.log(logging.WARNING if e.status == "firing" else logging.INFO,
                    f"alert {e.status} {e.alert} %s%s: %s", e.node,
                    f" {e.subject}" if e.subject else "", e.summary)
        if events:
            for wake in self._wake.values():
                wake.set()

    async def _deliver(self, target: Target) -> None:
        wake = self._wake[target.name]
        failing = 0
        while not self._stopping:
            wake.clear()
            now = self.clock()
            head = await self._run(self.store.due, target.name, now, 1)
            if not head:
                nxt = await self._run(self.store.next_at, target.name)
                wait = None if nxt is None else max(0.0, nxt - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
                continue
            note = head[0]
            try:
                await target.send(note.body)
            except Exception as e:
                self.failed[target.name] += 1
                if failing == 0:
                    log.warning("alert target %s: delivery failed (%s); kept and tried again "
                                "with backoff, nothing after it goes first", target.name, e)
                failing += 1
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** min(note.tries, 16))
                await self._run(self.store.retry, note.id, self.clock() + delay)
                continue
            if failing:
                log.warning("alert target %s: delivering again after %d failed attempts",
                            target.name, failing)
                failing = 0
            await self._run(self.store.done, note.id)
            self.delivered[target.name] += 1
            self.waiting = await self._run(self.store.waiting)
            self._update_empty()
