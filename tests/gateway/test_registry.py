"""The fleet registry: records and states, revocation and retired keys refused by the real
ingest (counted by reason), /api/nodes and its CSV, Device entities through the real NGSI-LD
sink validated against the official Device schema with format checking."""

from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from lantern.agent import ngsi
from lantern.agent.api import Api, GatewayView
from lantern.agent.config import write_secret
from lantern.agent.registry import REGISTRY_FILE, Registry, key_id
from lantern.agent.sinks.ngsi_ld import NgsiLdSink, NgsiLdSinkConfig
from lantern.tools.field.provision_steps import merge_key
from lantern.tools.street.ngsi_broker import NgsiBroker
from tests.helpers import sdm
from tests.helpers.api import FakeForwarder, FakeLink
from tests.helpers.fleet import T0, Link, frame, gateway, send
from tests.helpers.fleet import broker as broker  # the fixture

pytestmark = pytest.mark.fleet

A, B = "SL-0001", "SL-0002"
KA, KB, KA_OLD = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))


def test_records_states_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    with Registry(path) as reg:
        assert reg.sync_keys({A.encode(): KA}, now=T0) == [f"{A}: added (key {key_id(KA)})"]
        r = reg.get(A)
        assert r is not None and r.state(T0) == "provisioned" and r.key_version == 1
        reg.observe({A: T0 + 10}, {A: "1.4.0"})
        r = reg.get(A)
        assert r is not None and (r.firmware, r.last_seen) == ("1.4.0", T0 + 10)
        assert r.state(T0 + 10 + 180) == "active" and r.state(T0 + 10 + 181) == "silent"
        # a new key in the key file (the old, manual flow): the old one is retired
        assert reg.sync_keys({A.encode(): KB}, now=T0 + 20) == [
            f"{A}: key {key_id(KB)} replaces {key_id(KA)} (retired)"]
        assert reg.refusal(A, KA) == "retired" and reg.refusal(A, KB) is None
        reg.revoke(A, "stolen", now=T0 + 30)
        assert reg.revoked(A) and reg.refusal(A, KB) == "revoked"
        assert reg.sync_keys({A.encode(): KB}) == [] and reg.revoked(A)  # a restart: still
        assert reg.sync_keys({A.encode(): KA}) == [] and reg.revoked(A)  # an old key: still
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Registry(path) as reg:  # kept across restarts
        r = reg.get(A)
        assert r is not None and r.state(T0) == "revoked" and r.revoked_why == "stolen"
        assert (r.key_id, r.key_version, r.retired) == (key_id(KB), 2, (key_id(KA),))
        # provisioning again (a new key) is the only way back
        reg.provisioned(A, key_id(KA_OLD), pole="9", now=T0 + 40)
        r = reg.get(A)
        assert r is not None and r.state(T0 + 40) == "provisioned" and r.key_version == 3


async def test_a_revoked_node_is_refused_and_counted_as_revoked(tmp_path: Path) -> None:
    link = Link()
    async with gateway(tmp_path, {A: KA, B: KB}) as (ingest, fleet, metrics, _):
        await send(ingest, link, frame(KA, A, 1))
        assert metrics.frames_received[A] == 1
    with Registry(tmp_path / "state" / REGISTRY_FILE) as reg:
        reg.revoke(A, "board stolen from pole 12")
    async with gateway(tmp_path, {A: KA, B: KB}) as (ingest, fleet, metrics, store):
        await send(ingest, link, frame(KA, A, 2))
        await send(ingest, link, frame(KB, B, 1))  # the other node is not touched
        assert metrics.frames_rejected["revoked"] == 1
        assert metrics.frames_received == {B: 1}
        # through /metrics, as Prometheus reads it
        view = GatewayView(metrics, store, [A, B], [FakeLink("serial")], [FakeForwarder()],
                           registry=fleet.registry)
        async with TestClient(TestServer(Api(view).app)) as client:
            text = await (await client.get("/metrics")).text()
            assert 'lantern_frames_rejected_total{reason="revoked"} 1.0' in text
            assert 'lantern_fleet_nodes{state="revoked"} 1.0' in text
            nodes = {n["id"]: n for n in (await (await client.get("/api/nodes")).json())["nodes"]}
            assert nodes[A]["state"] == "revoked" and "revoked" in nodes[A]["flags"]
            assert nodes[B]["state"] == "active" and nodes[B]["key_id"] == key_id(KB)
            rows = list(csv.DictReader(io.StringIO(
                await (await client.get("/api/nodes.csv")).text())))
            assert [(r["id"], r["state"], r["key_version"]) for r in rows] == [
                (A, "revoked", "1"), (B, "active", "1")]
            assert rows[0]["revoked_why"] == "board stolen from pole 12"


