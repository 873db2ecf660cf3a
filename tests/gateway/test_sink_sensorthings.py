"""The OGC SensorThings API sink against the spec-following test server (tools/street/sta_server).

Readings go through the real durable queue and forwarder; the server checks every request
against OGC 18-088 and refuses what the standard forbids (its `rejected` must stay empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import frost_sta_client as fsc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from frost_sta_client.model.ext.data_array_value import DataArrayValue

from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.metrics import Metrics
from lantern.agent.ngsi import NodeMeta, iso
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.store import Accepted, Store, Window
from lantern.agent.sinks.http import DeliveryError
from lantern.agent.sinks.sensorthings import SensorThingsSink, SensorThingsSinkConfig
from lantern.tools.street.sta_server import StaServer
from tests.helpers.ngsi import FULL, T0, batch, records

pytestmark = pytest.mark.sensorthings

NODES = {"SL-0001": NodeMeta(pole="1", lat=52.3702, lon=4.8952, interval_s=60),
         "SL-0002": NodeMeta(pole="2", lat=52.3710, lon=4.8960, interval_s=60)}
PER_PACK = len(FULL)  # every measurement is numeric


async def _until(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class Street:
    """Two nodes' packs committed to a real queue, forwarded to the sink under test."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.windows: dict[str, Window] = {}
        self.seq = 0
        self.new = asyncio.Event()

    async def packs(self, n: int, flagged: bool = False) -> None:
        for _ in range(n):
            for node in NODES:
                recs = records(node=node, seq=self.seq, t=T0 + self.seq * 60)
                if flagged:
                    recs.append({"n": f"urn:dev:lantern:{node}:pm2_5.q", "t": T0 + self.seq * 60,
                                 "v": 1, "id": f"{node}:{self.seq}:{len(recs)}"})
                self.windows.setdefault(node, Window()).mark(self.seq)
                await self.store.commit([Accepted(node, self.seq, b"", recs)], self.windows)
            self.seq += 1
        self.new.set()


@contextlib.asynccontextmanager
async def forwarding(store: Store, sink: SensorThingsSink, street: Street
                     ) -> AsyncIterator[Forwarder]:
    fwd = Forwarder(store, sink, Metrics(), street.new, 60, 0.05, backoff_initial_s=0.05,
                    backoff_max_s=0.2)
    task = asyncio.create_task(fwd.run())
    try:
        yield fwd
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _observations_by_stream(server: StaServer) -> dict[str, list[dict[str, object]]]:
    names = {d["@iot.id"]: d["name"] for d in server.all("Datastreams")}
    out: dict[str, list[dict[str, object]]] = {}
    for o in server.all("Observations"):
        out.setdefault(names[o["Datastream@iot.id"]], []).append(o)
    return out


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[StaServer]:
    s = StaServer(persist=tmp_path / "sta.json")
    await s.start()
    yield s
    await s.stop()


def _cfg(server: StaServer) -> SensorThingsSinkConfig:
    return SensorThingsSinkConfig(url=server.url + "/v1.1")


