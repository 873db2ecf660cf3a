"""Bad input survived: each case was found in a review of the gateway and the field tools
(2026-11-29) and failed before its fix.

Each test states the promise it holds the code to (docs/gateway.md, docs/protocol.md: bad
input is counted, logged once and survived; no secrets in logs or messages).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.store import Accepted, Store, Window
from lantern.agent.sinks.http import DeliveryError, HttpSink, HttpSinkConfig
from lantern.agent.sinks.mqtt import MqttSink, MqttSinkConfig
from lantern.agent.sinks.ngsi_ld import NgsiLdSink, NgsiLdSinkConfig
from lantern.tools.field import nodelink as nl
from lantern.tools.street.ngsi_broker import NgsiBroker
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.ngsi import NODES

T0 = 1_764_331_200
NODE = "SL-0042"


async def _until(cond: Any, what: str, task: asyncio.Task[None], store: Store,
                 timeout: float = 20) -> None:
    """Wait until cond() holds and the queue is empty (every frame delivered or dropped);
    fail at once, with its exception, if the forwarder task has died."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if task.done():
            exc = None if task.cancelled() else task.exception()
            pytest.fail(f"the forwarder died (waiting for {what}): {exc!r}")
        if cond() and (await store.depth())[0] == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _pack(records: list[dict[int, Any]]) -> bytes:
    return bytes(cbor2.dumps(records, canonical=True))


async def _commit_pack(store: Store, windows: dict[str, Window], seq: int, pack: bytes) -> None:
    windows.setdefault(NODE, Window()).mark(seq)
    await store.commit([Accepted(NODE, seq, b"", None, pack=pack,
                                 n=protocol.pack_size(pack))], windows)


def _good_pack(seq: int) -> bytes:
    return _pack([{0: "temperature", 2: 21.5, -3: T0 + seq}, {0: "humidity", 2: 48.25}])


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


# ---- 1. a third-party BTHome reading kills the NGSI-LD and MQTT forwarders ----------------
# docs/ble.md: configured BTHome sensors become readings `urn:dev:bthome:<name>:<measurement>`
# in the queue, for every sink. agent/ngsi.py split_name() raises ValueError for any name that
# is not urn:dev:lantern:..., the sinks do not catch it, Forwarder._deliver only catches
# DeliveryError: the forwarder task dies, gateway.run() stops the gateway, and after a restart
# the same frame is first in the queue again.

def _bthome_frame(seq: int) -> Accepted:
    rec = {"n": "urn:dev:bthome:park-1:temperature", "t": float(T0 + seq), "u": "Cel",
           "v": 21.5, "id": f"bthome:park-1:{seq}:0"}
    return Accepted("bthome:park-1", seq, b"", [rec])


@contextlib.asynccontextmanager
async def _ngsi_forwarding(tmp_path: Path) -> AsyncIterator[
        tuple[NgsiBroker, Store, NgsiLdSink, dict[str, Window], asyncio.Event,
              asyncio.Task[None]]]:
    """A broker, a queue and a running NGSI-LD forwarder; (broker, store, sink, windows,
    new-data event, forwarder task)."""
    broker = NgsiBroker()
    await broker.start()
    ev = asyncio.Event()
    try:
        async with Store(tmp_path / "q.sqlite") as store, \
                NgsiLdSink(NgsiLdSinkConfig(url=broker.url), NODES) as sink:
            task = asyncio.create_task(
                Forwarder(store, sink, Metrics(), ev, 50, 0.05, 0.05, 0.2).run())
            try:
                yield broker, store, sink, {}, ev, task
            finally:
                await _stop(task)
    finally:
        await broker.stop()


@pytest.mark.ngsi_ld
async def test_bthome_reading_does_not_kill_the_ngsi_ld_forwarder(tmp_path: Path) -> None:
    async with _ngsi_forwarding(tmp_path) as (broker, store, sink, windows, ev, task):
        windows.setdefault("bthome:park-1", Window()).mark(1)
        await store.commit([_bthome_frame(1)], windows)
        await _commit_pack(store, windows, 1, _good_pack(1))
        ev.set()
        await _until(lambda: "urn:ngsi-ld:WeatherObserved:lantern:SL-0042" in broker.entities,
                     "the node's reading reached the broker", task, store)
        # the third-party sensor is an entity of its own, not a Lantern node's
        assert "urn:ngsi-ld:WeatherObserved:bthome:park-1" in broker.entities
        assert not sink.skipped


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "mosquitto")
    m.start()
    yield m
    m.stop()


