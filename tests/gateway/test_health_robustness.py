"""The monitor against a restart, its own store's trouble and a receiver down for long: no
false alarm, never the queue held, a bounded outbox, each loss counted (review 5's notes)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.health.alerts import Event
from lantern.agent.health.feed import HealthSink
from lantern.agent.health.metrics import HealthCollector
from lantern.agent.health.notify import body
from lantern.agent.health.service import HealthService
from lantern.agent.health.settings import Lamp, Settings
from lantern.agent.health.store import FILE, HealthStore
from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from tests.helpers.ngsi import batch, records

pytestmark = pytest.mark.alerts

T0 = 1_780_000_000.0
STEP = 300.0
SETTINGS = Settings(default_lamp=Lamp(interval_s=STEP))
NODE = "SL-0001"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def names(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.alert, e.status) for e in events]


async def test_a_restart_raises_no_node_silent_before_the_node_could_send(
        tmp_path: Path) -> None:
    """The gateway was down two hours: silence counts from when it listens again."""
    clock = Clock(T0)
    async with HealthService(SETTINGS, tmp_path, clock=clock) as svc:
        await svc.feed(NODE, T0, {"temperature": 11.0})
    clock.t = T0 + 7200
    async with HealthService(SETTINGS, tmp_path, clock=clock) as svc:
        assert names(await svc.tick(T0 + 7200 + 30)) == []
        assert names(await svc.tick(T0 + 7200 + 3 * STEP + 1)) == [("NodeSilent", "firing")]


def test_a_node_clock_put_right_after_running_ahead_is_judged_again() -> None:
    """Hours ahead (accepted: under a day), then back at the gateway's time: the later packs
    are the node's newest, its lamp judged again."""
    from lantern.agent.health.monitor import Health

    h = Health(SETTINGS)
    now = T0
    h.feed(NODE, now + 5 * 3600, {"lamp_power": 36.0, "illuminance": 0.1}, now)
    events: list[Event] = []
    for i in range(3):
        events += h.feed(NODE, now + STEP * i, {"lamp_power": 0.0, "illuminance": 0.1},
                         now + STEP * i)
    assert ("LampDarkAtNight", "firing") in names(events)
    assert h.feed(NODE, now + 2 * 86400, {"lamp_power": 36.0}, now) == []
    assert h.refused["future"] == 1


async def test_a_damaged_store_is_moved_aside_in_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / FILE).write_bytes(b"\x00torn page" * 500)
    with caplog.at_level(logging.INFO, logger="lantern.health"):
        async with HealthService(SETTINGS, tmp_path) as svc:
            await svc.feed(NODE, T0, {"temperature": 11.0})
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"{FILE}.damaged-")]
    assert len(aside) == 1
    lines = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    store = HealthStore(tmp_path)
    store.open()
    assert store.load()["nodes"][NODE]["last_t"] == T0  # the fresh store works
    store.close()