async def test_street_readings_arrive_under_one_datastream_per_node_and_measurement(
        server: StaServer, tmp_path: Path) -> None:
    async with Store(tmp_path / "q.sqlite") as store, \
            SensorThingsSink(_cfg(server), NODES) as sink:
        street = Street(store)
        async with forwarding(store, sink, street) as fwd:
            await street.packs(3, flagged=True)
            await _until(lambda: fwd.delivered == 3 * 2 * (PER_PACK + 1))
    assert server.rejected == []
    assert sink.data_array and any("CreateObservations" in r for r in server.requests)
    assert len(server.all("Things")) == 2 and len(server.all("Locations")) == 2
    assert len(server.all("ObservedProperties")) == PER_PACK  # shared by both nodes
    streams = _observations_by_stream(server)
    assert set(streams) == {f"{n} {m}" for n in NODES for m, _, _ in FULL}
    for name, obs in streams.items():
        node, measurement = name.split(" ")
        i = [m for m, _, _ in FULL].index(measurement)
        assert [o["result"] for o in obs] == [FULL[i][1]] * 3
        assert [o["resultTime"] for o in obs] == [iso(T0 + s * 60) for s in range(3)]
        assert [o["parameters"]["lantern_id"] for o in obs] == [
            f"{node}:{s}:{i}" for s in range(3)]
    laeq = streams["SL-0001 LAeq"][0]
    assert laeq["phenomenonTime"] == f"{iso(T0 - 60)}/{iso(T0)}"  # the span it integrates
    pm = streams["SL-0002 pm2_5"][0]["parameters"]
    assert pm == {"lantern_id": "SL-0002:0:5", "lantern_quality": 1,
                  "lantern_flags": ["warmup"]}
    units = {d["name"]: d["unitOfMeasurement"]["symbol"] for d in server.all("Datastreams")}
    assert (units["SL-0001 temperature"], units["SL-0001 humidity"], units["SL-0001 co2"],
            units["SL-0001 LAeq"], units["SL-0001 heap_free"], units["SL-0001 outbox"]) == (
        "Cel", "%", "[ppm]", "dB[SPL]", "By", "{frames}")
    thing = server.all("Things")[0]
    loc = server.all("Locations")[0]
    assert thing["properties"] == {"lantern_id": "lantern:thing:SL-0001", "pole": "1"}
    assert loc["location"] == {"type": "Point", "coordinates": [4.8952, 52.3702]}
    # the FeatureOfInterest the server made from each Thing's Location: one per node
    assert len(server.all("FeaturesOfInterest")) == 2


async def test_no_entity_duplicated_across_gateway_and_server_restarts(
        server: StaServer, tmp_path: Path) -> None:
    queue = tmp_path / "q.sqlite"
    async with Store(queue) as store, SensorThingsSink(_cfg(server), NODES) as sink:
        street = Street(store)
        async with forwarding(store, sink, street) as fwd:
            await street.packs(2)
            await _until(lambda: fwd.delivered == 2 * 2 * PER_PACK)
        seq = street.seq
    counts = {s: len(server.sets[s]) for s in server.sets if s != "Observations"}
    assert sink.created["Datastreams"] == 2 * PER_PACK and not sink.found

    # the server restarts (its entities persisted), then a gateway with no memory of ids
    url = server.url
    await server.stop()
    again = StaServer(persist=server.persist)
    await again.start(port=int(url.rsplit(":", 1)[1]))
    try:
        async with Store(queue) as store, SensorThingsSink(_cfg(again), NODES) as sink2:
            street = Street(store)
            street.seq = seq
            async with forwarding(store, sink2, street) as fwd:
                await street.packs(2)
                await _until(lambda: fwd.delivered == 2 * 2 * PER_PACK)
        assert {s: len(again.sets[s]) for s in again.sets if s != "Observations"} == counts
        assert not sink2.created and sink2.found["Datastreams"] == 2 * PER_PACK
        assert again.rejected == []
        assert len(again.all("Observations")) == 4 * 2 * PER_PACK
        assert any("$filter=properties/lantern_id%20eq%20'lantern:thing:SL-0001'" in r
                   for r in again.requests)
    finally:
        await again.stop()


async def test_nothing_lost_while_the_server_is_down(server: StaServer, tmp_path: Path) -> None:
    server.down = True
    async with Store(tmp_path / "q.sqlite") as store, \
            SensorThingsSink(_cfg(server), NODES) as sink:
        street = Street(store)
        async with forwarding(store, sink, street) as fwd:
            await street.packs(3)
            await _until(lambda: len(server.requests) >= 3)
            assert fwd.upstream_ok is False and fwd.delivered == 0
            assert (await store.depth())[0] == 3 * 2 * PER_PACK
            server.down = False
            await _until(lambda: fwd.delivered == 3 * 2 * PER_PACK)
            assert (await store.depth())[0] == 0
    ids = [o["parameters"]["lantern_id"] for o in server.all("Observations")]
    assert len(ids) == len(set(ids)) == 3 * 2 * PER_PACK
    assert server.rejected == []