async def _mqtt_forwarder_survives(tmp_path: Path, broker: Mosquitto,
                                   bad: Any) -> tuple[list[str], dict[str, int]]:
    """Commit a bad frame (bad(store, windows)) then a good one; the good one must arrive.

    Returns the topics that arrived and what the sink left out, by reason."""
    import aiomqtt

    got: list[str] = []
    ready = asyncio.Event()

    async def subscribe() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="review-sub") as c:
            await c.subscribe("lantern/#", qos=1)
            ready.set()
            async for m in c.messages:
                got.append(str(m.topic))

    sub = asyncio.create_task(subscribe())
    await asyncio.wait_for(ready.wait(), 10)
    ev = asyncio.Event()
    windows: dict[str, Window] = {}
    try:
        async with Store(tmp_path / "q.sqlite") as store, \
                MqttSink(MqttSinkConfig(host="127.0.0.1", port=broker.port,
                                        timeout_s=5)) as sink:
            fwd = Forwarder(store, sink, Metrics(), ev, 50, 0.05, 0.05, 0.2)
            task = asyncio.create_task(fwd.run())
            try:
                await bad(store, windows)
                await _commit_pack(store, windows, 2, _good_pack(2))
                ev.set()
                await _until(lambda: f"lantern/{NODE}/temperature" in got,
                             "the node's good reading reached the broker", task,
                             store)
                return got, dict(sink.skipped)
            finally:
                await _stop(task)
    finally:
        await _stop(sub)


@pytest.mark.mqtt
async def test_bthome_reading_does_not_kill_the_mqtt_forwarder(tmp_path: Path,
                                                               mosquitto: Mosquitto) -> None:
    async def bad(store: Store, windows: dict[str, Window]) -> None:
        windows.setdefault("bthome:park-1", Window()).mark(1)
        await store.commit([_bthome_frame(1)], windows)

    got, skipped = await _mqtt_forwarder_survives(tmp_path, mosquitto, bad)
    assert "lantern/bthome:park-1/temperature" in got and not skipped


# ---- 2. an authentic pack with an MQTT wildcard in a name kills the MQTT forwarder ---------
# resolve_pack accepts any text after the node's base name; MqttSink.send builds the topic
# from it and paho's publish() raises ValueError for '+' or '#' ("Publish topic cannot
# contain wildcards"), which MqttSink does not turn into a DeliveryError or a dead letter.

