"""The firmware version upstream in SenML over HTTP (agent/sinks/http.py; docs/updates.md, "Where
the version shows"): one record `urn:dev:lantern:<node>:firmware` with `vs` in every batch that
holds the node's readings, made from the batch alone (its time: the node's newest reading in the
batch), so a batch sent again, after a restart too, is the same bytes under the same
Idempotency-Key, and a key never goes with two bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lantern.agent.queue.resolve import Batch
from lantern.agent.sinks import http
from lantern.agent.sinks.http import HttpSink, HttpSinkConfig
from lantern.tools.street.upstream import Upstream

pytestmark = pytest.mark.ota


def batch(first: int, readings: list[tuple[str, int]]) -> Batch:
    """A batch of temperature readings (node, seq), as the queue resolves them."""
    items, rids = [], []
    for node, seq in readings:
        rid = f"{node}:{seq}:0"
        rids.append(rid)
        items.append(json.dumps({"id": rid, "n": f"urn:dev:lantern:{node}:temperature",
                                 "t": 1.7e9 + seq, "u": "Cel", "v": 20.5},
                                separators=(",", ":")))
    return Batch(first, first + len(items) - 1, 0.0, rids, items)


class Recording(Upstream):
    """The stock receiver, keeping each POST's key and body, those it answers with an error
    (fail_next) too."""

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[str, bytes]] = []

    @property
    def bodies(self) -> list[list[dict[str, Any]]]:
        return [json.loads(raw) for _, raw in self.posts]

    async def _post(self, request: Any) -> Any:
        self.posts.append((request.headers.get("Idempotency-Key", ""), await request.read()))
        return await super()._post(request)

    async def __aenter__(self) -> Recording:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[Recording]:
    async with Recording() as up:
        yield up


def firmware_of(body: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["n"]: r for r in body if r["n"].endswith(":firmware")}


async def test_every_batch_with_a_nodes_readings_carries_its_version_as_a_string_record(
        upstream: Recording, tmp_path: Path) -> None:
    fw = {"SL-0001": "2.0.0", "SL-0002": "1.9.0"}
    async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
        await sink.send(batch(1, [("SL-0001", 1), ("SL-0003", 1)]))
        await sink.send(batch(3, [("SL-0001", 2), ("SL-0002", 1)]))
        fw["SL-0001"] = "2.1.0"  # the rollout reached it
        await sink.send(batch(5, [("SL-0001", 3)]))
    first, second, third = (firmware_of(b) for b in upstream.bodies)
    # only nodes with readings in the batch, only known versions (SL-0003 has none)
    assert list(first) == ["urn:dev:lantern:SL-0001:firmware"]
    rec = first["urn:dev:lantern:SL-0001:firmware"]
    assert list(rec) == ["n", "vs", "t", "id"] and rec["vs"] == "2.0.0"
    assert rec["t"] == 1.7e9 + 1  # an absolute time (RFC 8428 §4.5.3): its newest reading's
    assert rec["id"] == "SL-0001:firmware:2.0.0"
    assert sorted(second) == ["urn:dev:lantern:SL-0001:firmware",
                              "urn:dev:lantern:SL-0002:firmware"]
    assert third["urn:dev:lantern:SL-0001:firmware"]["vs"] == "2.1.0"
    assert upstream.duplicates == 0
    # the readings themselves are untouched
    assert sum(1 for b in upstream.bodies for r in b if r["n"].endswith(":temperature")) == 5
    assert upstream.firmware["SL-0001:firmware:2.1.0"]["t"] == 1.7e9 + 3


def test_the_record_is_made_from_the_batch_alone() -> None:
    """Its time is the node's newest reading in the batch, whatever the order; the same batch
    always gives the same bytes and the same key; a batch without a known version keeps the
    key of its readings."""
    b = batch(1, [("SL-0001", 7), ("SL-0002", 1), ("SL-0001", 9), ("SL-0001", 8)])
    fw = {"SL-0001": "2.0.0"}
    records = http.firmware_records(b, fw)
    assert list(records) == ["SL-0001"]
    assert json.loads(records["SL-0001"])["t"] == 1.7e9 + 9
    assert http.firmware_records(b, dict(fw)) == records
    extra = list(records.values())
    assert http.idempotency_key(b, extra) == http.idempotency_key(b, list(extra))
    assert http.idempotency_key(b, extra) != http.idempotency_key(b)  # another body
    assert http.idempotency_key(b, []) == http.idempotency_key(b)
    assert http.firmware_records(b, {"SL-0003": "1.0.0"}) == {}


async def test_a_retried_batch_carries_the_same_bytes(upstream: Recording,
                                                      tmp_path: Path) -> None:
    fw = {"SL-0001": "2.0.0"}
    b = batch(1, [("SL-0001", 1)])
    upstream.fail_next = [503]
    async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
        with pytest.raises(http.DeliveryError):
            await sink.send(b)
        fw["SL-0001"] = "2.0.1"  # known between the two attempts: the retry stays the same
        await sink.send(b)
        await sink.send(batch(2, [("SL-0001", 2)]))  # now the newer version follows
    (k1, b1), (k2, b2), _ = upstream.posts
    assert (k1, b1) == (k2, b2)
    assert firmware_of(upstream.bodies[0])["urn:dev:lantern:SL-0001:firmware"]["vs"] == "2.0.0"
    assert firmware_of(upstream.bodies[2])["urn:dev:lantern:SL-0001:firmware"]["vs"] == "2.0.1"


async def test_a_batch_sent_again_after_a_restart_is_the_same_request(
        upstream: Recording, tmp_path: Path) -> None:
    """Delivered, then the gateway stops before the queue forgets the batch (a crash between
    the 2xx and the delete): after the restart the same readings go again as the same bytes
    under the same key, which the upstream recognises."""
    fw = {"SL-0001": "2.0.0"}
    for _ in range(2):
        async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
            await sink.send(batch(1, [("SL-0001", 1), ("SL-0001", 2)]))
    (k1, b1), (k2, b2) = upstream.posts
    assert (k1, b1) == (k2, b2)
    assert upstream.conflicting == 0


async def test_a_version_changed_across_a_restart_never_reuses_the_key(
        upstream: Recording, tmp_path: Path) -> None:
    """The one case where a batch sent again differs: its node's version changed between the
    attempt and the restart. The other body goes under another key (a new request, its
    readings recognisable upstream by their ids), never under the key already used."""
    fw = {"SL-0001": "2.0.0"}
    upstream.fail_next = [503]
    async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
        with pytest.raises(http.DeliveryError):
            await sink.send(batch(1, [("SL-0001", 1)]))
    fw["SL-0001"] = "2.0.1"
    async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
        await sink.send(batch(1, [("SL-0001", 1)]))
    (k1, b1), (k2, b2) = upstream.posts
    assert b1 != b2 and k1 != k2


def test_the_plugin_hands_the_sink_the_gateways_firmware_map(tmp_path: Path) -> None:
    from lantern.agent.plugins import SinkContext

    fw = {"SL-0001": "2.0.0"}
    sink = http.PLUGIN.open(HttpSinkConfig(url="http://127.0.0.1:1/senml"),
                            SinkContext({}, tmp_path, fw))
    assert isinstance(sink, HttpSink) and sink.firmware is fw
