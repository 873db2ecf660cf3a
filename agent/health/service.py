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
import copy
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .alerts import Event
from .monitor import Health, LampView
from .notify import Target, body, no_url
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
        self.store_errors = 0  # health.sqlite failing (a feed, a check or a delivery)
        self.skipped: Counter[str] = Counter()  # batches the monitor let go, by why (feed.py)
        self.started: float | None = None  # when it started listening (silence counts from)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lantern-health")
        self._wake = {t.name: asyncio.Event() for t in self.targets}
        self._empty = {t.name: asyncio.Event() for t in self.targets}  # set: nothing owed
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # a stop waits for a delivery under way at least this long, and at least as long
        # as its target may take (a webhook's timeout_s): cut short, it would be sent again
        self.stop_timeout_s = 15.0

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
        try:
            self.store.open()
            self.health.restore(self.store.load())
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as e:
            if isinstance(e, sqlite3.DatabaseError) and getattr(
                    e, "sqlite_errorcode", None) not in (sqlite3.SQLITE_CORRUPT,
                                                         sqlite3.SQLITE_NOTADB):
                raise  # locked, read-only, full: the operator's to fix, not damage
            # the monitor's state is derived from readings: start afresh, never refuse to start
            aside = self.store.move_aside()
            log.error("health: %s is damaged (%s); moved aside to %s, the monitor starts "
                      "afresh (open alerts, energy and unsent notifications in it are not "
                      "carried over)", self.store.path, e, aside.name)
            self.health = Health(self.health.s)
            self.store.open()
        self.started = self.clock()
        self.health.listening(self.started)
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
            wait = max([self.stop_timeout_s, *(float(getattr(t, "timeout_s", 0.0)) + 1.0
                                               for t in self.targets)])
            _, late = await asyncio.wait(self._tasks, timeout=wait)
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
        now = self.clock()
        with self._atomic():
            events = []
            for node, t, readings in packs:
                events += self.health.feed(node, t, readings, now)
            self._save(events)
        return events

    def _tick(self, now: float) -> list[Event]:
        with self._atomic():
            events = self.health.tick(now)
            if events:
                self._save(events)
        return events

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """The monitor changes only with its save: a save that fails leaves it as it was,
        so the same packs fed again (the forward stage retries) decide the same events."""
        s = self.health.s
        before = copy.deepcopy(self.health, {id(s): s, id(self.health.known): self.health.known})
        try:
            yield
        except BaseException as e:
            self.health = before
            if isinstance(e, sqlite3.Error):
                self.store_errors += 1
            raise

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

    def _take(self, target: str, now: float) -> Any:
        """The target's next notification due (None: none), marked as under way so that a
        feed meanwhile never folds or drops it (one thread runs both: no gap between)."""
        head = self.store.due(target, now, 1)
        if not head:
            return None
        self.store.sending.add(head[0].id)
        return head[0]

    def _settle(self, note_id: int, retry_at: float | None) -> None:
        """A notification the target took (done) or did not (retry at `retry_at`)."""
        if retry_at is None:
            self.store.done(note_id)
        else:
            self.store.retry(note_id, retry_at)
        self.store.sending.discard(note_id)
        self.waiting = self.store.waiting()

    async def _store(self, target: Target, fn: Callable[..., Any], *args: Any) -> Any:
        """A store call of the delivery, tried again every second until it works: an error
        (health.sqlite locked by someone, a full disk) ends no delivery and sends nothing
        twice. Said once per episode; counted each time."""
        failures = 0
        while True:
            try:
                result = await self._run(fn, *args)
            except (sqlite3.Error, OSError) as e:
                self.store_errors += 1
                failures += 1
                if failures == 1:
                    log.error("alert target %s: health store %s: %s; delivery waits and tries "
                              "again every second", target.name, self.store.path, e)
                if self._stopping and failures > 3:
                    raise
                await asyncio.sleep(1.0)
                continue
            if failures:
                log.info("alert target %s: health store works again after %d failures",
                         target.name, failures)
            return result

    async def _deliver(self, target: Target) -> None:
        wake = self._wake[target.name]
        failing = 0
        while not self._stopping:
            wake.clear()
            now = self.clock()
            note = await self._store(target, self._take, target.name, now)
            if note is None:
                nxt = await self._store(target, self.store.next_at, target.name)
                wait = None if nxt is None else max(0.0, nxt - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
                continue
            try:
                await target.send(note.body)
            except Exception as e:
                self.failed[target.name] += 1
                if failing == 0:
                    log.warning("alert target %s: delivery failed (%s); kept and tried again "
                                "with backoff, nothing after it goes first", target.name,
                                no_url(str(e)))
                failing += 1
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** min(note.tries, 16))
                await self._store(target, self._settle, note.id, self.clock() + delay)
                continue
            if failing:
                log.warning("alert target %s: delivering again after %d failed attempts",
                            target.name, failing)
                failing = 0
            await self._store(target, self._settle, note.id, None)
            self.delivered[target.name] += 1
            self._update_empty()
