"""The health monitor in the gateway: its [health] table, the queue's frames into it, its
webhook's refusal of redirects, and its Streetlight entities through the real NGSI-LD sink."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from lantern.agent import ngsi
from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.health.feed import HealthSink, packs
from lantern.agent.health.notify import DeliveryError, Webhook
from lantern.agent.health.service import HealthService
from lantern.agent.health.settings import Lamp, Settings
from lantern.agent.plugins import SinkContext
from lantern.agent.plugins import sink as sink_plugin
from lantern.tools.street.ngsi_broker import NgsiBroker
from tests.helpers import sdm
from tests.helpers.ngsi import NODES, T0, batch, records

pytestmark = pytest.mark.alerts

BASE = """\
[gateway]
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB0"

[sinks.http]
url = "http://platform.example/senml"
"""

HEALTH = """
[health]
grid_g_per_kwh = 350
confirm = 2

[health.lamp]
rating_w = 60
dim_levels = [0.5]

[health.lamps."SL-0042"]
rating_w = 36

[health.webhook]
url = "https://ops.example/hooks/lantern?key=query-secret"
timeout_s = 5
"""


def load(tmp_path: Path, text: str) -> object:
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return load_config(p)


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    return str(exc.value)


def test_health_table_parsed(tmp_path: Path) -> None:
    cfg = load(tmp_path, BASE + HEALTH)
    h = cfg.health  # type: ignore[attr-defined]
    assert h.settings.grid_g_per_kwh == 350.0 and h.settings.confirm == 2
    assert h.settings.default_lamp == Lamp(60.0, (0.5,), 300.0)
    assert h.settings.lamp("SL-0042") == Lamp(36.0, (0.5,), 300.0)  # the default's levels
    assert (h.webhook_url, h.webhook_timeout_s, h.mqtt_topic) == (
        "https://ops.example/hooks/lantern?key=query-secret", 5.0, None)
    line = h.describe()  # check-config's line
    assert "350 gCO2e/kWh" in line and "webhook https://ops.example/hooks/lantern" in line
    assert "query-secret" not in line
    assert load(tmp_path, BASE).health is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(("extra", "key", "line", "says"), [
    ("[health]\nconfrim = 3\n", "health.confrim", 11, "unknown key"),
    ("[health]\n[health.webhook]\nurl = \"https://x/h\"\nretries = 3\n",
     "health.webhook.retries", 13, "unknown key"),
    ("[health]\n[health.webhook]\ntimeout_s = 3\n", "health.webhook.url", 11, "missing"),
    ("[health]\n[health.webhook]\nurl = \"https://u:pw@x/h\"\n", "health.webhook.url", 12,
     "credentials"),
    ("[health]\n[health.mqtt]\ntopic = \"city/alerts\"\n", "health.mqtt", 11,
     "[sinks.mqtt]"),
    ("[health]\n[health.mqtt]\ntopic = \"city/#\"\n[sinks.mqtt]\nhost = \"b\"\n",
     "health.mqtt.topic", 12, "without + #"),
    ("[health]\n[health.lamps.\"SL-1\"]\nrating_w = -36\n", "health.lamps.\"SL-1\".rating_w",
     None, "> 0"),
    ("[health]\nday_lx = 5\n", "health.day_lx", 11, "above dark_lx"),
    # the service stops within 30 s and waits out one delivery: a longer one is killed
    # mid-delivery and its alert sent again after the restart
    ("[health]\n[health.webhook]\nurl = \"https://x/h\"\ntimeout_s = 25\n",
     "health.webhook.timeout_s", 13, "at most 20 s"),
])
def test_health_table_refuses_with_file_line_and_key(
        tmp_path: Path, extra: str, key: str, line: int | None, says: str) -> None:
    msg = refused(tmp_path, BASE + "\n" + extra)
    assert "gateway.toml" in msg and key in msg and says in msg, msg
    if line is not None:
        assert re.search(rf"\bline {line}\b", msg), msg
    assert "pw@" not in msg


def test_packs_are_the_history_short_names_per_node_and_time() -> None:
    recs = (records(seq=0, t=T0, which=[("lamp_power", 36.0, "W"), ("illuminance", 3.5, "lx"),
                                        ("temperature.q", 8, None)])
            + records(node="SL-0007", seq=1, t=T0 + 60, which=[("lamp_power", 0.0, "W")]))
    recs.append({"n": "urn:dev:lantern:SL-0042:status", "t": T0, "vs": "ok", "id": "x"})
    recs.append({"n": "not-a-device", "t": T0, "v": 1, "id": "y"})
    assert sorted(packs(recs)) == [
        ("SL-0007", T0 + 60, {"lamp_power": 0.0}),
        ("SL-0042", T0, {"lamp_power": 36.0, "illuminance": 3.5, "temperature.q": 8})]


@pytest.fixture
async def broker() -> AsyncIterator[NgsiBroker]:
    b = NgsiBroker()
    await b.start()
    yield b
    await b.stop()


def night(seq: int, watts: float) -> list[dict[str, object]]:
    return records(seq=seq, t=T0 + 60 * seq, which=[
        ("lamp_power", watts, "W"), ("lamp_voltage", 24.1, "V"), ("illuminance", 0.05, "lx"),
        ("uptime", 60 * seq, "s")])


async def test_streetlight_status_and_power_state_reach_the_broker_and_validate(
        tmp_path: Path, broker: NgsiBroker) -> None:
    """A lamp that goes dark at night: the broker's Streetlight (the readings merged with the
    monitor's entity) says defectiveLamp and off, and validates against the official schema
    with format checking; the readings never overwrite them with a guess."""
    cfg = load(tmp_path, BASE + HEALTH.replace("https://ops.example/hooks/lantern?key=query-secret",
                                               "http://127.0.0.1:9/never") + f"""