async def test_a_locked_store_is_not_damage(tmp_path: Path) -> None:
    """Someone holding health.sqlite (an operator's sqlite3 shell) is not a damaged file:
    the start fails with the lock, nothing is moved aside."""
    async with HealthService(SETTINGS, tmp_path):
        pass
    holder = sqlite3.connect(tmp_path / FILE, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    svc = HealthService(SETTINGS, tmp_path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await asyncio.wait_for(svc.__aenter__(), 30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        svc._pool.shutdown(wait=True)
    assert [p.name for p in tmp_path.iterdir() if "damaged" in p.name] == []


def _note(status: str, i: int) -> str:
    start = T0 + i
    return body(Event("SensorNotAnswering", NODE, f"x{i}", status, start,
                      None if status == "firing" else start + 1, start, "absent"))


def test_the_outbox_folds_untried_pairs_and_drops_the_oldest_counted(tmp_path: Path) -> None:
    store = HealthStore(tmp_path, max_outbox=5, fold_from=2)
    store.open()
    store.save({}, [("hook", _note("firing", 0)), ("hook", _note("resolved", 0))])
    assert store.waiting() == {"hook": 2}  # below fold_from: every raise and clear goes out
    store.save({}, [("hook", _note("firing", 1)), ("hook", _note("resolved", 1))])
    assert store.waiting() == {"hook": 2} and store.coalesced["hook"] == 2
    (head,) = store.due("hook", T0 + 10, 1)
    store.sending.add(head.id)  # under way: never dropped
    store.save({}, [("hook", _note("firing", i)) for i in range(10, 20)])
    assert store.waiting() == {"hook": 5} and store.dropped["hook"] == 7
    assert [n.id for n in store.due("hook", T0 + 10, 1)] == [head.id]
    store.close()


async def test_outbox_losses_and_store_errors_show_in_metrics(tmp_path: Path) -> None:
    class Down:
        name = "hook"

        async def send(self, text: str) -> None:
            raise ConnectionRefusedError("down")

    async with HealthService(SETTINGS, tmp_path, [Down()], backoff_s=3600.0) as svc:
        svc.store.fold_from = 0
        names_ = ("temperature", "humidity")
        for i in range(6):
            flags = {f"{n}.q": 256 for n in names_} if i % 2 == 0 else dict.fromkeys(names_, 1.0)
            await svc.feed(NODE, T0 + STEP * i, flags)
        registry = CollectorRegistry()
        registry.register(HealthCollector(svc))
        text = generate_latest(registry).decode()
    assert 'lantern_alert_notifications_dropped_total{reason="coalesced",target="hook"}' in text
    assert "lantern_health_store_errors_total 0.0" in text


async def test_a_failing_health_store_is_one_line_in_the_forward_stage_and_lets_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Disk trouble, not a bug: the forward stage says it in one line, no traceback, and the
    batch is let go after STORE_TRIES (the queue is never held by the monitor)."""
    from lantern.agent.health.feed import STORE_TRIES

    class Queue:  # the queue's side of a delivered batch (agent/queue/store.py)
        path = tmp_path / "queue.sqlite"
        taken: list[str] = []

        async def delivered_to(self, name: str, b: Any, consumers: list[str]) -> None:
            self.taken.append(name)

    def broken(state: dict[str, Any], notes: list[tuple[str, str]]) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    async with HealthService(SETTINGS, tmp_path) as svc:
        feed = HealthSink(svc)
        monkeypatch.setattr(svc.store, "save", broken)
        queue = Queue()
        fwd = Forwarder(queue, feed, Metrics(), asyncio.Event(), 64, 0.0,  # type: ignore[arg-type]
                        0.001, 0.001)
        with caplog.at_level(logging.INFO):
            await fwd._deliver(batch(records(NODE, 0, T0, [("lamp_power", 36.0, "W")])))
        assert queue.taken == ["health"] and svc.skipped["store"] == 1
        assert svc.store_errors == STORE_TRIES
    assert "This is a bug" not in caplog.text and "Traceback" not in caplog.text
    assert caplog.text.count("malformed") == 2  # the forward stage's line, the monitor's


def _config(tmp: Path, body_: str) -> Path:
    p = tmp / "gateway.toml"
    p.write_text('[gateway]\nkeys_file = "keys.toml"\n\n[[links.serial]]\nport = "/dev/ttyUSB0"'
                 f'\n\n[sinks.http]\nurl = "http://platform.example/senml"\n\n{body_}\n')
    return p


def test_a_renewable_contract_is_zero_grams_and_a_negative_one_is_refused(
        tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "[health]\ngrid_g_per_kwh = 0"))
    assert cfg.health is not None and cfg.health.settings.grid_g_per_kwh == 0.0
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="grid_g_per_kwh"):
            load_config(_config(tmp_path, f"[health]\ngrid_g_per_kwh = {bad}"))


def test_every_health_value_exported_is_finite_json(tmp_path: Path) -> None:
    from lantern.agent.health.monitor import Health

    h = Health(SETTINGS)
    for i, w in enumerate((36.0, 1.7e308, -5000.0, float("inf"), -0.5, 36.0)):
        h.feed(NODE, T0 + STEP * i, {"lamp_power": w, "illuminance": 0.1}, T0 + STEP * i)
    assert h.refused["power"] == 3
    json.dumps(h.state(), allow_nan=False)
    (lamp,) = h.lamps(T0 + 6 * STEP)
    assert 0 < lamp.kwh < 1 and lamp.power_w == 36.0
