"""The Sensor.Community sink against a receiver that takes only their documented request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.store import Accepted, Store, Window
from lantern.agent.sinks.http import DeliveryError
from lantern.agent.sinks.sensor_community import SensorCommunitySink, SensorCommunitySinkConfig
from lantern.tools.street.sc_receiver import ScReceiver
from tests.helpers.ngsi import batch, records

pytestmark = pytest.mark.sensor_community

T = 1_780_000_000.0
PUBLISHED = ("pm10", "pm2_5", "temperature", "humidity", "pressure", "LAeq", "LAmax")


class Clock:
    """Wall time the sink and the receiver share, moved by the test."""

    def __init__(self) -> None:
        self.t = T

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def receiver(clock: Clock) -> AsyncIterator[ScReceiver]:
    r = ScReceiver(registered={"esp32-1001": {1, 11, 15}}, clock=clock)
    await r.start()
    yield r
    await r.stop()


def _cfg(receiver: ScReceiver, **kw: object) -> SensorCommunitySinkConfig:
    return SensorCommunitySinkConfig(sensors={"SL-0001": "esp32-1001"}, measurements=PUBLISHED,
                                     url=receiver.url, **kw)  # type: ignore[arg-type]


def _pack(node: str, seq: int, t: float, scale: float = 1.0) -> list[dict[str, object]]:
    recs = records(node=node, seq=seq, t=t)
    for r in recs:
        r["v"] = r["v"] * scale  # type: ignore[operator]
    return recs


async def test_only_listed_measurements_of_registered_nodes_in_the_documented_form(
        receiver: ScReceiver, clock: Clock) -> None:
    async with SensorCommunitySink(_cfg(receiver), now=clock) as sink:
        await sink.send(batch(_pack("SL-0001", 0, T) + _pack("SL-0002", 0, T)))
    assert receiver.rejected == []
    assert sorted(receiver.accepted) == [
        ("esp32-1001", 1, {"P1": "20.00", "P2": "12.50"}),
        ("esp32-1001", 11, {"temperature": "21.50", "humidity": "48.25",
                            "pressure": "101325.00"}),
        ("esp32-1001", 15, {"noise_LAeq": "55.20", "noise_LA_max": "71.00"})]
    assert sink.skipped == {"unregistered": len(PUBLISHED)}  # SL-0002 has no registered id


async def test_no_more_than_one_push_per_sensor_and_pin_per_interval(
        receiver: ScReceiver, clock: Clock) -> None:
    async with SensorCommunitySink(_cfg(receiver), now=clock) as sink:
        for seq in range(5):  # a pack every 30 s: pushes at 0 s and 150 s
            clock.t = T + 30 * seq + (30 if seq == 4 else 0)
            await sink.send(batch(_pack("SL-0001", seq, clock.t, scale=1 + seq)))
    assert receiver.rejected == []  # the receiver answers 429 to a push inside the interval
    pm = [values for _, pin, values in receiver.accepted if pin == 1]
    # the second push carries the mean of the packs since the first: scales 2..5 → 3.5
    assert pm == [{"P1": "20.00", "P2": "12.50"}, {"P1": "70.00", "P2": "43.75"}]
    assert sink.pushes == 6


async def test_a_backlog_is_not_published_with_the_wrong_time(
        receiver: ScReceiver, clock: Clock) -> None:
    async with SensorCommunitySink(_cfg(receiver), now=clock) as sink:
        await sink.send(batch(_pack("SL-0001", 0, T - 3600)))  # an hour late after an outage
    assert receiver.accepted == [] and sink.skipped == {"stale": len(PUBLISHED)}


async def test_flagged_values_are_not_published(receiver: ScReceiver, clock: Clock) -> None:
    recs = [*_pack("SL-0001", 0, T),
            {"n": "urn:dev:lantern:SL-0001:pm10.q", "t": T, "v": 1, "id": "SL-0001:0:99"}]
    async with SensorCommunitySink(_cfg(receiver), now=clock) as sink:
        await sink.send(batch(recs))
    assert ("esp32-1001", 1, {"P2": "12.50"}) in receiver.accepted
    assert sink.skipped == {"flagged": 1}


async def test_nothing_lost_while_their_api_is_down(receiver: ScReceiver, clock: Clock,
                                                    tmp_path: Path) -> None:
    receiver.down = True
    new = asyncio.Event()
    async with Store(tmp_path / "q.sqlite") as store, \
            SensorCommunitySink(_cfg(receiver), now=clock) as sink:
        windows: dict[str, Window] = {"SL-0001": Window()}
        fwd = Forwarder(store, sink, Metrics(), new, 100, 0.05, backoff_initial_s=0.05,
                        backoff_max_s=0.2)
        task = asyncio.create_task(fwd.run())
        try:
            for seq in range(2):
                windows["SL-0001"].mark(seq)
                await store.commit([Accepted("SL-0001", seq, b"", _pack("SL-0001", seq, T))],
                                   windows)
            new.set()
            deadline = asyncio.get_running_loop().time() + 10
            while fwd.upstream_ok is not False:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            assert (await store.depth())[0] > 0 and receiver.accepted == []
            receiver.down = False
            while (await store.depth())[0]:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert len(receiver.accepted) == 3 and receiver.rejected == []


async def test_a_refusal_is_a_failed_delivery(receiver: ScReceiver, clock: Clock) -> None:
    receiver.registered = {"esp32-1001": {1}}  # registered without its BME280
    async with SensorCommunitySink(_cfg(receiver), now=clock) as sink:
        with pytest.raises(DeliveryError, match=r"HTTP 403 .* pin 11"):
            await sink.send(batch(_pack("SL-0001", 0, T)))
        receiver.registered = {"esp32-1001": {1, 11, 15}}
        await sink.send(batch(_pack("SL-0001", 0, T)))  # the retry sends what was left
    assert sorted(pin for _, pin, _ in receiver.accepted) == [1, 11, 15]  # each once


async def test_the_interval_holds_across_a_gateway_restart(
        receiver: ScReceiver, clock: Clock, tmp_path: Path) -> None:
    """Their API refuses (429) a sensor and pin pushing again within the interval: a gateway
    restarted a minute after a push waits out the rest of it."""
    async with SensorCommunitySink(_cfg(receiver), now=clock, state_dir=tmp_path) as sink:
        await sink.send(batch(_pack("SL-0001", 0, T)))
    kept = tmp_path / "sensor_community.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert json.loads(kept.read_text()) == {"url": receiver.url, "last": {
        "esp32-1001:1": T, "esp32-1001:11": T, "esp32-1001:15": T}}
    async with SensorCommunitySink(_cfg(receiver), now=clock, state_dir=tmp_path) as sink:
        clock.t = T + 60
        await sink.send(batch(_pack("SL-0001", 1, clock.t, scale=2)))
        assert sink.pushes == 0  # held: the next push takes this pack too
        clock.t = T + 150
        await sink.send(batch(_pack("SL-0001", 2, clock.t, scale=4)))
        assert sink.pushes == 3
    assert receiver.rejected == []
    pm = [values for _, pin, values in receiver.accepted if pin == 1]
    assert pm == [{"P1": "20.00", "P2": "12.50"}, {"P1": "60.00", "P2": "37.50"}]
    assert json.loads(kept.read_text())["last"]["esp32-1001:1"] == T + 150


@pytest.mark.parametrize("kept", [
    '{"url": "https://elsewhere.example/push", "last": {"esp32-1001:1": %s}}',  # another API
    '{"url": "%s", "last": {"esp32-1001:1": %s}}',  # a push "later" than now: clock set back
    '{"url": "%s", "last": {"esp32-1001:1": "soon"}}',  # not a time
    "not JSON",
])
async def test_kept_push_times_that_cannot_hold_a_push_back_do_not(
        receiver: ScReceiver, clock: Clock, tmp_path: Path, kept: str) -> None:
    text = kept.replace('"%s"', json.dumps(receiver.url)).replace("%s", str(T + 3600))
    (tmp_path / "sensor_community.json").write_text(text)
    async with SensorCommunitySink(_cfg(receiver), now=clock, state_dir=tmp_path) as sink:
        await sink.send(batch(_pack("SL-0001", 0, T)))
    assert sink.pushes == 3 and receiver.rejected == []
    assert json.loads((tmp_path / "sensor_community.json").read_text())["last"] == {
        "esp32-1001:1": T, "esp32-1001:11": T, "esp32-1001:15": T}


@pytest.mark.parametrize(("headers", "body", "status"), [
    ({"X-Pin": "1"}, {"software_version": "x", "sensordatavalues": [
        {"value_type": "P1", "value": "1.0"}]}, 403),  # no X-Sensor
    ({"X-Sensor": "esp32-1001"}, {"software_version": "x", "sensordatavalues": [
        {"value_type": "P1", "value": "1.0"}]}, 400),  # no X-Pin
    ({"X-Sensor": "esp32-1001", "X-Pin": "1"}, {"software_version": "x", "sensordatavalues": [
        {"value_type": "SDS_P1", "value": "1.0"}]}, 400),  # a prefixed name
    ({"X-Sensor": "esp32-1001", "X-Pin": "11"}, {"software_version": "x", "sensordatavalues": [
        {"value_type": "temperature", "value": 21.5}]}, 400),  # a number, not text
    ({"X-Sensor": "esp32-1001", "X-Pin": "1"}, {"sensordatavalues": [
        {"value_type": "P1", "value": "1.0"}]}, 400),  # no software_version
])
async def test_the_receiver_refuses_what_their_api_does_not_document(
        receiver: ScReceiver, headers: dict[str, str], body: object, status: int) -> None:
    async with aiohttp.ClientSession() as s, s.post(receiver.url, json=body,
                                                     headers=headers) as resp:
        assert resp.status == status
    assert receiver.accepted == []


def _config(tmp_path: Path, table: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text('[gateway]\nkeys_file = "keys.toml"\n\n[[links.serial]]\nport = "/dev/ttyUSB0"\n'
                 '\n[sinks.sensor_community]\n' + table)
    return p


@pytest.mark.parametrize(("table", "says"), [
    ('measurements = ["pm10"]\nsensors = { "SL-1" = "esp32-1" }\nrate = 1\n',
     r"line 10: sinks\.sensor_community\.rate: unknown key"),
    ('measurements = ["co2"]\nsensors = { "SL-1" = "esp32-1" }\n',
     r"line 8: sinks\.sensor_community\.measurements: 'co2' has no Sensor.Community value"),
    ('measurements = ["pm10"]\nsensors = { "SL-1" = "esp32-1" }\ninterval_s = 60\n',
     r"line 10: sinks\.sensor_community\.interval_s: at least 145 s"),
    ('measurements = ["pm10"]\nsensors = { "SL-1" = "esp32 1" }\n',
     r"sinks\.sensor_community\.sensors\.SL-1: expected the sensor id"),
    ('sensors = { "SL-1" = "esp32-1" }\n', r"sinks\.sensor_community\.measurements: missing"),
])
def test_config_errors_name_the_line_and_the_key(tmp_path: Path, table: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config(_config(tmp_path, table))


def test_config_loads(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, 'measurements = ["pm10", "pm2_5"]\n'
                                        'sensors = { "SL-0001" = "esp32-1001" }\n'))
    sc = cfg.sinks["sensor_community"]
    assert sc.measurements == ("pm10", "pm2_5") and sc.interval_s == 145.0
    assert sc.url == "https://api.sensor.community/v1/push-sensor-data/"


def test_check_config_shows_both_open_data_sinks_or_the_bad_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[nodes]\n"SL-0001" = "' + "ab" * 32 + '"\n')
    keys.chmod(0o600)
    good = ('[gateway]\nstate_dir = "state"\nkeys_file = "keys.toml"\n\n[[links.serial]]\n'
            'port = "/dev/null"\n\n[sinks.sensorthings]\nurl = "http://frost:8080/FROST/v1.1"\n'
            '\n[sinks.sensor_community]\nmeasurements = ["pm10"]\n'
            'sensors = { "SL-0001" = "esp32-1001" }\n')
    cfg = tmp_path / "gateway.toml"
    for text, rc, says in (
            (good, 0, "sinks:   sensorthings → http://frost:8080/FROST/v1.1; sensor_community → "
                      "https://api.sensor.community/v1/push-sensor-data/"),
            (good + "pins = [1]\n", 2, f"{cfg} line 14: sinks.sensor_community.pins: unknown key")):
        cfg.write_text(text)
        r = subprocess.run([sys.executable, "-m", "lantern", "gateway", "check-config",
                            "--config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert r.returncode == rc and says in r.stdout + r.stderr, r


async def test_values_no_such_sensor_gives_are_not_published(
        receiver: ScReceiver, clock: Clock) -> None:
    """Authentic but impossible values (a node key holder's, a broken sensor's) stay home."""
    recs = records("SL-0001", 0, T, [("pm10", -1.0, "ug/m3"), ("pm2_5", 1001.0, "ug/m3"),
                                     ("temperature", 85.0, "Cel"), ("humidity", 100.5, "%RH"),
                                     ("pressure", 29_999.0, "Pa"), ("LAeq", 140.0, "dB"),
                                     ("LAmax", 1.7e308, "dB")])
    async with SensorCommunitySink(_cfg(receiver), now=clock) as sink:
        await sink.send(batch(recs))
    assert receiver.rejected == []
    assert sorted(receiver.accepted) == [("esp32-1001", 11, {"temperature": "85.00"}),
                                         ("esp32-1001", 15, {"noise_LAeq": "140.00"})]
    assert sink.skipped == {"range": 5}


async def test_a_value_their_api_refuses_is_dropped_not_held_against_later_pushes(
        receiver: ScReceiver, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    receiver.refuse = {"noise_LAeq"}  # a 400 for the noise push, every time
    async with SensorCommunitySink(_cfg(receiver), now=clock) as sink:
        await sink.send(batch(_pack("SL-0001", 0, T)))  # not a failed delivery
        assert sorted(pin for _, pin, _ in receiver.accepted) == [1, 11]
        assert sink.skipped == {"refused": 2}  # noise_LAeq and noise_LA_max, in one push
        receiver.refuse = set()
        clock.t = T + 150
        await sink.send(batch(_pack("SL-0001", 1, clock.t)))  # the next push goes: not held
    assert sorted(pin for _, pin, _ in receiver.accepted) == [1, 1, 11, 11, 15]
    assert [r.message for r in caplog.records if "refused and dropped" in r.message] != []
    assert not any("esp32-1001" in r.getMessage() for r in caplog.records)


def test_two_nodes_with_one_registered_id_name_the_line_and_the_second_node(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.toml line \d+: sinks\.sensor_community"
                       r"\.sensors\.SL-0002: the same registered id as node SL-0001") as e:
        load_config(_config(tmp_path, 'measurements = ["pm10"]\n'
                                      'sensors = { "SL-0001" = "esp32-1001", '
                                      '"SL-0002" = "esp32-1001" }\n'))
    assert "esp32-1001" not in str(e.value)