[sinks.ngsi_ld]
url = "{broker.url}"

[nodes."SL-0042"]
pole = "42"
location = [52.3702, 4.8952]
interval_s = 60
""")
    h = cfg.health  # type: ignore[attr-defined]
    async with HealthService(h.settings, tmp_path) as svc:
        plugin = sink_plugin("ngsi_ld")
        ctx = SinkContext(cfg.nodes, tmp_path, {"SL-0042": "1.4.0"}, svc)  # type: ignore[attr-defined]
        async with plugin.open(cfg.ngsi_ld, ctx) as sink:  # type: ignore[attr-defined]
            feed = HealthSink(svc)
            for seq, watts in enumerate([36.0] * 3 + [0.0] * 3):
                b = batch(night(seq, watts))
                await feed.send(b)
                await sink.send(b)
    assert broker.rejected == []
    sid = "urn:ngsi-ld:Streetlight:lantern:pole-42"
    kv = ngsi.key_values(broker.entities[sid])
    assert sdm.errors("Streetlight", kv) == [], kv
    assert (kv["status"], kv["powerState"]) == ("defectiveLamp", "off")
    assert kv["powerConsumption"] == 0.0 and kv["dateLastSwitchingOff"]
    assert kv["lifetimePowerConsumption"] > 0
    readings = [e for e in broker.history[sid] if "powerConsumption" in e]
    assert readings and all("status" not in e and "powerState" not in e for e in readings)
    dev = broker.entities["urn:ngsi-ld:Device:lantern:SL-0042"]
    assert dev["firmwareVersion"]["value"] == "1.4.0"  # the context's firmware mapping


async def test_without_health_the_readings_entity_keeps_its_status(broker: NgsiBroker,
                                                                   tmp_path: Path) -> None:
    ents = ngsi.entities(night(0, 36.0), NODES)
    kv = ngsi.key_values(next(e for e in ents if e["type"] == "Streetlight"))
    assert sdm.errors("Streetlight", kv) == [] and kv["status"] == "ok"


async def test_webhook_refuses_a_redirect_and_never_shows_its_secrets(
        caplog: pytest.LogCaptureFixture) -> None:
    hits: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app.router.add_post("/hook", moved)
    app.router.add_post("/elsewhere", moved)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            hook = Webhook(f"http://127.0.0.1:{port}/hook?key=query-secret", session,
                           headers={"Authorization": "Bearer header-secret"})
            with caplog.at_level(logging.INFO), pytest.raises(DeliveryError) as exc:
                await hook.send("{}")
            dead = Webhook("http://127.0.0.1:9/hook?key=query-secret", session)
            with pytest.raises(DeliveryError) as exc2:
                await dead.send("{}")
    finally:
        await runner.cleanup()
    assert hits == ["/hook"]  # never followed
    assert "HTTP 302" in str(exc.value) and "redirect" in str(exc.value)
    for text in (str(exc.value), str(exc2.value), caplog.text):
        assert "query-secret" not in text and "header-secret" not in text


async def test_a_monitor_bug_skips_its_batch_and_a_store_failure_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The queue must not wait forever on a batch the monitor cannot judge; a batch its
    store could not save is kept for the forward stage to try again."""
    import sqlite3

    from lantern.agent.health.monitor import Health

    async with HealthService(Settings(), tmp_path) as svc:
        feed = HealthSink(svc)
        monkeypatch.setattr(Health, "feed", lambda *a: 1 / 0)
        with caplog.at_level(logging.ERROR):
            await feed.send(batch(night(0, 36.0)))
            await feed.send(batch(night(1, 36.0)))
        assert feed.skipped == 2 and feed.fed == 0
        assert caplog.text.count("This is a bug") == 1  # logged once, counted each time

        def full(*a: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.undo()
        monkeypatch.setattr(svc.store, "save", full)
        with pytest.raises(sqlite3.OperationalError):
            await feed.send(batch(night(2, 36.0)))
        monkeypatch.undo()
        await feed.send(batch(night(3, 36.0)))
        assert feed.fed == 1