async def test_a_retired_key_brought_back_is_refused_as_retired(tmp_path: Path) -> None:
    """A laptop's old key file copied over the gateway's (what step 10 used to say): the
    node's retired key comes back, and its recorded frames must stay refused."""
    link = Link()
    async with gateway(tmp_path, {A: KA_OLD}) as (ingest, _, metrics, _s):
        await send(ingest, link, frame(KA_OLD, A, 5))
    recorded = frame(KA_OLD, A, 6)  # sealed, never delivered: an eavesdropper has it
    async with gateway(tmp_path, {A: KA}) as (ingest, _, metrics, _s):  # re-provisioned
        await send(ingest, link, frame(KA, A, 10))
        assert metrics.frames_received[A] == 1
    async with gateway(tmp_path, {A: KA_OLD}) as (ingest, _, metrics, _s):  # rolled back
        await send(ingest, link, recorded)
        assert metrics.frames_rejected == {"retired": 1}
        assert A not in metrics.frames_received


async def test_a_node_imported_while_running_is_taken_without_a_restart(
        tmp_path: Path) -> None:
    link = Link()
    async with gateway(tmp_path, {A: KA}) as (ingest, fleet, metrics, _):
        await send(ingest, link, frame(KB, B, 1))
        assert metrics.frames_rejected["unknown_node"] == 1
        keys_file = tmp_path / "keys.toml"
        write_secret(keys_file, merge_key(keys_file.read_text(), "k", B, KB))
        os.utime(keys_file, ns=(1, 1))  # a changed mtime, whatever the clock's resolution
        await fleet.tick({}, {}, None, [])
        await send(ingest, link, frame(KB, B, 2))
        assert metrics.frames_received[B] == 1
        assert B in fleet.node_ids
        r = fleet.registry.get(B)
        assert r is not None and r.key_id == key_id(KB)


async def test_device_entities_validate_and_carry_the_registry_state(
        tmp_path: Path, broker: NgsiBroker) -> None:
    """Through the real sink to the spec-following broker; what the broker holds, in the
    key-values form, against ../shared/data/smart-data-models/Device with format checking."""
    link = Link()
    async with gateway(tmp_path, {A: KA, B: KB}) as (ingest, fleet, metrics, _):
        fleet.registry.provisioned(A, key_id(KA), pole="12", lat=52.37, lon=4.89,
                                   board="esp32-devkitc")
        await send(ingest, link, frame(KA, A, 1))
        fleet.registry.revoke(B, "lost")
        cfg = NgsiLdSinkConfig(url=broker.url)
        async with NgsiLdSink(cfg, {}, firmware={A: "1.4.0"}) as sink:
            sink.registry = fleet.registry
            seen = {n: s.last_seen for n, s in metrics.nodes.items()}
            await fleet.tick(seen, {A: "1.4.0"}, None, [sink])
            pushed = broker.requests
            await fleet.tick(seen, {A: "1.4.0"}, None, [sink])
            assert broker.requests == pushed  # nothing changed: nothing sent again
    assert broker.rejected == []
    devices = {e["id"]: e for e in broker.entities.values() if e["type"] == "Device"}
    a, b = devices[f"urn:ngsi-ld:Device:lantern:{A}"], devices[f"urn:ngsi-ld:Device:lantern:{B}"]
    for e in (a, b):
        kv = ngsi.key_values({**e, "@context": ngsi.CONTEXTS})
        assert sdm.errors("Device", kv) == [], kv
    assert a["deviceState"]["value"] == "active"
    assert a["firmwareVersion"]["value"] == "1.4.0"
    assert a["location"]["value"] == {"type": "Point", "coordinates": [4.89, 52.37]}
    assert a["dateLastValueReported"]["value"]["@value"].endswith("Z")
    assert a["controlledProperty"]["value"]
    assert b["deviceState"]["value"] == "revoked"


def test_format_checking_is_on() -> None:
    """The validator really checks formats: a date-time that is not one is refused."""
    e: dict[str, Any] = ngsi.device_entity(A, "active", T0, last_seen=T0)
    kv = ngsi.key_values(e)
    assert sdm.errors("Device", kv) == []
    kv["dateLastValueReported"] = "yesterday"
    assert any("date-time" in err for err in sdm.errors("Device", kv))
