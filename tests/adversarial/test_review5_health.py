"""Fifth review: the streetlight-health capability (issue 18) attacked as a node key holder
sending hostile-but-authentic readings, a broken or hostile webhook receiver, and a careless
operator would. Each finding is the test that fails against the tree it was written on,
marked xfail(strict) until its fix; the fixer removes the mark.

Readings travel the real way where it matters: authentic frames under a test key through
ingest, the SQLite queue and the forward stage into the monitor (`HealthSink`), as
agent/gateway.py wires them — the wire accepts every value used here (finite, within years
1 to 9999, any name under the node's base name).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest

from lantern.agent import ngsi
from lantern.agent.api import Api, GatewayView
from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.health.feed import NAME as HEALTH
from lantern.agent.health.feed import HealthSink
from lantern.agent.health.metrics import HealthCollector
from lantern.agent.health.monitor import Health
from lantern.agent.health.notify import Webhook
from lantern.agent.health.service import HealthService
from lantern.agent.health.settings import Settings
from lantern.agent.health.streetlight import entity
from lantern.agent.ingest import Ingest
from lantern.agent.metrics import Metrics
from lantern.agent.plugins import SinkContext
from lantern.agent.plugins import sink as sink_plugin
from lantern.agent.protocol import TIME_MIN
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.store import Store
from lantern.tools.street.ngsi_broker import NgsiBroker
from tests.adversarial.gateway_harness import K1, NODE, FakeLink, frame, until
from tests.adversarial.gateway_harness import Sink as RecordingSink
from tests.helpers import sdm
from tests.helpers.api import FakeForwarder
from tests.helpers.api import FakeLink as ApiLink
from tests.helpers.ngsi import batch, records

pytestmark = pytest.mark.alerts

# sample times near the real clock (an hour ago), so that a fix judging a reading's time
# against the gateway's clock sees these as ordinary
T = float(int(time.time()) - 3600)
DARK = {"lamp_power": 0.0, "illuminance": 0.05}  # a broken lamp at night
LIT = {"lamp_power": 36.0, "illuminance": 0.05}


def pack(t: float, readings: dict[str, float]) -> bytes:
    """One pack as a node seals it (protocol v2: names implied under the kid's base name)."""
    recs: list[dict[int, Any]] = []
    for i, (name, v) in enumerate(readings.items()):
        r: dict[int, Any] = {0: name, 2: v}
        if i == 0:
            r[-3] = t
        recs.append(r)
    return bytes(cbor2.dumps(recs, canonical=True))


@dataclass
class Street:
    """One node's line into a gateway: ingest → queue → a sink and the health monitor."""

    ingest: Ingest
    store: Store
    sink: RecordingSink
    feed: HealthSink
    svc: HealthService
    tasks: list[asyncio.Task[None]]
    seq: int = 0

    async def send(self, t: float, readings: dict[str, float]) -> None:
        """One authentic pack, waited for until the monitor (and the sink) have it."""
        self.seq += 1
        before = self.feed.fed + self.feed.skipped
        self.ingest.on_data(FakeLink(), frame(self.seq, pack(t, readings)))
        await until(lambda: self.feed.fed + self.feed.skipped > before,
                    f"the monitor to take pack {self.seq}", *self.tasks)


@contextlib.asynccontextmanager
async def street(tmp: Path, settings: Settings | None = None,
                 targets: tuple[Any, ...] = ()) -> AsyncIterator[Street]:
    async with Store(tmp / "queue.sqlite") as store, \
            HealthService(settings or Settings(), tmp, list(targets)) as svc:
        metrics = Metrics()
        ingest = Ingest(store, {NODE.encode(): K1}, metrics)
        await ingest.start()
        consumers = ["http", HEALTH]
        ev_sink, ev_health = asyncio.Event(), asyncio.Event()
        ingest.listeners += [ev_sink, ev_health]
        sink = RecordingSink()
        feed = HealthSink(svc)
        fwd = [Forwarder(store, sink, metrics, ev_sink, 64, 0.0, all_sinks=consumers),
               Forwarder(store, feed, Metrics(), ev_health, 64, 0.0, 0.01, 0.05,
                         all_sinks=consumers)]
        tasks = [asyncio.create_task(ingest.run(), name="ingest"),
                 *(asyncio.create_task(f.run(), name=f"forward-{f.sink.name}") for f in fwd)]
        try:
            yield Street(ingest, store, sink, feed, svc, tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class Recorder:
    """An alert target that takes every notification (the receiver's side of a webhook)."""

    def __init__(self, name: str = "rec") -> None:
        self.name = name
        self.got: list[dict[str, Any]] = []

    async def send(self, body: str) -> None:
        self.got.append(json.loads(body))

    def alerts(self) -> list[tuple[str, str, str]]:
        return [(n["status"], n["alerts"][0]["labels"]["alertname"],
                 n["alerts"][0]["labels"].get("measurement", "")) for n in self.got]


class Down:
    """A webhook receiver that is down (for days): every attempt fails."""

    name = "hook"

    async def send(self, body: str) -> None:
        raise ConnectionRefusedError("receiver down")


def strict_json(text: str | bytes) -> Any:
    """JSON as RFC 8259 and every browser's JSON.parse read it: no NaN, no Infinity."""
    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------- peer-controlled values


async def test_a_reading_from_the_far_future_blinds_the_monitor_to_its_node(
        tmp_path: Path) -> None:
    """Attack: the node (a key holder, or a node whose clock jumped) seals one pack ten years
    ahead; afterwards its lamp breaks at night and later the node goes silent.
    Expected: a reading far ahead of the gateway's clock is not taken as the node's newest
    (counted, or judged at the gateway's time): the dark lamp is raised after 3 samples and
    the silence after 3 intervals.
    Instead: health/monitor.py:71-76 keeps the future time as `last_t`, so every later pack is
    "not newest": no lamp or sensor verdict ever again, `tick` computes a negative silence
    (monitor.py:96) and NodeSilent never fires; the state is durable, a restart keeps it."""
    async with street(tmp_path) as st:
        await st.send(T + 10 * 365 * 86400, LIT)
        for i in range(4):
            await st.send(T + 300 * i, DARK)
        await st.svc.tick(T + 300 * 3 + 3600)  # an hour after its last pack
        cond = st.svc.health.conditions
        assert cond.is_open("LampDarkAtNight", NODE), sorted(cond.open)
        assert cond.is_open("NodeSilent", NODE), sorted(cond.open)


async def test_a_reading_from_year_one_does_not_count_millions_of_unmeasured_hours(
        tmp_path: Path) -> None:
    """Attack: the node's first pack is sealed at 0001-01-01 (TIME_MIN: the wire takes it),
    then it reports normally.
    Expected: the unmeasured time of a lamp is what the gateway could have measured (at most
    the time since it first heard the node); /metrics' lantern_lamp_unmeasured_hours stays
    plausible.
    Instead: energy.py:47-49 counts the whole span since year 1 as a gap: about 17.7 million
    hours unmeasured, on /metrics, /api/health and the street totals, forever."""
    async with street(tmp_path) as st:
        await st.send(float(TIME_MIN), LIT)
        await st.send(T, LIT)
        await st.send(T + 300, LIT)
        (lamp,) = st.svc.lamps(T + 600)
        assert lamp.unmeasured_h < 24 * 366, lamp.unmeasured_h


async def test_a_negative_lamp_power_never_takes_energy_away(tmp_path: Path) -> None:
    """Attack: the lamp's meter (or a key holder) reports -5 kW for half an hour after the lamp
    burned an hour at its 36 W.
    Expected: energy only grows (a power below zero, or beyond what the lamp's rating allows,
    is counted and not integrated): lifetimePowerConsumption, lantern_lamp_energy_kwh and
    lantern_lamp_co2e_kg never go down — they are counters, and the city's kWh/CO2e report.
    Instead: energy.py:51-52 integrates it: the lamp's lifetime energy goes negative, so do
    its CO2e and the street's totals, and the Prometheus counters decrease."""
    async with street(tmp_path) as st:
        for i in range(13):
            await st.send(T + 300 * i, LIT)
        (before,) = st.svc.lamps()
        for i in range(13, 20):
            await st.send(T + 300 * i, {"lamp_power": -5000.0, "illuminance": 0.05})
        (after,) = st.svc.lamps()
    assert before.kwh > 0
    assert after.kwh >= before.kwh and after.co2e_kg >= 0, (before.kwh, after.kwh)


async def test_an_absurd_lamp_power_keeps_api_health_valid_json(tmp_path: Path) -> None:
    """Attack: two packs with lamp_power 1.7e308 W (a finite double: the wire takes it).
    Expected: /api/health stays JSON a browser can parse, with finite energies.
    Instead: energy.py:51 overflows to inf, and web.json_response writes `Infinity`: the
    status page's JSON.parse fails on every refresh ("gateway not answering") — for every
    node, not only the hostile one — and the inf is durable in health.sqlite."""
    async with street(tmp_path) as st:
        await st.send(T, {"lamp_power": 1.7e308, "illuminance": 0.05})
        await st.send(T + 300, {"lamp_power": 1.7e308, "illuminance": 0.05})
        view = GatewayView(Metrics(), st.store, [NODE], [ApiLink("serial:/dev/ttyUSB0")],
                           [FakeForwarder()], health=st.svc)
        async with TestClient(TestServer(Api(view, None).app)) as client:
            r = await client.get("/api/health")
            text = await r.text()
    assert r.status == 200
    body = strict_json(text)  # raises: "Infinity is not JSON"
    assert all(n["lamp"] is None or n["lamp"]["kwh"] < 1e6 for n in body["nodes"])


async def test_an_absurd_lamp_power_does_not_hold_the_ngsi_ld_sink(tmp_path: Path) -> None:
    """Attack: as above, two packs of 1.7e308 W from one node.
    Expected: the Streetlight entity the NGSI-LD sink sends is JSON a broker accepts
    (a finite lifetimePowerConsumption), so the sink delivers.
    Instead: health/streetlight.py:46 puts round(inf, 4) in it and sinks/ngsi_ld.py:129's
    json.dumps writes `Infinity`; a broker that parses JSON as RFC 8259 says 400 to every
    batch holding that lamp's readings, forever (the value is durable): the sink retries,
    the queue keeps every frame behind it and fills."""
    refused: list[str] = []

    async def upsert(request: web.Request) -> web.Response:
        try:
            strict_json(await request.read())
        except ValueError as e:
            refused.append(str(e))
            return web.json_response({"title": "invalid JSON", "detail": str(e)}, status=400)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/ngsi-ld/v1/entityOperations/upsert", upsert)
    async with TestServer(app) as server, street(tmp_path) as st:
        await st.send(T, {"lamp_power": 1.7e308, "illuminance": 0.05})
        await st.send(T + 300, {"lamp_power": 1.7e308, "illuminance": 0.05})
        cfg = load_config(_config(tmp_path, f'[health]\n\n[sinks.ngsi_ld]\n'
                                                f'url = "{server.make_url("/")}"\n'))
        ctx = SinkContext(cfg.nodes, tmp_path, {}, st.svc)
        async with sink_plugin("ngsi_ld").open(cfg.sinks["ngsi_ld"], ctx) as sink:
            recs = records(NODE, 3, T + 300, [("lamp_power", 1.7e308, "W"),
                                              ("illuminance", 0.05, "lx")])
            await sink.send(batch(recs))
    assert refused == []


# ------------------------------------------------------ state that grows under hostile traffic


async def test_reading_names_nobody_expects_do_not_open_alerts_without_bound(
        tmp_path: Path) -> None:
    """Attack: authentic packs (five, at the frame's 1 KiB limit) holding 300 flags
    `x<i>.q` = 256 (absent) for names no sensor has, one with markup in it.
    Expected: only the node's measurements are judged (or a node has a small bound of
    conditions, the rest counted): a handful of conditions, notifications and series at most.
    Instead: sensors.py:42-46 raises SensorNotAnswering for every `<name>.q` with the absent
    bit, confirm 1: 300 alerts raised at once, 300 notifications owed to the webhook, 300
    `lantern_health_condition{measurement=...}` series (attacker-chosen label values), 300
    entries in /api/health and in health.sqlite's state, rewritten whole on every feed; a
    key holder keeps adding more with every pack."""
    rec = Recorder()
    async with street(tmp_path, targets=(rec,)) as st:
        for k in range(5):
            flags = {f"x{k}_{i}.q": 256.0 for i in range(60)}
            if k == 0:
                flags["<svg onload=alert(1)>.q"] = 256.0
            await st.send(T + 300 * k, {"temperature": 11.5, **flags})
        registry = CollectorRegistry()
        registry.register(HealthCollector(st.svc))
        series = [line for line in generate_latest(registry).decode().splitlines()
                  if line.startswith("lantern_health_condition{")]
        opened = [k for k in st.svc.health.conditions.open if k[1] == NODE]
        owed = st.svc.waiting.get(rec.name, 0) + len(rec.got)
    assert len(opened) <= 32, f"{len(opened)} conditions open for one node"
    assert len(series) <= 32, f"{len(series)} lantern_health_condition series"
    assert owed <= 32, f"{owed} notifications owed"


def test_reading_names_nobody_expects_do_not_grow_the_monitor() -> None:
    """Attack: a key holder sends packs whose readings carry fresh names each time (values
    only, no flags): 200 packs of 500 new names.
    Expected: the monitor's memory for one node stays bounded (names it does not judge are
    not remembered, or the map is capped).
    Instead: sensors.py:68-70 keeps (value, run) per name in `SensorWatch._runs` for every
    name ever seen, judged or not: 100,000 entries, several MiB, for as long as the gateway
    runs. (The resolved names reach the monitor exactly as here: feed.py `packs`.)"""
    health = Health(Settings())
    health.feed(NODE, T, {"temperature": 11.5})
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for k in range(200):
            health.feed(NODE, T + 300 * (k + 1), {f"n{k}_{i}": 1.0 for i in range(500)})
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 1 << 20, f"the monitor grew by {grown / 1048576:.1f} MiB"


async def test_the_alert_outbox_is_bounded_while_the_webhook_is_down(tmp_path: Path) -> None:
    """Attack: the webhook receiver is down (for days), and a key holder makes its sensors
    flap: every other pack flags temperature, humidity, pressure and co2 absent (256), the
    packs between carry their values — each pack raises or clears four alerts (confirm 1 for
    an absent sensor, clear 1 on a value). 1,000 packs.
    Expected: the outbox is bounded (docs/DESIGN: bounded disk, an explicit counted policy
    when full: a cap with the oldest dropped and counted, or a flapping alert folded).
    Instead: store.py:95 appends every notification, with no cap anywhere: 4,000 rows owed
    after 1,000 packs, and health.sqlite grows as long as the attack and the outage last."""
    names = ("temperature", "humidity", "pressure", "co2")
    values = {"temperature": 11.5, "humidity": 60.0, "pressure": 101000.0, "co2": 420.0}
    packs = []
    for i in range(1000):
        readings = {f"{n}.q": 256 for n in names} if i % 2 == 0 else values
        packs.append((NODE, T + 60 * i, dict(readings)))
    async with HealthService(Settings(), tmp_path, [Down()], backoff_s=3600.0) as svc:
        for i in range(0, len(packs), 100):
            await svc.feed_many(packs[i:i + 100])
        owed = svc.waiting.get("hook", 0)
        raised = sum(svc.health.conditions.raised.values())
    assert raised >= 1000  # the flapping is real: each raise and each clear is owed
    assert owed <= 1000, f"{owed} notifications in the outbox, no cap"


# ------------------------------------------------------------ the monitor and its own store


async def test_a_store_failure_during_a_feed_does_not_lose_the_alert(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack (a careless operator, or a full SD card): health.sqlite refuses one commit —
    `database is locked` while someone holds it open in the sqlite3 shell — exactly when a
    lamp's third dark sample arrives. The forward stage keeps the batch and tries it again,
    as feed.py says it should.
    Expected: the retry raises the alert and the webhook receives LampDarkAtNight firing.
    Instead: service.py:119-123 changes the monitor in memory before the save: the condition
    is already open when the save fails, so the retried batch (now "not newest") raises
    nothing, the next save persists the open condition without its notification, and the
    receiver never hears of the dark lamp (and its energy sample is counted out of order)."""
    rec = Recorder()
    async with HealthService(Settings(), tmp_path, [rec]) as svc:
        feed = HealthSink(svc)
        dark = [batch(records(NODE, i, T + 300 * i, [("lamp_power", 0.0, "W"),
                                                      ("illuminance", 0.05, "lx")]))
                for i in range(3)]
        await feed.send(dark[0])
        await feed.send(dark[1])
        real_save = svc.store.save
        calls = 0

        def locked_once(state: dict[str, Any], notes: list[tuple[str, str]]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise sqlite3.OperationalError("database is locked")
            real_save(state, notes)

        monkeypatch.setattr(svc.store, "save", locked_once)
        with pytest.raises(sqlite3.OperationalError):
            await feed.send(dark[2])
        await feed.send(dark[2])  # the forward stage's retry of the kept batch
        await asyncio.wait_for(svc.drained(rec.name), 5)
        assert svc.health.conditions.is_open("LampDarkAtNight", NODE)
    assert ("firing", "LampDarkAtNight", "") in rec.alerts(), rec.alerts()


class LockingTarget(Recorder):
    """A receiver that takes the first notification; meanwhile an operator opens health.sqlite
    in the sqlite3 shell and runs BEGIN IMMEDIATE (holds it ~6 s), as one does to look."""

    def __init__(self, db: Path) -> None:
        super().__init__()
        self.db = db
        self.operator: sqlite3.Connection | None = None

    async def send(self, body: str) -> None:
        await super().send(body)
        if self.operator is None:
            self.operator = sqlite3.connect(self.db, isolation_level=None)
            self.operator.execute("BEGIN IMMEDIATE")


async def test_one_store_error_does_not_end_alert_delivery(tmp_path: Path) -> None:
    """Attack (a careless operator): while a notification is being delivered, someone holds a
    write lock on health.sqlite for a few seconds (BEGIN IMMEDIATE in the sqlite3 shell).
    Expected: delivery goes on once the lock is gone: the delivered notification leaves the
    outbox, and the next alert reaches the receiver.
    Instead: service.py:179 (`store.done`) raises `database is locked` after sqlite's 5-s busy
    wait, nothing in `_deliver` catches it, and the task ends silently (nobody awaits it
    until the stop): no alert is delivered again until a restart — which then sends the
    first one a second time."""
    target = LockingTarget(tmp_path / "health.sqlite")
    async with HealthService(Settings(), tmp_path, [target]) as svc:
        for i in range(3):
            await svc.feed(NODE, T + 300 * i, DARK)
        deadline = time.monotonic() + 10
        while target.operator is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(6)  # past sqlite's busy wait (5 s)
        assert target.operator is not None
        target.operator.execute("ROLLBACK")
        target.operator.close()
        for i in range(3, 6):
            await svc.feed(NODE, T + 300 * i, LIT)  # the lamp burns again: resolved
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(svc.drained(target.name), 5)
        task_ended = [t for t in svc._tasks if t.done()]
    assert not task_ended, [t.exception() for t in task_ended if not t.cancelled()]
    assert target.alerts() == [("firing", "LampDarkAtNight", ""),
                               ("resolved", "LampDarkAtNight", "")]


async def test_a_broken_health_store_does_not_hold_the_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack (a power cut on the SD card): health.sqlite's page is damaged, every commit
    fails with `database disk image is malformed`; the queue's own file is fine and the sink
    delivers.
    Expected (the brief: the queue must never be held up by the monitor): frames the sinks
    have leave the queue; the monitor's loss is counted and visible.
    Instead: feed.py:63-64 re-raises every sqlite3.Error, the forward stage retries the batch
    forever, and since a frame leaves only once every consumer has it (gateway.py:332),
    nothing is ever deleted: the queue grows to its cap, then evicts readings or pauses
    intake (the nodes' data lost or stuck) for a fault in derived state."""

    def malformed(state: dict[str, Any], notes: list[tuple[str, str]]) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    async with street(tmp_path) as st:
        monkeypatch.setattr(st.svc.store, "save", malformed)
        for i in range(3):
            st.seq += 1
            st.ingest.on_data(FakeLink(), frame(st.seq, pack(T + 300 * i, LIT)))
        await until(lambda: len(st.sink.rids) >= 6, "the sink to deliver", *st.tasks)
        deadline = time.monotonic() + 3
        left = -1
        while time.monotonic() < deadline:
            left = (await st.store.overview())["queue_readings"]
            if left == 0:
                break
            await asyncio.sleep(0.1)
    assert left == 0, f"{left} readings delivered upstream still held in the queue"


async def test_a_damaged_health_store_does_not_stop_the_gateway(tmp_path: Path) -> None:
    """Attack (a power cut on an SD card): health.sqlite is damaged — here, not a database.
    Expected: the gateway starts and forwards readings; the monitor starts afresh (the damaged
    file moved aside, said once in the log), since its state is derived from readings.
    Instead: service.py:69-72 raises sqlite3.DatabaseError, which gateway.py:233-237
    (`_open_health`) turns into a ConfigError: the whole gateway refuses to start, and no
    node's readings are taken or forwarded until someone deletes the file by hand."""
    (tmp_path / "health.sqlite").write_bytes(b"not a database, a torn page" * 200)
    async with HealthService(Settings(), tmp_path) as svc:
        await svc.feed(NODE, T, LIT)
        assert svc.lamps()


async def test_the_monitor_failing_shows_in_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: health.sqlite refuses commits (disk full) — the monitor stops judging.
    Expected: /metrics says so (a counter of the monitor's failed feeds or store errors, which
    a shipped rule can alert on), as it says for the queue (lantern_store_errors_total).
    Instead: the forward stage that feeds the monitor is given a Metrics() of its own
    (gateway.py:345, `_serve`), so its store errors are counted nowhere; HealthSink.skipped,
    Health.ignored and the energy meters' out_of_order are not exported either: /metrics
    after three failed feeds is byte for byte that of three good ones (the monitor even
    advanced its energy in memory, service.py:119-123), and no rule in lantern-alerts.yml can
    fire."""

    def full(state: dict[str, Any], notes: list[tuple[str, str]]) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    async def scrape(state: Path, failing: bool) -> str:
        async with HealthService(Settings(), state) as svc:
            feed = HealthSink(svc)
            await feed.send(batch(records(NODE, 0, T, [("lamp_power", 36.0, "W")])))
            if failing:
                monkeypatch.setattr(svc.store, "save", full)
            for i in range(1, 4):
                b = batch(records(NODE, i, T + 300 * i, [("lamp_power", 36.0, "W")]))
                if failing:
                    with pytest.raises(sqlite3.OperationalError):
                        await feed.send(b)
                else:
                    await feed.send(b)
            registry = CollectorRegistry()
            registry.register(HealthCollector(svc))
            return generate_latest(registry).decode()

    (tmp_path / "ok").mkdir()
    (tmp_path / "full").mkdir()
    healthy = await scrape(tmp_path / "ok", failing=False)
    failed = await scrape(tmp_path / "full", failing=True)
    assert failed != healthy, "/metrics after three failed feeds is that of three good ones"


def test_a_draining_backlog_does_not_make_node_silent_flap() -> None:
    """Attack: none needed — a node out of reach for six hours comes back and its outbox
    (72 packs of 5 min) drains slowly, six packs per 30-s silence check (a BLE drain).
    Expected: NodeSilent raised once for the outage and cleared once (issue 18: "each health
    condition is raised once, cleared once").
    Instead: monitor.py:75 clears it on the first old pack, and tick (monitor.py:96) compares
    the gateway's clock with the newest *sample* time, still hours old, and raises it again:
    a critical alert fires and resolves every 30 s until the backlog is through — 12 raises
    and 12 clears here, each a webhook notification."""
    health = Health(Settings())
    health.feed(NODE, T, {"temperature": 11.0})
    now = T + 6 * 3600
    events = health.tick(now)
    t = T
    for k in range(72 // 6):
        for j in range(6):
            t += 300
            events += health.feed(NODE, t, {"temperature": 11.0 + (k * 6 + j) % 7 / 10})
        now += 30
        events += health.tick(now)
    silent = [e.status for e in events if e.alert == "NodeSilent"]
    assert silent == ["firing", "resolved"], silent


# ------------------------------------------------------------------ delivery and secrets


class SlowReceiver:
    """A webhook receiver that takes each notification and answers 2xx after `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.got: list[dict[str, Any]] = []

    async def hook(self, request: web.Request) -> web.Response:
        self.got.append(json.loads(await request.read()))
        await asyncio.sleep(self.delay_s)
        return web.Response(status=200)


async def test_a_slow_receiver_does_not_get_an_alert_twice_across_a_stop(
        tmp_path: Path) -> None:
    """Attack: a slow receiver (it takes the notification, answers 2xx after 20 s) and an
    operator who set `[health.webhook] timeout_s = 30` (accepted: any positive number); the
    gateway is stopped (SIGTERM) while that delivery is under way, then started again.
    Expected (docs/alerts.md): "a graceful stop lets a delivery under way finish and leave
    the outbox, so a restart sends nothing twice".
    Instead: HealthService waits `stop_timeout_s` = 15 s (service.py:56, not derived from the
    webhook's timeout: gateway.py:231 never passes it) and cancels the delivery; the
    notification stays in the outbox and the restart sends it again. Played here at 1/20
    scale: stop after 0.75 s, answer after 1 s, timeout 1.5 s (the same ratios)."""
    slow = SlowReceiver(1.0)
    app = web.Application()
    app.router.add_post("/hook", slow.hook)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        hook = Webhook(str(server.make_url("/hook")), session, timeout_s=1.5)
        svc = HealthService(Settings(), tmp_path, [hook])
        svc.stop_timeout_s = 0.75  # 15 s against a 30-s webhook timeout, scaled by 1/20
        async with svc:
            for i in range(3):
                await svc.feed(NODE, T + 300 * i, DARK)
            await until(lambda: len(slow.got) == 1, "the receiver to get the alert")
        slow.delay_s = 0.0
        async with HealthService(Settings(), tmp_path, [hook]) as again:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(again.drained(hook.name), 3)
    statuses = [n["status"] for n in slow.got]
    assert statuses == ["firing"], statuses




async def test_a_broken_receiver_never_gets_the_webhook_secret_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Attack: the receiver (broken, or a proxy in front of it) answers a malformed status
    line; the webhook URL carries its secret in the query, percent-encoded as URLs are
    (`?key=s%7Ecret`).
    Expected: the log shows the URL without its query, as docs/alerts.md promises.
    Instead: aiohttp's ClientResponseError names the URL as yarl normalised it (`s~cret`),
    notify.py:92's str.replace looks for the configured spelling, misses it, and
    service.py:169 logs the secret at WARNING."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 20x NOPE\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            hook = Webhook(f"http://127.0.0.1:{port}/hook?key=s%7Ecret", session)
            async with HealthService(Settings(), tmp_path, [hook], backoff_s=60.0) as svc:
                with caplog.at_level(logging.INFO, logger="lantern.health"):
                    for i in range(3):
                        await svc.feed(NODE, T + 300 * i, DARK)
                    await until(lambda: svc.failed["webhook"] > 0, "a failed delivery")
    finally:
        server.close()
        await server.wait_closed()
    assert "delivery failed" in caplog.text
    assert "s~cret" not in caplog.text and "s%7Ecret" not in caplog.text, caplog.text


# ------------------------------------------------------------------------------- config


def _config(tmp: Path, body: str) -> Path:
    """A gateway config with one link, an HTTP sink, and `body` ([health] and the rest)."""
    p = tmp / "gateway.toml"
    p.write_text(f"""\
[gateway]
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB0"

[sinks.http]
url = "http://platform.example/senml"

{body}""")
    return p


@pytest.mark.parametrize("text, key", [
    ("[health]\nbattery_clear_v = 3.3", "battery_clear_v"),  # clears below where it raises
    ("[health]\noutbox_clear = 20", "outbox_clear"),  # clears above outbox_high (12)
    ("[health]\non_fraction = 1.5", "on_fraction"),  # a lamp at its rating is never "on"
    ("[health]\nrating_tolerance = 5", "rating_tolerance"),  # LampPowerOffRating never fires
    ("[health]\ncycling_switches = 1", "cycling_switches"),  # every dusk is "cycling"
    ("[health]\nmax_gap_intervals = 0.5", "max_gap_intervals"),  # no energy is ever measured
    ("[health]\nsilent_intervals = 0.5", "silent_intervals"),  # silent between every two packs
    ('[health.lamps."SL-0042 "]\nrating_w = 60', "health.lamps"),  # a typo'd node id
], ids=["battery_clear_below_low", "outbox_clear_above_high", "on_fraction_above_1",
        "rating_tolerance_5", "cycling_switches_1", "max_gap_below_1", "silent_below_1",
        "lamp_id_typo"])
def test_health_thresholds_that_make_no_sense_are_refused(tmp_path: Path, text: str,
                                                          key: str) -> None:
    """Attack (a careless operator): a threshold inverted against its partner, a fraction of
    the rating above 1, a tolerance that accepts any lamp, one switch counted as cycling, a
    gap limit or a silence below one interval, or a lamp table for a node id with a typo
    (trailing space) that no key has.
    Expected: check-config refuses it naming file, line and key (docs/configuration.md:
    "thresholds out of order" are refused), as it does for on_fraction <= off_fraction.
    Instead: settings.py:88-94 checks only positivity and two pairs; these load silently,
    and the street is judged wrongly (hysteresis inverted, a lamp at its rating shown "low",
    no off-rating alert ever, a healthy lamp cycling every dusk, every interval counted as
    unmeasured and no kWh at all, NodeSilent raised between every two packs, pole 42 on
    defaults)."""
    with pytest.raises(ConfigError) as exc:
        load_config(_config(tmp_path, text + "\n"))
    assert key in str(exc.value)


# --------------------------------------------------------------------- Streetlight entity


def test_the_streetlight_entity_of_a_pole_without_location_validates() -> None:
    """Attack (a careless operator): [nodes."SL-0001"] has no `location` (it is optional in
    the config) — or the node is not in [nodes] at all.
    Expected: what the NGSI-LD sink sends validates against the official Streetlight schema
    (the issue's "Must show"), or the gateway refuses the config / leaves the entity out and
    says so.
    Instead: health/streetlight.py:55-57 leaves `location` out, and the schema requires it:
    every such lamp's entity fails validation at a validating broker."""
    health = Health(Settings())
    for i in range(3):
        health.feed(NODE, T + 300 * i, DARK)
    (lamp,) = health.lamps(T + 600)
    kv = ngsi.key_values(entity(lamp, ngsi.NodeMeta(pole="1"), T + 600))
    assert sdm.errors("Streetlight", kv) == [], kv


async def test_the_broker_never_holds_a_streetlight_without_status(tmp_path: Path) -> None:
    """Attack: none needed — the NGSI-LD sink and the monitor read the queue each at its own
    pace (docs/alerts.md); at start-up with a backlog, or while the monitor is behind (its
    store failing, a batch skipped), the sink sends a lamp's readings before the monitor has
    judged them.
    Expected: the broker's Streetlight always carries a `status` (the model requires it): the
    readings' entity says one while the monitor has no verdict, or the sink waits for it.
    Instead: with [health] the readings' entity carries no status (ngsi.py:176-177,
    lamp_state=False) and sinks/ngsi_ld.py:106-107 adds the monitor's entity only for lamps
    it has seen: the broker creates the Streetlight without `status` — invalid."""
    broker = NgsiBroker()
    await broker.start()
    try:
        cfg = load_config(_config(tmp_path, f"""\
[health]

[sinks.ngsi_ld]
url = "{broker.url}"

[nodes."{NODE}"]
pole = "1"
location = [52.3702, 4.8952]
"""))
        async with HealthService(cfg.health.settings, tmp_path) as svc:  # type: ignore[union-attr]
            ctx = SinkContext(cfg.nodes, tmp_path, {}, svc)
            async with sink_plugin("ngsi_ld").open(cfg.sinks["ngsi_ld"], ctx) as sink:
                await sink.send(batch(records(NODE, 0, T, [("lamp_power", 36.0, "W"),
                                                           ("illuminance", 0.05, "lx")])))
    finally:
        await broker.stop()
    kv = ngsi.key_values(broker.entities["urn:ngsi-ld:Streetlight:lantern:pole-1"])
    assert sdm.errors("Streetlight", kv) == [], kv


def test_reading_names_with_markup_reach_the_page_only_as_text() -> None:
    """Sound (kept as a guard): a measurement name with markup, authentic and alerted on,
    reaches the street view's alerts list and SVG only through textContent/setAttribute —
    status.js builds every element with createElement(NS) and never assigns HTML."""
    js = (Path(__file__).parents[2] / "agent" / "status" / "status.js").read_text()
    for sink_api in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                     "DOMParser", "createContextualFragment"):
        assert sink_api not in js, sink_api
