"""NGSI-LD sink: batch upserts of Smart Data Models entities to a FIWARE context broker.

POST /ngsi-ld/v1/entityOperations/upsert?options=update with at most 500 entities; a 207
(some entities failed) retries only the failed ones; tenant and auth headers configurable.
Delivered means 200, 201 or 204 from the URL configured; a redirect is never followed
(agent/sinks/http.py says why).

With the health monitor ([health]), each batch also carries the Streetlight entity of every
lamp whose readings it holds, as the monitor knows it then (agent/health/streetlight.py:
`status` from its open faults, `powerState` from its rating, switching dates, lifetime
energy), observed at the lamp's latest sample the monitor has seen; the readings' own
Streetlight entity then carries neither `status` nor `powerState`.

With the fleet registry (agent/registry.py, set as `registry` by the gateway), a Device
entity's `deviceState` is the node's state there, and `push_devices` upserts the Device
entity of each node whose record changed (revoked, silent, new firmware) — a revoked node
sends no readings that could carry it (docs/fleet.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ..config import check_secret_file, http_url, shown_url
from ..configfile import Doc, positive
from ..ngsi import MAX_BATCH, NodeMeta, device_entity, entities, rounds, split_name
from ..plugins import SinkContext, SinkPlugin
from ..queue.resolve import Batch
from .http import SHOWN_MAX, DeliveryError, parse_retry_after, read_bounded, redirect_error

log = logging.getLogger("lantern.sink.ngsi_ld")

UPSERT = "/ngsi-ld/v1/entityOperations/upsert?options=update"


@dataclass(frozen=True)
class NgsiLdSinkConfig:
    url: str  # broker base URL, e.g. http://orion:1026
    tenant: str | None = None
    token_file: Path | None = None
    timeout_s: float = 10.0
    batch_entities: int = MAX_BATCH
    partial_retries: int = 5


class NgsiLdSink:
    name = "ngsi_ld"

    def __init__(self, cfg: NgsiLdSinkConfig, nodes: dict[str, NodeMeta],
                 firmware: Mapping[str, str] | None = None, health: Any = None) -> None:
        self.cfg = cfg
        self.nodes = nodes
        self.health = health  # a HealthService (agent/health/service.py), or None
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/ld+json"}
        if cfg.tenant:
            self._headers["NGSILD-Tenant"] = cfg.tenant
        if cfg.token_file:
            self._headers["Authorization"] = "Bearer " + cfg.token_file.read_text().strip()
        self.last_latency_s: float | None = None
        self.partial_failures = 0
        self.skipped: Counter[str] = Counter()  # readings no entity can hold, by reason
        self.redirects: Counter[int] = Counter()  # 3xx answers, by status
        self.unlocated: Counter[str] = Counter()  # Streetlights sent without a place, by node
        # node → its firmware version (the rollout manager's, kept up to date by it)
        self.firmware: Mapping[str, str] = {} if firmware is None else firmware
        self.registry: Any = None  # the fleet registry (agent/registry.py), set by the gateway
        self.controlled: dict[str, set[str]] = {}  # node → controlledProperty seen in readings

    async def __aenter__(self) -> NgsiLdSink:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, batch: Batch) -> None:
        before = sum(self.skipped.values())
        records = batch.records()
        states = None
        if self.registry is not None:
            now = time.time()
            states = {r.id: r.state(now) for r in self.registry.records()}
        ents = entities(records, self.nodes, self.skipped, self.firmware,
                        lamp_state=self.health is None, states=states)
        for e in ents:
            if e["type"] == "Device":
                node = e["id"].rsplit(":", 1)[-1]
                self.controlled.setdefault(node, set()).update(e["controlledProperty"]["value"])
        if self.health is not None:
            lamps = self._lamps(records)
            self._unjudged(ents, {e["id"] for e in lamps})
            ents += lamps
        if not before and self.skipped:
            log.warning("ngsi-ld: readings left out (%s): a name that is not a device's, a "
                        "time no DateTime can hold, or a correction without the reading it "
                        "corrects; counted in "
                        "lantern_sink_skipped_readings_total, logged once", dict(self.skipped))
        for request in rounds(ents, self.cfg.batch_entities):
            await self._upsert(request)

    async def push_devices(self, records: list[Any], now: float) -> None:
        """Upsert the Device entity of each registry record (agent/registry.py NodeRecord);
        DeliveryError if the broker does not take them (the caller tries again later)."""
        ents = [device_entity(r.id, r.state(now), now, firmware=self.firmware.get(r.id)
                              or r.firmware, last_seen=r.last_seen, lat=r.lat, lon=r.lon,
                              board=r.board, controlled=self.controlled.get(r.id, ()))
                for r in records]
        for request in rounds(ents, self.cfg.batch_entities):
            await self._upsert(request)

    def _lamps(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The health monitor's Streetlight entity of each lamp the batch has readings of."""
        from ..health.streetlight import entity

        nodes = set()
        for r in records:
            try:
                nodes.add(split_name(r["n"])[0])
            except (ValueError, KeyError, TypeError):
                continue  # counted by entities() already
        out = []
        for lamp in self.health.lamps():
            if lamp.node in nodes and lamp.t is not None:
                meta = self.nodes.get(lamp.node, NodeMeta())
                if meta.lat is None or meta.lon is None:
                    self.unlocated[lamp.node] += 1
                    if self.unlocated[lamp.node] == 1:
                        log.warning("ngsi-ld: %s has no location ([nodes.\"%s\"] location): "
                                    "its Streetlight goes with an empty location (a null "
                                    "geometry), counted, said once", lamp.node, lamp.node)
                out.append(entity(lamp, meta, lamp.t))
        return out

    @staticmethod
    def _unjudged(ents: list[dict[str, Any]], judged: set[str]) -> None:
        """A lamp the monitor has no verdict on yet (it reads the queue at its own pace):
        its readings' Streetlight says `ok` (the model requires a status; no fault is known),
        until the monitor's entity says otherwise."""
        for e in ents:
            if e["type"] == "Streetlight" and "status" not in e and e["id"] not in judged:
                e["status"] = {"type": "Property", "value": "ok",
                               "observedAt": e["observationDateTime"]["observedAt"]}

    async def _upsert(self, ents: list[dict[str, Any]]) -> None:
        """Upsert until every entity is accepted; a 207 retries only the failed ones."""
        attempt = 0
        while True:
            failed = await self._post(ents)
            if not failed:
                return
            attempt += 1
            self.partial_failures += 1
            if attempt > self.cfg.partial_retries:
                raise DeliveryError(f"NGSI-LD broker keeps refusing {len(failed)} entities, "
                                    f"e.g. {sorted(failed)[0]}")
            ents = [e for e in ents if e["id"] in failed]
            await asyncio.sleep(random.uniform(0, min(5.0, 0.2 * 2 ** attempt)))

    async def _post(self, ents: list[dict[str, Any]]) -> set[str]:
        assert self._session is not None
        url = self.cfg.url.rstrip("/") + UPSERT
        t0 = time.monotonic()
        try:
            async with self._session.post(url, data=json.dumps(ents), headers=self._headers,
                                          allow_redirects=False) as resp:
                body = await read_bounded(resp)
                self.last_latency_s = time.monotonic() - t0
                if resp.status in (200, 201, 204):
                    return set()
                if resp.status == 207:
                    return _failed_ids(body, {e["id"] for e in ents})
                if 300 <= resp.status < 400:
                    self.redirects[resp.status] += 1
                    raise redirect_error(url, resp.status, resp.headers.get("Location"))
                retry_after = None
                if resp.status in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                detail = body[:SHOWN_MAX].decode(errors="replace")
                raise DeliveryError(f"HTTP {resp.status} from {shown_url(url)}: {detail}",
                                    retry_after)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DeliveryError(f"{type(e).__name__} posting to {shown_url(url)}: {e}") from None