@pytest.mark.mqtt
async def test_wildcard_in_a_measurement_name_does_not_kill_the_mqtt_forwarder(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    async def bad(store: Store, windows: dict[str, Window]) -> None:
        pack = _pack([{0: "no2#", 1: "ppb", 2: 12, -3: T0}])
        assert protocol.resolve_pack(pack, node=NODE)  # valid SenML: it is queued as is
        await _commit_pack(store, windows, 1, pack)

    got, skipped = await _mqtt_forwarder_survives(tmp_path, mosquitto, bad)
    assert skipped == {"topic": 1}  # left out of MQTT, counted; the other sinks still get it
    assert not [t for t in got if "no2" in t]


# ---- 3. an authentic pack with a time beyond year 9999 killed the NGSI-LD forwarder ---------
# resolve_pack accepted any CBOR integer as bt (±2^64); agent/ngsi.py iso() calls
# datetime.fromtimestamp(), which raises ValueError/OverflowError for such times. Now such a
# pack is a dead letter when it is resolved on its way out, and the next frame goes on.

@pytest.mark.ngsi_ld
async def test_time_out_of_datetime_range_does_not_kill_the_ngsi_ld_forwarder(
        tmp_path: Path) -> None:
    async with _ngsi_forwarding(tmp_path) as (broker, store, _, windows, ev, task):
        bad = _pack([{0: "temperature", 2: 21.5, -3: 10**15}])
        with pytest.raises(FrameError, match="outside years 1 to 9999"):
            protocol.resolve_pack(bad, node=NODE)  # refused on its way out...
        await _commit_pack(store, windows, 1, bad)  # ...though its head was fine
        await _commit_pack(store, windows, 2, _good_pack(2))
        ev.set()
        await _until(lambda: "urn:ngsi-ld:WeatherObserved:lantern:SL-0042" in broker.entities,
                     "the good reading reached the broker", task, store)


# ---- 4. sink credentials in the URL end up in logs and error messages ---------------------
# config._url accepts http://user:password@host/ although docs/gateway.md says secrets never
# sit in gateway.toml; the HTTP sink then puts the URL, password included, in every
# DeliveryError, which the forwarder logs.

async def test_http_sink_error_does_not_carry_the_url_password() -> None:
    cfg = HttpSinkConfig(url="http://lantern:s3cr3t-pw@127.0.0.1:9/senml", timeout_s=2)
    async with HttpSink(cfg) as sink:
        with pytest.raises(DeliveryError) as err:
            from lantern.agent.queue.resolve import Batch

            await sink.send(Batch(1, 1, 0.0, ["x"], ['{"n":"a","v":1}']))
    assert "s3cr3t-pw" not in str(err.value), str(err.value)


# ---- 5. the diagnostic tool crashes on a malformed (unauthenticated) STATUS ----------------
# tools/field/nodelink.py parse_status() runs on every STATUS before any MAC check and does
# int(p.get(5, 0)): a text reason raises ValueError, which `lantern diag node` does not catch
# (it catches DiagError and FrameError): a traceback instead of "the node's answer was
# malformed". Anyone on the line can send such a frame.

class _Line:
    """A transport that answers the first frame sent with canned bytes."""

    name = "test line"

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.q: asyncio.Queue[bytes] = asyncio.Queue()

    async def open(self) -> None:
        pass

    def send(self, data: bytes) -> None:
        self.q.put_nowait(self.answer)

    async def recv(self, timeout: float) -> bytes:
        return await asyncio.wait_for(self.q.get(), timeout)

    async def close(self) -> None:
        pass


async def test_malformed_status_is_a_frame_error_not_a_crash() -> None:
    key = bytes(range(32))
    payload = cbor2.dumps({1: NODE, 2: "0.1.0", 3: "esp32-devkitc", 5: "x", 6: 1})
    status = protocol.encode_frame(protocol.STATUS,
                                   nl.seal(key, NODE.encode(), 5, payload, protocol.STATUS))
    s = nl.NodeSession(_Line(status), {NODE: key}, NODE, timeout=1.0, retries=1)
    with pytest.raises((nl.DiagError, FrameError)):
        await s.probe()


# ---- 6. `lantern diag node identify abc`: a traceback, where set-interval says what to type --

def test_identify_with_bad_seconds_is_a_clear_error() -> None:
    from lantern.tools.field import diag

    with pytest.raises(nl.DiagError):
        diag._command(argparse.Namespace(action="identify", value="abc"))


# ---- 7. `lantern provision node --new-key` corrupts a key file that quotes ids with '' -----
# tools/field/provision_steps.py keys_text() finds the node's line with a regex that knows only
# "id" and bare id; TOML's literal keys ('SL-0042' = "...") are missed, a second line for the
# same id is inserted, and write_secret() replaces the key file with invalid TOML before
# load_keys() notices: the gateway can no longer start.

def test_new_key_replaces_a_literal_quoted_id(tmp_path: Path) -> None:
    from lantern.agent.config import load_keys
    from lantern.tools.field import provision_steps as ps

    keys = tmp_path / "keys.toml"
    keys.write_text("[nodes]\n'SL-0042' = \"" + "11" * 32 + "\"\n")
    keys.chmod(0o600)
    assert load_keys(keys) == {b"SL-0042": bytes([0x11] * 32)}
    new = bytes([0x22] * 32)
    keys.write_text(ps.keys_text(keys, "SL-0042", new))
    assert load_keys(keys) == {b"SL-0042": new}


# ---- 8. a token_file that cannot be read is a traceback, not a config error ------------------
# agent/config.py _api(): check_secret_file() only stats the file; read_text() then raises
# IsADirectoryError / PermissionError / UnicodeDecodeError out of load_config, and
# `lantern gateway check-config` prints a traceback instead of one line and exit 2.

def test_unreadable_api_token_file_is_a_config_error(tmp_path: Path) -> None:
    from lantern.agent.config import load_config
    from lantern.agent.errors import ConfigError

    (tmp_path / "tok").mkdir(mode=0o700)
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nkeys_file = "keys.toml"\n[[links.serial]]\nport = "/dev/null"\n'
                   '[sinks.http]\nurl = "http://127.0.0.1:9/"\n[api]\ntoken_file = "tok"\n')
    with pytest.raises(ConfigError, match=r"api\.token_file"):
        load_config(cfg)


# ---- 9. /api/nodes/{id}/readings?since=nan answers with invalid JSON -------------------------
# agent/api.py parse_since() takes float("nan") (and "inf") as a time; the answer then carries
# "since": NaN, which is not JSON (RFC 8259) and which the status page's JSON.parse refuses.

def test_since_nan_is_a_bad_request() -> None:
    from aiohttp import web

    from lantern.agent.api import parse_since

    with pytest.raises(web.HTTPBadRequest):
        parse_since("nan", 1_800_000_000.0)


# ---- and what the fixes added --------------------------------------------------------------

