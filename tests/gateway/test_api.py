"""The local API (agent/api.py) over a real SQLite store: health, Prometheus, nodes, readings."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

import lantern
from lantern.agent.api import Api, ApiServer, GatewayView, parse_since
from lantern.agent.config import ApiConfig
from lantern.agent.metrics import LATENCY_BUCKETS, REJECT_REASONS, SKIP_REASONS, Metrics, TimedSink
from lantern.agent.queue.history import History, find_gaps, typical_interval
from lantern.agent.queue.store import Store
from tests.helpers.api import FakeForwarder, FakeLink, commit, pack

NODES = ["SL-0001", "SL-0002", "SL-0003"]
T0 = 1.7e9  # sample times of the fixture readings (2023): long before "now"










@dataclass
class Rig:
    store: Store
    metrics: Metrics
    links: list[FakeLink]
    forwarders: list[FakeForwarder]
    view: GatewayView
    client: TestClient[Any, Any]


async def _rig(tmp_path: Path, token: str | None = None) -> AsyncIterator[Rig]:
    async with Store(tmp_path / "queue.sqlite") as store:
        metrics = Metrics()
        links = [FakeLink("serial:/dev/ttyUSB0", True, 1200, 300),
                 FakeLink("serial:/dev/ttyUSB1", True, 0, 0)]
        fwd = [FakeForwarder()]
        view = GatewayView(metrics, store, NODES[:2], links, fwd,
                           [store.path, store.path.with_name(store.path.name + "-wal")])
        api = Api(view, token)
        async with TestClient(TestServer(api.app)) as client:
            yield Rig(store, metrics, links, fwd, view, client)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for r in _rig(tmp_path):
        yield r


@pytest.fixture
async def locked(tmp_path: Path) -> AsyncIterator[Rig]:
    async for r in _rig(tmp_path, token="s3cret-token"):
        yield r


async def fill(rig: Rig, n: int = 10, step: float = 2.0, gap_at: int | None = None) -> None:
    """SL-0001: n packs every `step` s (one gap of 5 steps after pack gap_at); SL-0002: one."""
    frames = []
    t = T0
    for seq in range(n):
        frames.append(pack("SL-0001", seq, t, {"temperature": 10.0 + seq, "outbox": seq % 3,
                                               "battery_v": 3.7}))
        t += step * (6 if seq == gap_at else 1)
    await commit(rig.store, frames)
    await commit(rig.store, [pack("SL-0002", 0, T0, {"temperature": 21.5, "pm_status": "fault",
                                                     "outbox": 25})])
    rig.metrics.seen("SL-0001", "serial:/dev/ttyUSB0", n - 1)
    rig.metrics.seen("SL-0002", "serial:/dev/ttyUSB1", 0)


# ---------------------------------------------------------------- /healthz


async def test_healthz_ready_when_store_answers_and_a_link_is_up(rig: Rig) -> None:
    await fill(rig)
    r = await rig.client.get("/healthz")
    body = await r.json()
    assert r.status == 200
    assert body["status"] == "ok" and body["ready"] is True and body["live"] is True
    assert body["version"] == lantern.__version__  # written once, firmware/node/app.py
    assert body["links"]["up"] == 2 and body["links"]["total"] == 2
    assert body["queue"]["readings"] == 10 * 3 + 3
    assert body["upstream"] == {"http": "ok"}


async def test_healthz_degraded_when_upstream_fails_or_a_link_is_down(rig: Rig) -> None:
    rig.forwarders[0].upstream_ok = False
    r = await rig.client.get("/healthz")
    assert r.status == 200 and (await r.json())["status"] == "degraded"
    rig.forwarders[0].upstream_ok = True
    rig.links[1].connected = False
    rig.view._cache = None
    body = await (await rig.client.get("/healthz")).json()
    assert body["status"] == "degraded" and body["links"]["up"] == 1


async def test_healthz_degraded_while_intake_is_paused_at_the_cap(rig: Rig) -> None:
    rig.store.cap.paused = True
    body = await (await rig.client.get("/healthz")).json()
    assert body["status"] == "degraded" and body["intake"].startswith("paused")


async def test_a_slow_store_is_asked_less_often(rig: Rig, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    real = rig.store.overview
    clock = [1000.0]
    calls = 0

    async def slow() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        clock[0] += 0.1  # as a scan of a long backlog would take
        return await real()

    monkeypatch.setattr(rig.store, "overview", slow)
    monkeypatch.setattr("lantern.agent.api.time.monotonic", lambda: clock[0])
    await rig.view.overview()
    clock[0] += 1.5  # past the usual 1 s, within 20 x 0.1 s
    await rig.view.overview()
    assert calls == 1
    clock[0] += 0.6
    await rig.view.overview()
    assert calls == 2


async def test_healthz_unready_with_every_link_down(rig: Rig) -> None:
    for link in rig.links:
        link.connected = False
    r = await rig.client.get("/healthz")
    assert r.status == 503
    assert (await r.json())["ready"] is False


# ---------------------------------------------------------------- /metrics


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_in_prometheus_text_format(rig: Rig) -> None:
    await fill(rig)
    m = rig.metrics
    m.frames_received.update({"SL-0001": 10, "SL-0002": 1})
    m.frames_rejected.update({"crc": 3, "mac": 2, "brand_new_reason": 1})
    m.duplicates["SL-0001"] = 4
    rig.store.cap.evicted = 7
    sink = TimedSink(SimpleNamespace(name="http", send=_ok_send), m)
    await sink.send(None)
    await sink.send(None)
    failing = TimedSink(SimpleNamespace(name="http", send=_failing_send), m)
    with pytest.raises(RuntimeError):
        await failing.send(None)
    r = await rig.client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    s = scrape(await r.text())
    assert s[("lantern_frames_received_total", (("node", "SL-0001"),))] == 10
    # every known reason is exported (0 until it happens), unknown ones too
    for reason in REJECT_REASONS:
        want = {"crc": 3, "mac": 2}.get(reason, 0)
        assert s[("lantern_frames_rejected_total", (("reason", reason),))] == want
    assert s[("lantern_frames_rejected_total", (("reason", "brand_new_reason"),))] == 1
    assert s[("lantern_frames_duplicate_total", (("node", "SL-0001"),))] == 4
    assert s[("lantern_evictions_total", ())] == 7
    # the queue as SQLite sees it, read independently
    n, size, oldest = _raw(rig.store.path, "SELECT sum(readings), sum(length(body)),"
                                           " min(received_at) FROM frames")[0]
    assert s[("lantern_queue_readings", ())] == n == 33
    assert s[("lantern_queue_bytes", ())] == size
    age = s[("lantern_queue_oldest_age_seconds", ())]
    assert 0 < age <= time.time() - oldest + 1
    assert s[("lantern_store_file_bytes", ())] >= rig.store.path.stat().st_size
    assert s[("lantern_link_up", (("link", "serial:/dev/ttyUSB0"),))] == 1
    assert s[("lantern_link_received_bytes_total", (("link", "serial:/dev/ttyUSB0"),))] == 1200
    assert s[("lantern_upstream_up", (("sink", "http"),))] == 1
    # readings a sink leaves out, every reason at 0 from the start (a sink without the
    # attribute counts nothing)
    rig.forwarders[0].sink.skipped = Counter({"topic": 2})
    s = scrape(await (await rig.client.get("/metrics")).text())
    for reason in SKIP_REASONS:
        assert s[("lantern_sink_skipped_readings_total",
                  (("reason", reason), ("sink", "http")))] == (2 if reason == "topic" else 0)
    ok = (("outcome", "ok"), ("sink", "http"))
    err = (("outcome", "error"), ("sink", "http"))
    assert s[("lantern_upstream_request_duration_seconds_count", ok)] == 2
    assert s[("lantern_upstream_request_duration_seconds_count", err)] == 1
    inf = (("le", "+Inf"), *ok)
    assert s[("lantern_upstream_request_duration_seconds_bucket", tuple(sorted(inf)))] == 2
    assert len([k for k in s if k[0] == "lantern_upstream_request_duration_seconds_bucket"]) \
        == 2 * (len(LATENCY_BUCKETS) + 1)
    seen = s[("lantern_node_last_seen_timestamp_seconds", (("node", "SL-0001"),))]
    assert abs(seen - rig.metrics.nodes["SL-0001"].last_seen) < 1e-3
    assert ("lantern_node_last_seen_timestamp_seconds", (("node", "SL-0003"),)) not in s
    assert s[("lantern_nodes_configured", ())] == 2
    assert s[("lantern_history_samples", ())] == 11  # 10 of SL-0001, 1 of SL-0002
    assert ("process_resident_memory_bytes", ()) in s


async def test_metrics_openmetrics_when_asked(rig: Rig) -> None:
    r = await rig.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await r.text()).rstrip().endswith("# EOF")


async def _ok_send(batch: object) -> None:
    return None


async def _failing_send(batch: object) -> None:
    raise RuntimeError("upstream said no")


def _raw(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# ---------------------------------------------------------------- /api/nodes


async def test_nodes_table_fields(rig: Rig) -> None:
    await fill(rig)
    body = await (await rig.client.get("/api/nodes")).json()
    nodes = {n["id"]: n for n in body["nodes"]}
    assert sorted(nodes) == ["SL-0001", "SL-0002"]
    a = nodes["SL-0001"]
    assert a["link"] == "serial:/dev/ttyUSB0" and a["last_seq"] == 9
    assert a["battery"] == {"n": "battery_v", "t": T0 + 18, "u": "V", "v": 3.7}
    assert a["outbox"] == 9 % 3 and isinstance(a["outbox"], int)
    assert a["latest"]["temperature"]["v"] == 19.0
    assert a["interval_s"] == 2.0
    assert a["flags"] == []  # seen just now (metrics.seen), no backlog
    assert a["frames_total"] == 10
    b = nodes["SL-0002"]
    assert "pm_status: fault" in b["flags"] and "backlog" in b["flags"]


async def test_quality_bits_of_the_newest_sample_become_flags(rig: Rig) -> None:
    await commit(rig.store, [
        pack("SL-0001", 0, T0, {"pm1": 5.0, "pm1.q": 128 | 16, "temperature": 1.0,
                                "temperature.q": 2}),
        # the next sample: pm1 warming up and stuck, co2 merely slower than the interval,
        # temperature fine again (no .q record at all)
        pack("SL-0001", 1, T0 + 2, {"pm1": 5.0, "pm1.q": 1 | 8, "co2.q": 4,
                                    "temperature": 1.5})])
    rig.metrics.seen("SL-0001", "serial:/dev/ttyUSB0", 1)
    node = await (await rig.client.get("/api/nodes/SL-0001")).json()
    assert node["flags"] == ["pm1: warmup, stuck"]


async def test_never_seen_and_stale_nodes_are_flagged(rig: Rig) -> None:
    rig.view.node_ids = NODES  # SL-0003 has a key but never spoke
    await commit(rig.store, [pack("SL-0002", 0, T0, {"temperature": 1.0})])
    # SL-0002 was last seen by the store (an earlier run) long ago
    db = sqlite3.connect(rig.store.path)
    db.execute("UPDATE nodes SET last_seen = ? WHERE node = 'SL-0002'", (time.time() - 7200,))
    db.commit()
    db.close()
    nodes = {n["id"]: n for n in (await (await rig.client.get("/api/nodes")).json())["nodes"]}
    assert nodes["SL-0003"]["flags"] == ["never seen"] and nodes["SL-0003"]["last_seen"] is None
    assert "stale" in nodes["SL-0002"]["flags"]
    assert 7100 < nodes["SL-0002"]["age_s"] < 7300


async def test_one_node_and_unknown_node(rig: Rig) -> None:
    await fill(rig)
    r = await rig.client.get("/api/nodes/SL-0001")
    assert r.status == 200 and (await r.json())["id"] == "SL-0001"
    r = await rig.client.get("/api/nodes/SL-9999")
    assert r.status == 404 and "SL-9999" in await r.text()
    r = await rig.client.get("/api/nodes/SL-9999/readings")
    assert r.status == 404


# ---------------------------------------------------------------- readings


async def test_readings_since_filters_by_sample_time(rig: Rig) -> None:
    await fill(rig)
    r = await rig.client.get("/api/nodes/SL-0001/readings",
                             params={"since": str(T0 + 13), "name": "temperature"})
    body = await r.json()
    assert [x["t"] for x in body["readings"]] == [T0 + 14, T0 + 16, T0 + 18]
    assert [x["v"] for x in body["readings"]] == [17.0, 18.0, 19.0]
    assert body["readings"][0] == {"n": "temperature", "t": T0 + 14, "u": "Cel", "v": 17.0}
    assert body["more"] is False and body["next_since"] == T0 + 18


async def test_readings_pages_cover_everything_once(rig: Rig) -> None:
    await fill(rig, n=40)
    got: list[tuple[str, float]] = []
    since = T0 - 1
    for _ in range(50):
        body = await (await rig.client.get("/api/nodes/SL-0001/readings",
                                           params={"since": str(since), "limit": "7"})).json()
        got += [(x["n"], x["t"]) for x in body["readings"]]
        assert len(body["readings"]) <= 7
        since = body["next_since"]
        if not body["more"]:
            break
    want = [(n, T0 + 2 * i) for i in range(40) for n in ("battery_v", "outbox", "temperature")]
    assert sorted(got, key=lambda x: (x[1], x[0])) == want
    assert len(got) == len(set(got))


async def test_readings_iso_and_relative_since(rig: Rig) -> None:
    await fill(rig)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 15))
    body = await (await rig.client.get("/api/nodes/SL-0001/readings",
                                       params={"since": iso, "name": "outbox"})).json()
    assert [x["t"] for x in body["readings"]] == [T0 + 16, T0 + 18]
    now = time.time()
    assert abs(parse_since("-900", now) - (now - 900)) < 1e-6
    assert parse_since(None, now) == now - 3600


async def test_readings_bad_since_is_a_400_saying_why(rig: Rig) -> None:
    await fill(rig)
    r = await rig.client.get("/api/nodes/SL-0001/readings", params={"since": "yesterday"})
    assert r.status == 400 and "since" in await r.text()
    r = await rig.client.get("/api/nodes/SL-0001/readings", params={"limit": "many"})
    assert r.status == 400 and "limit" in await r.text()


async def test_readings_report_gaps(rig: Rig) -> None:
    await fill(rig, n=12, gap_at=5)  # pack 5 at T0+10, pack 6 at T0+22
    body = await (await rig.client.get("/api/nodes/SL-0001/readings",
                                       params={"since": str(T0 - 1)})).json()
    assert body["interval_s"] == 2.0
    # closed gap, then an open one: nothing since the last sample (T0 + 32, long ago)
    assert body["gaps"] == [[T0 + 10, T0 + 22], [T0 + 32, None]]
    # a page that starts after the gap's start still sees it
    body = await (await rig.client.get("/api/nodes/SL-0001/readings",
                                       params={"since": str(T0 + 11)})).json()
    assert body["gaps"][0] == [T0 + 10, T0 + 22]


def test_gap_finder() -> None:
    assert typical_interval([0, 2, 4, 6, 20, 22]) == 2
    assert typical_interval([5.0]) is None
    assert find_gaps([0, 2, 4, 6, 20, 22], 2) == [(6, 20)]
    assert find_gaps([0, 1, 2, 3, 4], 1) == []  # int-second jitter is not a gap
    assert find_gaps([0, 1, 2, 6], 1) == [(2, 6)]
    assert find_gaps([0, 60, 120, 181], 60) == []
    assert find_gaps([0, 60, 300], 60) == [(60, 300)]
    assert find_gaps([0, 10], None) == []


# ---------------------------------------------------------------- the recent-readings table


async def test_recent_rows_come_from_committed_frames_only(rig: Rig) -> None:
    """A commit that fails leaves nothing for the history; one that works, one row per
    sample once the frame is resolved (here: the API asking), none in the commit itself."""
    f = pack("SL-0001", 0, T0, {"temperature": 1.0})
    with pytest.raises(KeyError):
        await rig.store.commit([f], {})  # no window for the node: fails inside the transaction
    assert _raw(rig.store.path, "SELECT count(*) FROM frames") == [(0,)]
    await rig.store.overview()
    assert _raw(rig.store.path, "SELECT count(*) FROM recent") == [(0,)]
    await commit(rig.store, [f])
    assert _raw(rig.store.path, "SELECT count(*) FROM recent") == [(0,)]
    await rig.store.overview()
    [(node, t, text)] = _raw(rig.store.path, "SELECT node, t, body FROM recent")
    assert (node, t) == ("SL-0001", T0)
    assert json.loads(text) == [{"n": "temperature", "u": "Cel", "v": 1.0}]


async def test_recent_survives_delivery_and_is_trimmed(tmp_path: Path) -> None:
    async with Store(tmp_path / "q.sqlite") as store:
        store.history = History(keep_s=3600, max_rows=25)  # rows: samples, 2 readings each
        await commit(store, [pack("SL-0001", i, T0 + i, {"a": i, "b": i}) for i in range(20)])
        batch = await store.next_batch(1000)
        assert batch is not None
        await store.delivered_to("http", batch, ["http"])
        assert (await store.overview())["queue_readings"] == 0
        rows, more, _ = await store.recent("SL-0001", 0, 1000)
        assert len(rows) == 40 and not more  # delivered, still shown
        # the count bound: 15 more samples → only the newest 25 stay (trimmed as rows are written)
        store.history._last_trim = 0
        await commit(store, [pack("SL-0001", 20 + i, T0 + 20 + i, {"a": i, "b": i})
                             for i in range(15)])
        rows, _, _ = await store.recent("SL-0001", 0, 1000)
        assert len(rows) == 50 and rows[0]["t"] == T0 + 10
        # the age bound: rows received more than keep_s ago go
        db = store.db
        db.execute("UPDATE recent SET received_at = received_at - 7200 WHERE t < ?",
                   (T0 + 30,))
        store.history._last_trim = 0
        await commit(store, [pack("SL-0001", 99, T0 + 99, {"a": 1})])
        rows, _, _ = await store.recent("SL-0001", 0, 1000)
        assert next(r["t"] for r in rows) == T0 + 30
        # the newest values outlive the trimmed rows
        latest = (await store.overview())["latest"]["SL-0001"]
        assert latest["a"]["t"] == T0 + 99 and latest["b"]["t"] == T0 + 34


# ---------------------------------------------------------------- token, page, server


async def test_token_guards_data_not_health_or_page(locked: Rig) -> None:
    c = locked.client
    for path in ("/metrics", "/api/nodes", "/api/status", "/api/nodes/SL-0001/readings"):
        r = await c.get(path)
        assert r.status == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = await c.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status == 401, path
    r = await c.get("/api/nodes", headers={"Authorization": "Bearer s3cret-token"})
    assert r.status == 200
    assert (await c.get("/healthz")).status == 200
    assert (await c.get("/")).status == 200


async def test_status_page_files_are_local(rig: Rig) -> None:
    kinds = {"/": "text/html", "/status.js": "text/javascript", "/status.css": "text/css"}
    for path, kind in kinds.items():
        r = await rig.client.get(path)
        assert r.status == 200 and r.content_type == kind
        text = await r.text()
        # offline: nothing fetched from elsewhere (the SVG namespace is a name, not a fetch)
        urls = re.findall(r"(?:https?:)?//[\w.-]+", text.replace("http://www.w3.org/2000/svg",
                                                                   ""))
        assert [u for u in urls if not u.startswith("//")] == [], (path, urls)
    html = await (await rig.client.get("/")).text()
    assert 'src="status.js"' in html and 'href="status.css"' in html


async def test_status_summary(rig: Rig) -> None:
    await fill(rig)
    body = await (await rig.client.get("/api/status")).json()
    assert body["summary"].startswith("2/2 nodes seen, 2/2 links up, queue 33")
    assert body["queue"]["readings"] == 33
    assert body["upstream"] == {"http": {"state": "ok"}}
    assert [link["name"] for link in body["links"]] == ["serial:/dev/ttyUSB0",
                                                       "serial:/dev/ttyUSB1"]


async def test_port_in_use_is_reported_not_fatal(rig: Rig) -> None:
    first = ApiServer(ApiConfig(port=0), rig.view)
    async with first:
        port = int(first.url.rsplit(":", 1)[1].strip("/"))
        second = ApiServer(ApiConfig(port=port), rig.view)
        async with second:
            assert second.url == ""
            assert second.error and str(port) in second.error and "[api] port" in second.error


async def test_disabled_api_does_not_listen(rig: Rig) -> None:
    async with ApiServer(ApiConfig(enabled=False), rig.view) as s:
        assert s.url == "" and s.error is None


async def test_server_answers_the_names_its_config_allows(rig: Rig) -> None:
    """ApiServer hands [api] to the Host rule: loopback names and allowed_hosts, nothing else."""
    cfg = ApiConfig(port=0, allowed_hosts=("cab7.example",))
    got = {}
    async with ApiServer(cfg, rig.view) as s, aiohttp.ClientSession() as http:
        for host in ("localhost:1", "cab7.example", "rebound.example"):
            async with http.get(s.url + "api/nodes", headers={"Host": host}) as r:
                got[host] = r.status
                assert r.headers["X-Frame-Options"] == "DENY"
    assert got == {"localhost:1": 200, "cab7.example": 200, "rebound.example": 421}
    assert rig.metrics.api_refused["host"] == 1