async def test_one_post_per_observation_where_the_data_array_is_not_offered(
        tmp_path: Path) -> None:
    server = StaServer(data_array=False)
    await server.start()
    try:
        async with Store(tmp_path / "q.sqlite") as store, \
                SensorThingsSink(_cfg(server), NODES) as sink:
            street = Street(store)
            async with forwarding(store, sink, street) as fwd:
                await street.packs(1)
                await _until(lambda: fwd.delivered == 2 * PER_PACK)
        assert sink.data_array is False
        assert not any("CreateObservations" in r for r in server.requests)
        assert sum(r == "POST /v1.1/Observations" for r in server.requests) == 2 * PER_PACK
        assert server.rejected == [] and len(server.all("Observations")) == 2 * PER_PACK
    finally:
        await server.stop()


async def test_rows_answered_error_are_retried_alone(server: StaServer, tmp_path: Path) -> None:
    server.fail_rows = 4
    async with Store(tmp_path / "q.sqlite") as store, \
            SensorThingsSink(_cfg(server), NODES) as sink:
        street = Street(store)
        async with forwarding(store, sink, street) as fwd:
            await street.packs(2)
            await _until(lambda: fwd.delivered == 2 * 2 * PER_PACK)
    assert sink.partial_failures >= 1
    ids = [o["parameters"]["lantern_id"] for o in server.all("Observations")]
    assert len(ids) == len(set(ids)) == 2 * 2 * PER_PACK


async def test_frost_client_reads_back_what_the_sink_sent(server: StaServer,
                                                          tmp_path: Path) -> None:
    """Fraunhofer's own models take our entities, and build the same dataArray rows."""
    async with Store(tmp_path / "q.sqlite") as store, \
            SensorThingsSink(_cfg(server), NODES) as sink:
        street = Street(store)
        async with forwarding(store, sink, street) as fwd:
            await street.packs(2)
            await _until(lambda: fwd.delivered == 2 * 2 * PER_PACK)
    for d in server.all("Datastreams"):
        ds = fsc.Datastream()
        ds.__setstate__(d)
        assert ds.unit_of_measurement.symbol == d["unitOfMeasurement"]["symbol"]
        assert ds.observation_type.endswith("OM_Measurement")
    thing = fsc.Thing()
    thing.__setstate__(server.all("Things")[0])
    assert thing.properties["lantern_id"] == "lantern:thing:SL-0001"
    sent = [json.loads(b) for b in server.array_bodies]
    rows = [row for body in sent for item in body for row in item["dataArray"]]
    components = sent[0][0]["components"]
    dav = DataArrayValue()
    dav.components = {DataArrayValue.Property.PHENOMENON_TIME, DataArrayValue.Property.RESULT,
                      DataArrayValue.Property.RESULT_TIME, DataArrayValue.Property.PARAMETERS}
    for o in server.all("Observations"):
        obs = fsc.Observation()
        obs.__setstate__({k: o[k] for k in ("phenomenonTime", "resultTime", "result",
                                            "parameters")})
        dav.add_observation(obs)
    order = dav.components
    theirs = sorted(json.dumps([r[order.index(c)] for c in components]) for r in dav.data_array)
    assert theirs == sorted(json.dumps(r) for r in rows)


