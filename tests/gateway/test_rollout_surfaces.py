"""How operators and platforms see a rollout: [updates] config, the local API, /metrics,
the node table, NGSI-LD Device.firmwareVersion and the MQTT firmware message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from lantern.agent import ngsi
from lantern.agent.cli import describe
from lantern.agent.config import UpdatesConfig, load_config
from lantern.agent.errors import ConfigError
from lantern.agent.ota.rollout import RolloutManager
from lantern.agent.sinks.mqtt import MqttSink, MqttSinkConfig
from tests.helpers import sdm
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.ngsi import NODES as NGSI_NODES
from tests.helpers.ngsi import batch, records
from tests.helpers.rollout import Street, api_with_rollout, make_bundle, write_pub

pytestmark = pytest.mark.ota

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Rig:
    def __init__(self, client: TestClient[Any, Any], manager: RolloutManager,
                 street: Street, key: Ed25519PrivateKey) -> None:
        self.client, self.manager, self.street, self.key = client, manager, street, key

    async def post_bundle(self, bundle: bytes, query: str = "", **headers: str) -> Any:
        return await self.client.post(
            "/api/rollout" + query, data=bundle,
            headers={**AUTH, "Content-Type": "application/octet-stream", **headers})


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    street = Street(gates={"SL-0002": asyncio.Event()})
    async with api_with_rollout(tmp_path, street, TOKEN) as (app, manager, key), \
            TestClient(TestServer(app)) as client:
        yield Rig(client, manager, street, key)


async def test_start_status_and_halt_over_the_api(rig: Rig) -> None:
    r = await rig.post_bundle(make_bundle(rig.key), "?canary=SL-0002,SL-0003&step=2")
    assert r.status == 201, await r.text()
    body = await r.json()
    ro = body["rollout"]
    assert ro["state"] == "running" and ro["version"] == "0.2.0"
    assert ro["canary"] == ["SL-0002", "SL-0003"] and ro["step"] == 2
    await rig.street.ev("SL-0002").wait()
    again = await rig.post_bundle(make_bundle(rig.key))
    assert again.status == 409 and (await again.json())["kind"] == "busy"
    st = await (await rig.client.get("/api/rollout", headers=AUTH)).json()
    nodes = {p["node"]: p["state"] for p in st["rollout"]["nodes"]}
    assert nodes["SL-0002"] == "transferring" and nodes["SL-0004"] == "pending"
    halt = await rig.client.post("/api/rollout/halt", json={"reason": "wrong build"},
                                 headers=AUTH)
    assert halt.status == 200
    ro = (await halt.json())["rollout"]
    assert ro["state"] == "halted" and ro["reason"] == "halted by the operator: wrong build"
    assert ro["halted"] is True
    idle = await rig.client.post("/api/rollout/halt", json={}, headers=AUTH)
    assert idle.status == 409
    assert not set(rig.street.calls) - {"SL-0002", "SL-0003"}


async def test_what_the_api_refuses(rig: Rig) -> None:
    bad = bytearray(make_bundle(rig.key))
    bad[70] ^= 4
    r = await rig.post_bundle(bytes(bad))
    assert r.status == 422 and (await r.json())["kind"] == "refused"
    assert "bad_signature" in (await r.json())["error"]
    # no token, the wrong type (a form can send text/plain without asking), another origin
    r = await rig.client.post("/api/rollout", data=make_bundle(rig.key))
    assert r.status == 401
    r = await rig.post_bundle(make_bundle(rig.key), **{"Content-Type": "text/plain"})
    assert r.status == 415
    r = await rig.post_bundle(make_bundle(rig.key), Origin="http://evil.example")
    assert r.status == 403
    r = await rig.client.post("/api/rollout/halt", data="{}", headers={
        **AUTH, "Content-Type": "text/plain"})
    assert r.status == 415
    r = await rig.post_bundle(make_bundle(rig.key), "?step=x")
    assert r.status == 400
    r = await rig.post_bundle(make_bundle(rig.key), "?canary=SL-0099")
    assert r.status == 400 and "SL-0099" in (await r.json())["error"]
    assert rig.street.calls == []
    assert rig.manager.refused == {"bad_signature": 1}


async def test_metrics_and_node_table_show_progress_and_versions(rig: Rig) -> None:
    rig.manager.learn("SL-0001", "0.1.0", "unix-sim")
    rig.street.gates.update({"SL-0003": asyncio.Event(), "SL-0004": asyncio.Event()})
    r = await rig.post_bundle(make_bundle(rig.key), "?canary=1")
    assert r.status == 201
    for n in ("SL-0002", "SL-0003", "SL-0004"):  # SL-0001 done, SL-0002..4 in flight
        await rig.street.ev(n).wait()
    text = await (await rig.client.get("/metrics", headers=AUTH)).text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    states = {s.labels["state"]: s.value for s in fams["lantern_update_nodes"].samples}
    assert states == {"pending": 3, "transferring": 3, "applied": 0, "updated": 1,
                      "rolled_back": 0, "refused": 0, "unreachable": 0}
    assert fams["lantern_update_rollout_halted"].samples[0].value == 0
    info = {s.labels["node"]: s.labels["version"]
            for s in fams["lantern_node_firmware_info"].samples}
    assert info == {"SL-0001": "0.2.0"}
    nodes = await (await rig.client.get("/api/nodes", headers=AUTH)).json()
    fw = {n["id"]: n["firmware"] for n in nodes["nodes"]}
    assert fw["SL-0001"] == "0.2.0" and fw["SL-0002"] is None
    await rig.manager.halt()
    text = await (await rig.client.get("/metrics", headers=AUTH)).text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["lantern_update_rollout_halted"].samples[0].value == 1


GATEWAY = """\
[gateway]
state_dir = "state"
keys_file = "keys.toml"

