"""The firmware version upstream in SenML over HTTP (agent/sinks/http.py; docs/updates.md, "Where
the version shows"): one record `urn:dev:lantern:<node>:firmware` with `vs`, once per version,
the same bytes on a retry, never twice across a restart, never for a node without readings in
the batch."""

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
    """The stock receiver, keeping each POST's body."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[list[dict[str, Any]]] = []
        self.raw: list[bytes] = []

    async def _post(self, request: Any) -> Any:
        raw = await request.read()
        if not self.fail_next:
            self.raw.append(raw)
            self.bodies.append(json.loads(raw))
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


async def test_a_known_version_goes_upstream_once_as_a_string_record(
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
    assert set(rec) == {"n", "vs", "t", "id"} and rec["vs"] == "2.0.0"
    assert isinstance(rec["t"], float) and rec["t"] > 1.7e9  # an absolute time (RFC 8428)
    assert rec["id"] == "SL-0001:firmware:2.0.0"
    assert list(second) == ["urn:dev:lantern:SL-0002:firmware"]  # SL-0001's: sent already
    assert third["urn:dev:lantern:SL-0001:firmware"]["vs"] == "2.1.0"
    assert upstream.duplicates == 0
    # the readings themselves are untouched
    assert sum(1 for b in upstream.bodies for r in b if r["n"].endswith(":temperature")) == 5


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
    assert len(upstream.raw) == 2
    assert firmware_of(upstream.bodies[0])["urn:dev:lantern:SL-0001:firmware"]["vs"] == "2.0.0"
    assert firmware_of(upstream.bodies[1])["urn:dev:lantern:SL-0001:firmware"]["vs"] == "2.0.1"


async def test_a_restart_does_not_send_a_delivered_version_again(upstream: Recording,
                                                                 tmp_path: Path) -> None:
    fw = {"SL-0001": "2.0.0"}
    async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
        await sink.send(batch(1, [("SL-0001", 1)]))
    async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
        await sink.send(batch(2, [("SL-0001", 2)]))
    assert [len(firmware_of(b)) for b in upstream.bodies] == [1, 0]
    assert upstream.duplicates == 0 and upstream.conflicting == 0


async def test_an_unreadable_state_file_sends_the_versions_again_and_says_so(
        upstream: Recording, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fw = {"SL-0001": "2.0.0"}
    async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
        await sink.send(batch(1, [("SL-0001", 1)]))
    (state,) = tmp_path.glob("http-firmware-*.json")
    state.write_text("{not json")
    async with HttpSink(HttpSinkConfig(url=upstream.url), fw, tmp_path) as sink:
        await sink.send(batch(2, [("SL-0001", 2)]))
    assert [len(firmware_of(b)) for b in upstream.bodies] == [1, 1]
    assert "unreadable" in caplog.text


def test_the_plugin_hands_the_sink_the_gateways_firmware_map(tmp_path: Path) -> None:
    from lantern.agent.plugins import SinkContext

    fw = {"SL-0001": "2.0.0"}
    sink = http.PLUGIN.open(HttpSinkConfig(url="http://127.0.0.1:1/senml"),
                            SinkContext({}, tmp_path, fw))
    assert isinstance(sink, HttpSink) and sink.firmware is fw