def _config(tmp_path: Path, table: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text('[gateway]\nkeys_file = "keys.toml"\n\n[[links.serial]]\nport = "/dev/ttyUSB0"\n'
                 + table)
    return p


def test_config_loads_and_refuses_unknown_keys_with_their_line(tmp_path: Path) -> None:
    tok = tmp_path / "sta.token"
    tok.write_text("secret\n")
    tok.chmod(0o600)
    cfg = load_config(_config(tmp_path, '\n[sinks.sensorthings]\n'
                              'url = "https://frost.example/FROST-Server/v1.1"\n'
                              'token_file = "sta.token"\nbatch_observations = 200\n'))
    sta = cfg.sinks["sensorthings"]
    assert sta.token_file == tok and sta.batch_observations == 200
    with pytest.raises(ConfigError, match=r"line 9: sinks\.sensorthings\.batch: unknown key"):
        load_config(_config(tmp_path, '\n[sinks.sensorthings]\n'
                            'url = "https://frost.example/v1.1"\nbatch = 1\n'))
    with pytest.raises(ConfigError, match=r"line 8: sinks\.sensorthings\.url: .*ending in /v1\.1"):
        load_config(_config(tmp_path, '\n[sinks.sensorthings]\nurl = "https://frost.example/"\n'))
    tok.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(_config(tmp_path, '\n[sinks.sensorthings]\n'
                            'url = "https://frost.example/v1.1"\ntoken_file = "sta.token"\n'))


async def test_a_redirect_is_not_followed_and_a_node_without_a_place_is_counted(
        server: StaServer) -> None:
    async def moved(_request: web.Request) -> web.Response:
        return web.Response(status=301, headers={"Location": server.url + "/v1.1"})

    app = web.Application()
    app.router.add_get("/old/v1.1", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    recs = records(node="SL-0001") + records(node="SL-0099", seq=1)  # SL-0099: no [nodes]
    try:
        async with SensorThingsSink(SensorThingsSinkConfig(
                url=f"http://127.0.0.1:{port}/old/v1.1"), NODES) as sink:
            with pytest.raises(DeliveryError, match=r"301 redirect .* never follows"):
                await sink.send(batch(recs))
            assert sink.redirects == {301: 1} and server.requests == []
        async with SensorThingsSink(_cfg(server), NODES) as sink:
            await sink.send(batch(recs))
        assert sink.skipped == {"location": PER_PACK}
        assert {t["name"] for t in server.all("Things")} == {"SL-0001"}
        assert len(server.all("Observations")) == PER_PACK and server.rejected == []
    finally:
        await runner.cleanup()


async def test_a_flag_marks_its_own_frame_only_even_in_the_same_second(
        server: StaServer) -> None:
    """Two packs sealed in one second share a time: the flag belongs to its frame."""
    recs = [*records(node="SL-0001", seq=0), *records(node="SL-0001", seq=1),
            {"n": "urn:dev:lantern:SL-0001:pm10.q", "t": T0, "v": 8, "id": "SL-0001:1:99"}]
    async with SensorThingsSink(_cfg(server), NODES) as sink:
        await sink.send(batch(recs))
    pm10 = _observations_by_stream(server)["SL-0001 pm10"]
    assert [o["parameters"] for o in pm10] == [
        {"lantern_id": "SL-0001:0:7"},
        {"lantern_id": "SL-0001:1:7", "lantern_quality": 8, "lantern_flags": ["stuck"]}]


# ---------------------------------------------------------------- ids kept across restarts

FILTER_THING = "$filter=properties/lantern_id%20eq%20'lantern:thing:"


def _kept(state: Path) -> dict[str, object]:
    kept = state / "sensorthings.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    saved: dict[str, object] = json.loads(kept.read_text())
    return saved


def _misdirected(server: StaServer) -> list[str]:
    """Observations whose Datastream is not their own node's and measurement's."""
    names = {d["@iot.id"]: d["name"] for d in server.all("Datastreams")}
    out = []
    for o in server.all("Observations"):
        node, _, i = str(o["parameters"]["lantern_id"]).split(":")
        if names[o["Datastream@iot.id"]] != f"{node} {FULL[int(i)][0]}":
            out.append(str(o["parameters"]["lantern_id"]))
    return out


async def _restart(server: StaServer, persist: Path | None) -> StaServer:
    """The server stopped and started on the same URL (with its entities, or wiped)."""
    port = int(server.url.rsplit(":", 1)[1])
    await server.stop()
    again = StaServer(persist=persist)
    await again.start(port=port)
    return again


async def test_kept_ids_spare_the_lookups_after_a_gateway_restart(
        server: StaServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    async with SensorThingsSink(_cfg(server), NODES, state) as sink:
        await sink.send(batch(records(node="SL-0001") + records(node="SL-0002", seq=1)))
    saved = _kept(state)
    assert saved["root"] == server.url + "/v1.1"
    streams = {d["properties"]["lantern_id"]: d["@iot.id"] for d in server.all("Datastreams")}
    ids = saved["ids"]
    assert isinstance(ids, dict) and {k: ids[k] for k in streams} == streams
    counts = {s: len(server.sets[s]) for s in server.sets if s != "Observations"}

    before = len(server.requests)
    async with SensorThingsSink(_cfg(server), NODES, state) as again:
        await again.send(batch(records(node="SL-0001", seq=2) + records(node="SL-0002", seq=3)))
    lookups = [r for r in server.requests[before:] if "$filter" in r]
    assert len(lookups) == 1 and FILTER_THING + "SL-0001'" in lookups[0], lookups
    assert not again.created and not again.found and again.stale == 0
    assert {s: len(server.sets[s]) for s in server.sets if s != "Observations"} == counts
    assert len(server.all("Observations")) == 4 * PER_PACK and _misdirected(server) == []
    assert server.rejected == []


async def test_a_wiped_server_that_numbered_others_alike_gets_no_reading_misdirected(
        server: StaServer, tmp_path: Path) -> None:
    """After a wipe the server numbers from 1 again: another gateway's first entities take the
    ids this one kept. One $filter shows the kept Thing is gone; nothing kept is used."""
    state = tmp_path / "state"
    state.mkdir()
    async with SensorThingsSink(_cfg(server), NODES, state) as sink:
        await sink.send(batch(records(node="SL-0001")))
    kept = _kept(state)["ids"]
    assert isinstance(kept, dict)

    wiped = await _restart(server, None)
    try:
        async with SensorThingsSink(_cfg(wiped), NODES) as other:  # no kept ids
            await other.send(batch(records(node="SL-0002", seq=1)))
        # the wiped server gave SL-0002's entities the very ids SL-0001's had
        reused = {d["@iot.id"] for d in wiped.all("Datastreams")} & set(kept.values())
        assert reused
        async with SensorThingsSink(_cfg(wiped), NODES, state) as sink:
            await sink.send(batch(records(node="SL-0001", seq=2)))
        assert sink.stale == len(kept) and sink.created["Datastreams"] == PER_PACK
        assert _misdirected(wiped) == [] and wiped.rejected == []
        assert len(wiped.all("Things")) == 2 and len(wiped.all("Datastreams")) == 2 * PER_PACK
        now = _kept(state)["ids"]
        assert isinstance(now, dict)
        assert {d["@iot.id"] for d in wiped.all("Datastreams")
                if d["name"].startswith("SL-0001 ")} <= set(now.values())
    finally:
        await wiped.stop()


async def test_a_kept_id_the_server_refuses_is_dropped_and_looked_up_again(
        server: StaServer, tmp_path: Path) -> None:
    """An entity deleted on the server since: its kept id is refused once, then found again."""
    state = tmp_path / "state"
    state.mkdir()
    async with SensorThingsSink(_cfg(server), NODES, state) as sink:
        await sink.send(batch(records(node="SL-0001")))
    gone = next(d["@iot.id"] for d in server.all("Datastreams")
                if d["name"] == "SL-0001 temperature")
    del server.sets["Datastreams"][gone]
    async with SensorThingsSink(_cfg(server), NODES, state) as again:
        recs = records(node="SL-0001", seq=1)
        with pytest.raises(DeliveryError, match="HTTP 400"):
            await again.send(batch(recs))
        ids = _kept(state)["ids"]
        assert isinstance(ids, dict) and gone not in ids.values()  # not kept for a restart
        await again.send(batch(recs))  # the forwarder's retry
    assert again.created == {"Datastreams": 1}
    new = next(d["@iot.id"] for d in server.all("Datastreams")
               if d["name"] == "SL-0001 temperature")
    assert new != gone
    assert [o["parameters"]["lantern_id"] for o in server.all("Observations")
            if o["Datastream@iot.id"] == new] == ["SL-0001:1:0"]
    ids = [o["parameters"]["lantern_id"] for o in server.all("Observations")]
    assert len(ids) == len(set(ids)) == 2 * PER_PACK  # each once


async def test_an_unreadable_kept_file_is_said_once_and_replaced(
        server: StaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "sensorthings.json").write_text("{not json")
    async with SensorThingsSink(_cfg(server), NODES, state) as sink:
        await sink.send(batch(records(node="SL-0001")))
    assert sink.state is not None and sink.state.failures == 1
    assert sum("sensorthings.json: cannot read it" in r.message for r in caplog.records) == 1
    assert sink.created["Datastreams"] == PER_PACK and server.rejected == []
    ids = _kept(state)["ids"]
    assert isinstance(ids, dict) and len(ids) >= PER_PACK


@pytest.mark.parametrize("data_array", [True, False])
async def test_an_observation_the_server_refuses_is_left_out_not_retried_for_ever(
        tmp_path: Path, data_array: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A 4xx for one Observation (its Datastream still there) is a poison reading: counted,
    logged once, left out; the ids stay cached and every other reading is delivered."""
    server = StaServer(data_array=data_array, poison={"SL-0001:0:0", "SL-0002:1:0"})
    await server.start()
    try:
        cfg = SensorThingsSinkConfig(url=server.url + "/v1.1", partial_retries=1)
        async with Store(tmp_path / "q.sqlite") as store, \
                SensorThingsSink(cfg, NODES) as sink:
            street = Street(store)
            async with forwarding(store, sink, street) as fwd:
                await street.packs(2)
                await _until(lambda: fwd.delivered == 2 * 2 * PER_PACK)
            assert (await store.depth())[0] == 0
        assert sink.skipped == {"refused": 2}
        assert sink.created["Datastreams"] == 2 * PER_PACK and sink.found == {}  # kept
        ids = sorted(o["parameters"]["lantern_id"] for o in server.all("Observations"))
        assert len(ids) == 2 * 2 * PER_PACK - 2 and "SL-0001:0:0" not in ids
        assert sum("refuses its Observation" in r.message for r in caplog.records) == 1
    finally:
        await server.stop()


@pytest.mark.parametrize("location", [
    "http://elsewhere.example/v1.1/Things(1)",      # another host
    "/v1.1/Sensors(1)",                              # another entity set
    "/v1.1/Things(1)/Datastreams",                   # not an entity
    "/v1.1/Things(" + "9" * 30 + ")",                # no 64-bit id
    "/v1.1/Things('a/b')"])                          # no plain id
async def test_a_created_entity_located_elsewhere_is_a_failed_delivery(location: str) -> None:
    async def landing(_r: web.Request) -> web.Response:
        return web.json_response({"value": [], "serverSettings": {"conformance": []}})

    async def none(_r: web.Request) -> web.Response:
        return web.json_response({"value": []})

    async def created(_r: web.Request) -> web.Response:
        return web.json_response({"@iot.id": 1}, status=201, headers={"Location": location})

    app = web.Application()
    app.router.add_get("/v1.1", landing)
    app.router.add_get("/v1.1/{set}", none)
    app.router.add_post("/v1.1/{set}", created)
    async with TestServer(app) as upstream, \
            SensorThingsSink(SensorThingsSinkConfig(url=str(upstream.make_url("/v1.1"))),
                             NODES) as sink:
        with pytest.raises(DeliveryError, match=r"Location|id no client can use"):
            await sink.send(batch(records(node="SL-0001")))
        assert sink.created == {}