[[links.serial]]
port = "/dev/ttyUSB0"

[sinks.http]
url = "http://127.0.0.1:9/"
"""


def test_updates_config(tmp_path: Path) -> None:
    key = write_pub(Ed25519PrivateKey.generate(), tmp_path / "release.pub.pem")
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY)
    assert load_config(path).updates is None
    path.write_text(GATEWAY + '\n[updates]\nrelease_key = "release.pub.pem"\n'
                    'canary = ["SL-0003"]\nstep = 4\nnode_timeout_s = 600\n')
    u = load_config(path).updates
    assert u == UpdatesConfig(key, ("SL-0003",), 4, 600.0)
    assert (f"updates: bundles signed by {key}; canary SL-0003, then 4 at a time, 600 s per "
            "node") in describe(load_config(path))
    cases = [
        ('release_key = "release.pub.pem"\nsteps = 2\n', "line 13: updates.steps: unknown key"),
        ('release_key = "release.pub.pem"\ncanary = -1\n', "line 13: updates.canary: a count"),
        ('release_key = "release.pub.pem"\ncanary = ["a b"]\n', "updates.canary: a count, or"),
        ('release_key = "release.pub.pem"\nstep = 0\n', "line 13: updates.step: must be"),
        ('release_key = "nope.pem"\n', "line 12: updates.release_key: "),
        ('canary = 1\n', "updates.release_key: missing"),
    ]
    for text, says in cases:
        path.write_text(GATEWAY + "\n[updates]\n" + text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert f"{path} " in str(e.value) and says in str(e.value), str(e.value)
    path.write_text(GATEWAY + '\n[updates]\nrelease_key = "release.pub.pem"\n')
    key.chmod(0o664)  # whoever may replace it chooses what the gateway carries
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "chmod go-w" in str(e.value)
    key.chmod(0o644)
    key.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "not a readable PEM public key" in str(e.value)


def test_ngsi_device_carries_the_firmware_version_and_validates() -> None:
    recs = records(which=[("uptime", 3600, "s"), ("temperature", 21.5, "Cel")])
    ents = ngsi.entities(recs, NGSI_NODES, firmware={"SL-0042": "0.2.0"}, now=1.8e9)
    dev = next(e for e in ents if e["type"] == "Device")
    assert dev["firmwareVersion"] == {"type": "Property", "value": "0.2.0",
                                      "observedAt": ngsi.iso(1.8e9)}
    assert sdm.errors("Device", ngsi.key_values(dev)) == []
    plain = ngsi.entities(recs, NGSI_NODES)
    assert "firmwareVersion" not in next(e for e in plain if e["type"] == "Device")


@pytest.mark.mqtt
async def test_mqtt_retains_each_nodes_firmware_version_once_per_change(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        sink = MqttSink(MqttSinkConfig("127.0.0.1", broker.port, client_id="gw-fw"))
        fw = {"SL-0042": "0.1.0"}
        sink.firmware = fw
        async with sink:
            await sink.send(batch(records(which=[("temperature", 21.5, "Cel")])))
            await sink.send(batch(records(seq=1, which=[("temperature", 21.6, "Cel")])))
            fw["SL-0042"] = "0.2.0"
            await sink.send(batch(records(seq=2, which=[("temperature", 21.7, "Cel")])))
        # a subscriber that comes later gets the retained, newest version
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="late") as c:
            await c.subscribe("lantern/SL-0042/firmware", qos=1)
            msg = await asyncio.wait_for(anext(aiter(c.messages)), 10)
        assert msg.retain
        rec = json.loads(msg.payload)[0]
        assert rec["n"] == "urn:dev:lantern:SL-0042:firmware" and rec["vs"] == "0.2.0"
        assert sink._published == {"SL-0042": "0.2.0"}
    finally:
        broker.stop()