class _BuggySink:
    """A sink with a bug: the first sends raise what no sink should (not a DeliveryError)."""

    name = "buggy"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.got: list[str] = []

    async def send(self, batch: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise KeyError("a sink bug")
        self.got += batch.rids


async def test_a_sink_bug_is_retried_and_logged_once_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ev = asyncio.Event()
    windows: dict[str, Window] = {}
    sink = _BuggySink(failures=3)
    async with Store(tmp_path / "q.sqlite") as store:
        metrics = Metrics()
        fwd = Forwarder(store, sink, metrics, ev, 50, 0.05, 0.01, 0.05)
        task = asyncio.create_task(fwd.run())
        try:
            await _commit_pack(store, windows, 1, _good_pack(1))
            ev.set()
            await _until(lambda: len(sink.got) == 2, "the batch delivered once the bug passed",
                         task, store)
        finally:
            await _stop(task)
    assert sink.got == [f"{NODE}:1:0", f"{NODE}:1:1"] and metrics.upstream_failures == 3
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is not None  # once, with its traceback
    assert "This is a bug" in errors[0].getMessage() and "frames 1 to 1" in errors[0].getMessage()


def test_entities_leave_out_and_count_what_no_entity_can_hold() -> None:
    from collections import Counter

    from lantern.agent.ngsi import entities, split_name

    assert split_name("urn:dev:lantern:SL-0042:pm2_5") == ("SL-0042", "pm2_5")
    assert split_name("urn:dev:bthome:park-1:temperature") == ("bthome:park-1", "temperature")
    for bad in ("urn:dev:lantern:SL-0042", "temperature", "urn:dev::x:t", "urn:dev:a:b:"):
        with pytest.raises(ValueError):
            split_name(bad)
    skipped: Counter[str] = Counter()
    ents = entities([{"n": "weird", "t": T0, "v": 1},
                     {"n": "urn:dev:lantern:SL-0042:temperature", "t": 1e15, "v": 1},
                     {"n": "urn:dev:lantern:SL-0042:temperature", "t": T0, "v": 2}], {}, skipped)
    assert skipped == {"name": 1, "time": 1}
    assert [e["id"] for e in ents] == ["urn:ngsi-ld:WeatherObserved:lantern:SL-0042"]


def test_a_url_with_credentials_is_refused_without_showing_them(tmp_path: Path) -> None:
    from lantern.agent.config import load_config, shown_url
    from lantern.agent.errors import ConfigError

    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nkeys_file = "keys.toml"\n[[links.serial]]\nport = "/dev/null"\n'
                   '[sinks.http]\nurl = "https://lantern:s3cr3t-pw@platform.example/senml"\n')
    with pytest.raises(ConfigError, match=r"sinks\.http\.url.*must not carry credentials") as e:
        load_config(cfg)
    assert "s3cr3t-pw" not in str(e.value)
    assert shown_url("https://u:s3cr3t-pw@h:8443/p?q=1") == "https://***@h:8443/p?q=1"
    assert shown_url("https://h/p") == "https://h/p"


def test_set_interval_beyond_any_number_is_a_clear_error() -> None:
    from lantern.tools.field import diag

    for v in ("inf", "nan", "1e400", "x"):
        with pytest.raises(nl.DiagError, match="set-interval needs seconds"):
            diag._command(argparse.Namespace(action="set-interval", value=v))


def test_a_key_file_that_cannot_take_the_key_is_left_alone(tmp_path: Path) -> None:
    from lantern.tools.field import provision_steps as ps

    keys = tmp_path / "keys.toml"
    keys.write_text("[nodes]  # a comment after the header is fine\n"
                    '"SL-0001" = "' + "11" * 32 + '"\n')
    assert "SL-0042" in ps.keys_text(keys, "SL-0042", bytes(32))
    keys.write_text('nodes = { "SL-0001" = "' + "11" * 32 + '" }\n')  # valid, but not lines
    with pytest.raises(ValueError, match="not valid TOML"):
        ps.keys_text(keys, "SL-0042", bytes(32))


async def test_a_failure_after_the_commit_is_not_a_failed_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk cap's second look (after the frames are in) failing must not hold back their
    ACKs: the frames are committed, and the caller must hear so."""
    import sqlite3

    async with Store(tmp_path / "q.sqlite") as store:
        calls = 0
        real = store.cap.make_room

        def make_room(db: sqlite3.Connection) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:  # the one after the transaction
                raise sqlite3.OperationalError("database or disk is full")
            real(db)

        monkeypatch.setattr(store.cap, "make_room", make_room)
        await _commit_pack(store, {}, 1, _good_pack(1))  # no exception: committed
        assert calls == 2 and (await store.depth())[0] == 2
