"""MQTT sink: one message per reading, QoS 1, persistent session, clean reconnects.

Topic from a template per node and measurement; payload SenML-JSON or SenML-CBOR (a
one-record pack with the reading's id). A batch counts as delivered only when the broker
has acknowledged (PUBACK) every message in it. A node's firmware version, once known and
whenever it changes, goes with the next batch holding its readings: a retained message on
its "firmware" measurement topic, a one-record pack `{"n": ...:firmware, "vs": version}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2

from ..config import check_secret_file
from ..configfile import Doc, positive
from ..ngsi import split_name
from ..plugins import SinkContext, SinkPlugin
from ..queue.resolve import Batch
from .http import SECONDARY_UNITS, SECONDARY_VERSION, DeliveryError

log = logging.getLogger("lantern.sink.mqtt")

# SenML CBOR labels for the one-record packs (RFC 8428 §6)
_CBOR_LABELS = {"bver": -1, "n": 0, "u": 1, "v": 2, "vs": 3, "vb": 4, "t": 6}


def payload(record: dict[str, Any], kind: str) -> bytes:
    """One reading as a SenML pack of one record, keeping its stable id.

    A secondary unit (ppm, ug/m3, ms…) says its version: RFC 8798 §3, RFC 9100 §4.
    """
    if record.get("u") in SECONDARY_UNITS:
        record = {**record, "bver": SECONDARY_VERSION}
    if kind == "senml+cbor":
        rec: dict[Any, Any] = {_CBOR_LABELS[k]: v for k, v in record.items()
                               if k in _CBOR_LABELS}
        # the id rides as a string extension label; SenML-CBOR has no label for it
        rec["id"] = record["id"]
        return bytes(cbor2.dumps([rec], canonical=True))
    return json.dumps([record], separators=(",", ":")).encode()


@dataclass(frozen=True)
class MqttSinkConfig:
    host: str
    port: int = 1883
    client_id: str = "lantern-gateway"
    topic: str = "lantern/{node}/{measurement}"
    payload: str = "senml+json"  # or "senml+cbor"
    username: str | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    timeout_s: float = 10.0


class MqttSink:
    name = "mqtt"

    def __init__(self, cfg: MqttSinkConfig, firmware: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self._client: aiomqtt.Client | None = None
        self._password = cfg.password_file.read_text().strip() if cfg.password_file else None
        self.last_latency_s: float | None = None
        self.connects = 0
        self.skipped: Counter[str] = Counter()  # readings no topic can carry, by reason
        # node → its firmware version (the rollout manager's, kept up to date by it)
        self.firmware: Mapping[str, str] = {} if firmware is None else firmware
        self._published: dict[str, str] = {}  # node → the version the broker retains

    async def __aenter__(self) -> MqttSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._disconnect()

    def _new_client(self) -> aiomqtt.Client:
        tls = None
        if self.cfg.tls:
            tls = ssl.create_default_context(cafile=str(self.cfg.ca_file) if self.cfg.ca_file
                                             else None)
        # persistent session (clean_session False + a stable client id): the broker keeps
        # our QoS 1 state across reconnects
        return aiomqtt.Client(self.cfg.host, self.cfg.port, identifier=self.cfg.client_id,
                              username=self.cfg.username, password=self._password,
                              clean_session=False, tls_context=tls,
                              timeout=self.cfg.timeout_s, keepalive=30)

    async def _connect(self) -> aiomqtt.Client:
        if self._client is None:
            client = self._new_client()
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as e:
                raise DeliveryError(f"MQTT connect to {self.cfg.host}:{self.cfg.port}: {e}") \
                    from None
            self._client = client
            self.connects += 1
        return self._client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await client.__aexit__(None, None, None)

    def _topic(self, record: dict[str, Any]) -> str | None:
        """The record's topic; None (counted, logged once per reason) if it cannot have one."""
        try:
            node, measurement = split_name(record["n"])
        except ValueError:
            self._skip("name", f"{record['n']!r} is not a device reading's name")
            return None
        topic: str = self.cfg.topic.format(node=node, measurement=measurement)
        if "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
            self._skip("topic", f"topic {topic!r} of {record['n']!r} is not a valid MQTT "
                        "topic name (no + # or NUL, at most 65,535 bytes)")
            return None
        return topic

    def _skip(self, reason: str, detail: str) -> None:
        if not self.skipped[reason]:
            log.warning("mqtt: a reading left out: %s (counted in "
                        "lantern_sink_skipped_readings_total; logged once)", detail)
        self.skipped[reason] += 1

    async def send(self, batch: Batch) -> None:
        client = await self._connect()
        t0 = time.monotonic()
        try:
            pubs = []
            for record in batch.records():
                topic = self._topic(record)
                if topic is None:
                    continue
                pubs.append(client.publish(topic, payload(record, self.cfg.payload), qos=1,
                                           timeout=self.cfg.timeout_s))
            versions = self._versions(batch)
            for topic, record in versions.values():
                pubs.append(client.publish(topic, payload(record, self.cfg.payload), qos=1,
                                           retain=True, timeout=self.cfg.timeout_s))
            await asyncio.gather(*pubs)
        except (aiomqtt.MqttError, TimeoutError) as e:
            await self._disconnect()
            raise DeliveryError(f"MQTT publish to {self.cfg.host}:{self.cfg.port}: {e}") \
                from None
        self.last_latency_s = time.monotonic() - t0
        for node, (_, record) in versions.items():
            self._published[node] = record["vs"]

    def _versions(self, batch: Batch) -> dict[str, tuple[str, dict[str, Any]]]:
        """node → (topic, record) of each firmware version the broker does not hold yet,
        for the Lantern nodes with readings in this batch."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        now = time.time()
        for record in batch.records():
            try:
                node, _ = split_name(record["n"])
            except ValueError:
                continue
            fw = self.firmware.get(node)
            if fw is None or node in out or self._published.get(node) == fw:
                continue
            rec = {"n": f"urn:dev:lantern:{node}:firmware", "vs": fw, "t": now,
                   "id": f"{node}:firmware:{fw}"}
            topic = self._topic(rec)
            if topic is not None:
                out[node] = (topic, rec)
        return out


# ---------------------------------------------------------------- plug-in ([sinks.mqtt])


def _topic_ok(v: str) -> str | None:
    try:
        v.format(node="n", measurement="m")
    except (KeyError, IndexError, ValueError):
        return "may only use {node} and {measurement}"
    return None


def parse(doc: Doc, m: dict[str, Any], key: str, base: Path) -> MqttSinkConfig:
    pw = doc.get(m, "password_file", f"{key}.password_file", str, None)
    ca = doc.get(m, "ca_file", f"{key}.ca_file", str, None)
    cfg = MqttSinkConfig(
        host=doc.get(m, "host", f"{key}.host", str, fix='the broker, e.g. "localhost"'),
        port=doc.get(m, "port", f"{key}.port", int, 1883,
                     lambda v: None if 0 < v < 65536 else "must be 1..65535"),
        client_id=doc.get(m, "client_id", f"{key}.client_id", str, "lantern-gateway"),
        topic=doc.get(m, "topic", f"{key}.topic", str, "lantern/{node}/{measurement}",
                      _topic_ok),
        payload=doc.get(m, "payload", f"{key}.payload", str, "senml+json",
                        lambda v: None if v in ("senml+json", "senml+cbor")
                        else "expected senml+json or senml+cbor"),
        username=doc.get(m, "username", f"{key}.username", str, None),
        password_file=base / pw if pw else None,
        tls=doc.get(m, "tls", f"{key}.tls", bool, False),
        ca_file=base / ca if ca else None,
        timeout_s=float(doc.get(m, "timeout_s", f"{key}.timeout_s", (int, float), 10.0,
                                positive)))
    if cfg.password_file:
        check_secret_file(cfg.password_file, f"{key}.password_file")
    return cfg


def _open(cfg: MqttSinkConfig, ctx: SinkContext) -> MqttSink:
    return MqttSink(cfg, ctx.firmware)


PLUGIN = SinkPlugin(
    "mqtt", frozenset({"host", "port", "client_id", "topic", "payload", "username",
                       "password_file", "tls", "ca_file", "timeout_s"}),
    parse, open=_open, where=lambda c: c.host)