def _failed_ids(body: bytes, sent: set[str]) -> set[str]:
    """Entity ids a 207 BatchOperationResult does not confirm (all, if unreadable).

    A 207 says some entities failed: with a `success` list, what it does not list failed;
    without one, the `errors` it lists — and a 207 that names none of ours confirms nothing.
    """
    try:
        result = json.loads(body)
        failed = {str(err["entityId"]) for err in result.get("errors", [])}
        success = result.get("success")
        if success is not None:
            if not isinstance(success, list):
                return sent
            return sent - ({str(i) for i in success} - failed)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return sent
    return failed & sent or sent


# ---------------------------------------------------------------- plug-in ([sinks.ngsi_ld])


def parse(doc: Doc, n: dict[str, Any], key: str, base: Path) -> NgsiLdSinkConfig:
    token = doc.get(n, "token_file", f"{key}.token_file", str, None)
    cfg = NgsiLdSinkConfig(
        url=doc.get(n, "url", f"{key}.url", str, check=http_url,
                    fix='the broker base URL, e.g. "http://orion-ld:1026"'),
        tenant=doc.get(n, "tenant", f"{key}.tenant", str, None),
        token_file=base / token if token else None,
        timeout_s=float(doc.get(n, "timeout_s", f"{key}.timeout_s", (int, float), 10.0,
                                positive)),
        batch_entities=doc.get(n, "batch_entities", f"{key}.batch_entities", int,
                               MAX_BATCH, lambda v: None if 1 <= v <= MAX_BATCH
                               else f"must be 1..{MAX_BATCH}"))
    if cfg.token_file:
        check_secret_file(cfg.token_file, f"{key}.token_file")
    return cfg


def _open(cfg: NgsiLdSinkConfig, ctx: SinkContext) -> NgsiLdSink:
    return NgsiLdSink(cfg, ctx.nodes, ctx.firmware, ctx.health)


PLUGIN = SinkPlugin(
    "ngsi_ld", frozenset({"url", "tenant", "token_file", "timeout_s", "batch_entities"}),
    parse, open=lambda c, ctx: _open(c, ctx), where=lambda c: c.url)
