"""OGC SensorThings API sink (OGC 18-088, version 1.1): readings become Observations.

One Thing per node (with its Location from `[nodes."…"]`), one Sensor per node and sensor
family, one ObservedProperty per measurement (shared by every node and gateway), one Datastream
per node and measurement. Each is found again by the stable `properties/lantern_id` it was
created with (`$filter=properties/lantern_id eq '…'`) before it is created, so a restarted
gateway, or a second one, never duplicates it. The ids found or created are kept in the state
folder: after a restart one `$filter` shows the server still holds what they name (below), and
the rest are used without looking each up again. Observations go in `CreateObservations`
dataArray requests (§14) where the landing page's `serverSettings.conformance` lists the data
array extension, else one POST each. Delivered means every Observation of the batch created;
a redirect is never followed (agent/sinks/http.py says why). docs/upstream.md lists the fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, urlsplit

import aiohttp
import yarl

from ..api import QUALITY_BITS
from ..config import check_secret_file, http_url, shown_url
from ..configfile import Doc, positive
from ..ngsi import NodeMeta, iso, split_name
from ..plugins import SinkPlugin
from ..protocol import TIME_MAX, TIME_MIN
from ..queue.resolve import Batch
from .http import SHOWN_MAX, DeliveryError, read_bounded
from .session import SessionSink, frame, quality_flags
from .sta_terms import (
    FAMILIES,
    FAMILY,
    OBSERVED,
    PERIOD,
    UNIT_OVERRIDE,
    UNITS,
    checked_id,
    entity_id,
    literal,
)
from .state import SinkState

log = logging.getLogger("lantern.sink.sensorthings")

# §14 (data array extension): a server that lists this conformance class takes CreateObservations
DATA_ARRAY = "http://www.opengis.net/spec/iot_sensing/1.1/req/data-array"
OM_MEASUREMENT = "http://www.opengis.net/def/observationType/OGC-OM/2.0/OM_Measurement"
GEOJSON = "application/geo+json"  # 1.1's Location encodingType for GeoJSON
UCUM = "http://unitsofmeasure.org/ucum.html"
MAX_ARRAY = 1000  # Observations per CreateObservations request at most (a body of ~150 KB)


@dataclass(frozen=True)
class SensorThingsSinkConfig:
    url: str  # the service root, e.g. http://frost:8080/FROST-Server/v1.1
    token_file: Path | None = None
    timeout_s: float = 10.0
    batch_observations: int = MAX_ARRAY
    sensor_metadata_url: str | None = None  # an HTML page describing the sensors
    partial_retries: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0


class Refused(DeliveryError):
    """A 4xx other than 429: the server will not take what was sent, as it was sent."""


@dataclass(frozen=True)
class Reading:
    device: str
    measurement: str
    unit: tuple[str, str]
    obs: dict[str, Any]  # the Observation's own properties
    rid: str


class SensorThingsSink(SessionSink):
    name = "sensorthings"

    def __init__(self, cfg: SensorThingsSinkConfig, nodes: dict[str, NodeMeta],
                 state_dir: Path | None = None) -> None:
        super().__init__(cfg.timeout_s)
        self.cfg = cfg
        self.nodes = nodes
        self.root = cfg.url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if cfg.token_file:
            self._headers["Authorization"] = "Bearer " + cfg.token_file.read_text().strip()
        self._ids: dict[str, Any] = {}  # lantern_id → @iot.id, found or created this run
        # ids an earlier run kept (state_dir), used once one of them is checked this run
        self.state = SinkState(state_dir, "sensorthings") if state_dir else None
        self._saved: dict[str, Any] = {}
        self.stale = 0  # earlier runs' ids dropped: the server no longer held what they named
        self.data_array: bool | None = None  # from the landing page, read once
        self._batch: tuple[int, int] | None = None
        self._done: set[str] = set()  # reading ids of the current batch already created
        self.created: Counter[str] = Counter()  # entities this sink created, by entity set
        self.found: Counter[str] = Counter()  # entities found again, by entity set
        self.skipped: Counter[str] = Counter()  # readings no Observation can hold, by reason
        self.partial_failures = 0
        self.unmatched = 0  # $filter answers' entities without the lantern_id asked for
        self.duplicates = 0  # lookups that found several entities with one lantern_id

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        if self.state is not None:
            saved = await self.state.load()
            ids = saved.get("ids")
            if saved.get("root") == self.root and isinstance(ids, dict):
                self._saved = {k: v for k, v in ids.items() if checked_id(v) is not None}
        return self

    async def _save(self) -> None:
        if self.state is not None:
            await self.state.save({"root": self.root, "ids": {**self._saved, **self._ids}})

    async def _check_saved(self, device: str) -> None:
        """Use the ids an earlier run kept only if the server still holds what they name.

        A server wiped since (or restored from a backup) numbers its entities from the start
        again, so a kept id may now name another node's Datastream: one $filter for a kept
        Thing decides for all of them. After that, a kept id the server refuses (an entity
        deleted since) clears every id, as a found one does (_call).
        """
        saved = self._saved
        key = f"lantern:thing:{device}"
        if key not in saved:
            key = min((k for k in saved if k.startswith("lantern:thing:")), default="")
        # (a server that does not answer leaves them for the next try)
        held = bool(key) and await self._lookup("Things", key) == [saved[key]]
        self._saved = {}
        if held:
            self._ids = {**saved, **self._ids}
            return
        self.stale += len(saved)
        log.warning("sensorthings: %s no longer holds the %d entities this gateway made or "
                    "found before (reset or wiped?): each is looked up again, or created",
                    shown_url(self.root), len(saved))

    # ------------------------------------------------------------------ HTTP

    async def _call(self, method: str, url: str, body: Any = None,
                    ok: tuple[int, ...] = (200, 201), forget: bool = True
                    ) -> tuple[int, bytes, str | None]:
        assert self._session is not None
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        t0 = time.monotonic()
        try:
            async with self._session.request(
                    method, yarl.URL(url, encoded=True), data=data, allow_redirects=False,
                    headers=self._headers if data is not None else {
                        k: v for k, v in self._headers.items() if k != "Content-Type"}) as resp:
                answer = await read_bounded(resp)
                self.last_latency_s = time.monotonic() - t0
                if resp.status in ok:
                    return resp.status, answer, resp.headers.get("Location")
                err = self.refused(url, resp, f"{method}: "
                                   + answer[:SHOWN_MAX].decode(errors="replace"))
                if 400 <= resp.status < 500 and resp.status != 429:
                    if forget:  # an entity we cached may be gone (a server reset)
                        self._ids.clear()
                    raise Refused(str(err)) from None
                raise err
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DeliveryError(f"{type(e).__name__} on {method} {shown_url(url)}: {e}") \
                from None

    async def _landing(self) -> None:
        """Read the landing page once: does the server take CreateObservations (§14)?"""
        _, body, _ = await self._call("GET", self.root, ok=(200,))
        try:
            conf = json.loads(body).get("serverSettings", {}).get("conformance", [])
        except (ValueError, AttributeError):
            raise DeliveryError(f"{shown_url(self.root)} is not a SensorThings 1.1 service "
                                "root (its landing page is not JSON)") from None
        self.data_array = isinstance(conf, list) and any(
            isinstance(c, str) and c.startswith(DATA_ARRAY) for c in conf)
        log.info("sensorthings: %s: Observations %s", shown_url(self.root),
                 "in CreateObservations data arrays" if self.data_array else "one POST each")

    async def _lookup(self, entity_set: str, lantern_id: str) -> list[int | str]:
        """The @iot.ids of the entities that carry `lantern_id` ($filter).

        Only what the answer shows carrying that very `properties/lantern_id` counts: a server
        that ignores the filter (or a proxy's cached answer, or a liar) may list any entity,
        and a node's Observations must never land under someone else's Datastream.
        """
        query = "$filter=" + quote(f"properties/lantern_id eq {literal(lantern_id)}", safe="/':")
        _, answer, _ = await self._call("GET", f"{self.root}/{entity_set}?{query}", ok=(200,))
        try:
            listed = json.loads(answer)["value"]
            assert isinstance(listed, list)
        except (ValueError, TypeError, KeyError, AssertionError):
            raise DeliveryError(f"unreadable answer to a $filter on {entity_set}") from None
        found = []
        for e in listed:
            props = e.get("properties") if isinstance(e, dict) else None
            if not isinstance(props, dict) or props.get("lantern_id") != lantern_id:
                self.unmatched += 1
                if self.unmatched == 1:
                    log.warning("sensorthings: %s answered a $filter on %s with an entity "
                                "that does not carry lantern_id %r: ignored (counted; logged "
                                "once)", shown_url(self.root), entity_set, lantern_id)
                continue
            ident = checked_id(e.get("@iot.id"))
            if ident is None:
                raise DeliveryError(f"SensorThings server listed a {entity_set} entity whose "
                                    "@iot.id no client can use (a number below 2**63 or a "
                                    "short plain string)")
            found.append(ident)
        return found

    async def _entity(self, entity_set: str, lantern_id: str, body: dict[str, Any]) -> Any:
        """The entity's @iot.id: cached, found by its lantern_id, or created (never twice)."""
        if lantern_id in self._ids:
            return self._ids[lantern_id]
        found = await self._lookup(entity_set, lantern_id)
        if found:
            if len(found) > 1:
                self.duplicates += 1
                if self.duplicates == 1:
                    log.warning("sensorthings: %d %s carry lantern_id %r (created by something "
                                "else than this gateway?); using the oldest (counted; logged "
                                "once)", len(found), entity_set, lantern_id)
            ident = min(found, key=lambda i: (isinstance(i, str), i))
            self.found[entity_set] += 1
        else:
            _, answer, location = await self._call("POST", f"{self.root}/{entity_set}", body,
                                                   ok=(201,))
            ident = entity_id(location, answer, f"{self.root}/{entity_set}")
            self.created[entity_set] += 1
        self._ids[lantern_id] = ident
        return ident

    # ------------------------------------------------------------------ entities

    async def _datastream(self, r: Reading) -> Any:
        meta = self.nodes.get(r.device, NodeMeta())
        assert meta.lat is not None and meta.lon is not None
        thing: dict[str, Any] = {
            "name": r.device,
            "description": f"Lantern streetlight sensor node {r.device}"
                           + (f" on pole {meta.pole}" if meta.pole else ""),
            "properties": {"lantern_id": f"lantern:thing:{r.device}",
                           **({"pole": meta.pole} if meta.pole else {})},
            "Locations": [{
                "name": f"pole {meta.pole}" if meta.pole else r.device,
                "description": f"where node {r.device} stands",
                "encodingType": GEOJSON,
                "location": {"type": "Point", "coordinates": [meta.lon, meta.lat]},
                "properties": {"lantern_id": f"lantern:location:{r.device}"}}]}
        tid = await self._entity("Things", thing["properties"]["lantern_id"], thing)
        family = FAMILY.get(r.measurement, "node" if r.measurement in (
            "uptime", "heap_free", "heap_peak", "cycle_ms", "energy", "outbox")
            else r.measurement)
        what = FAMILIES.get(family, f"the sensor behind {r.measurement}")
        sensor: dict[str, Any] = {"name": f"{r.device} {family}", "description": what,
                  "encodingType": "text/html",
                  "metadata": self.cfg.sensor_metadata_url or f"<p>{what}</p>",
                  "properties": {"lantern_id": f"lantern:sensor:{r.device}:{family}"}}
        sid = await self._entity("Sensors", sensor["properties"]["lantern_id"], sensor)
        definition, desc = OBSERVED.get(
            r.measurement, (f"urn:lantern:measurement:{r.measurement}", r.measurement))
        prop: dict[str, Any] = {
            "name": r.measurement, "definition": definition, "description": desc,
            "properties": {"lantern_id": f"lantern:observed:{r.measurement}"}}
        oid = await self._entity("ObservedProperties", prop["properties"]["lantern_id"], prop)
        ds_key = f"lantern:datastream:{r.device}:{r.measurement}"
        stream = {"name": f"{r.device} {r.measurement}",
                  "description": f"{desc} at node {r.device}",
                  "observationType": OM_MEASUREMENT,
                  "unitOfMeasurement": {"name": r.unit[1], "symbol": r.unit[0],
                                        "definition": UCUM},
                  "properties": {"lantern_id": ds_key},
                  "Thing": {"@iot.id": tid}, "Sensor": {"@iot.id": sid},
                  "ObservedProperty": {"@iot.id": oid}}
        return await self._entity("Datastreams", ds_key, stream)

    def _skip(self, reason: str, detail: str) -> None:
        if not self.skipped[reason]:
            log.warning("sensorthings: a reading left out: %s (counted in "
                        "lantern_sink_skipped_readings_total; logged once)", detail)
        self.skipped[reason] += 1

    def readings(self, records: list[dict[str, Any]]) -> list[Reading]:
        """The batch's numeric readings as Observations; flags (`<name>.q`) in parameters."""
        flags = quality_flags(records)
        out = []
        for r in records:
            v = r.get("v")
            if not isinstance(v, int | float) or isinstance(v, bool) or r["n"].endswith(".q"):
                continue  # no number: an Observation of a Measurement needs one
            try:
                device, measurement = split_name(r["n"])
            except ValueError:
                self._skip("name", f"{r['n']!r} is not a device reading's name")
                continue
            if not math.isfinite(v):
                self._skip("value", f"{r['n']} = {v}: JSON has no number for it")
                continue
            t = float(r["t"])
            if not TIME_MIN <= t <= TIME_MAX:
                self._skip("time", f"{r['n']} has a time no ISO 8601 instant can hold")
                continue
            meta = self.nodes.get(device)
            if meta is None or meta.lat is None or meta.lon is None:
                self._skip("location", f"{device} has no location in [nodes.\"{device}\"]: "
                           "its Thing needs one, and its Observations a FeatureOfInterest")
                continue
            unit = UNIT_OVERRIDE.get(measurement) or UNITS.get(r.get("u", ""))
            if unit is None:
                if "u" in r:
                    self._skip("unit", f"{r['n']}: SenML unit {r['u']!r} has no UCUM code here")
                    continue
                unit = ("1", "one")
            when = iso(t)
            obs: dict[str, Any] = {
                "phenomenonTime": f"{iso(t - meta.interval_s)}/{when}"
                                  if measurement in PERIOD else when,
                "resultTime": when, "result": v, "parameters": {"lantern_id": r["id"]}}
            q = flags.get((r["n"], frame(r["id"])))
            if q:
                obs["parameters"]["lantern_quality"] = q
                obs["parameters"]["lantern_flags"] = [
                    name for bit, name in enumerate(QUALITY_BITS) if name and q >> bit & 1]
            out.append(Reading(device, measurement, unit, obs, r["id"]))
        return out

    # ------------------------------------------------------------------ Observations

    async def send(self, batch: Batch) -> None:
        if self._batch != (batch.first_id, batch.last_id):
            self._batch, self._done = (batch.first_id, batch.last_id), set()
        todo = [r for r in self.readings(batch.records()) if r.rid not in self._done]
        if not todo:
            return
        if self.data_array is None:
            await self._landing()
        try:
            await self._send(todo)
        finally:  # what it found or created, and a clear after a refusal: kept
            await self._save()

    async def _send(self, todo: list[Reading]) -> None:
        if self._saved:
            await self._check_saved(todo[0].device)
        streams: defaultdict[Any, list[Reading]] = defaultdict(list)
        for r in todo:
            streams[await self._datastream(r)].append(r)
        for ds, rs in streams.items():
            if self.data_array:
                for i in range(0, len(rs), self.cfg.batch_observations):
                    await self._create_array(ds, rs[i:i + self.cfg.batch_observations])
            else:
                await self._one_by_one(ds, rs)

    async def _one_by_one(self, ds: int | str, rs: list[Reading]) -> None:
        """One POST per Observation; one the server refuses (4xx) is a poison reading.

        Refused while its Datastream is still there (a $filter shows it under its lantern_id),
        the Observation itself is what the server will never take: sending it again would
        hold the whole queue back for ever, so it is left out (reason `refused`, logged once)
        and the ids are kept. Refused because the Datastream is gone (a server reset): every
        cached id is dropped and the batch fails, to be retried with everything looked up again.
        """
        for r in rs:
            try:
                await self._call("POST", f"{self.root}/Observations",
                                 {**r.obs, "Datastream": {"@iot.id": ds}}, ok=(201,),
                                 forget=False)
            except Refused as e:
                await self._still_there(ds, r, e)
                self._skip("refused", f"reading {r.rid}: the server refuses its Observation "
                           f"({e})")
            self._done.add(r.rid)

    async def _still_there(self, ds: int | str, r: Reading, refusal: Refused) -> None:
        """Return if Datastream `ds` is still r's; else forget every id and raise `refusal`."""
        if ds not in await self._lookup("Datastreams",
                                        f"lantern:datastream:{r.device}:{r.measurement}"):
            self._ids.clear()
            raise refusal

    async def _create_array(self, ds: Any, rs: list[Reading]) -> None:
        """CreateObservations until each is created; an "error" entry retries only its own."""
        comps = ["phenomenonTime", "resultTime", "result", "parameters"]
        attempt = 0
        while rs:
            body = [{"Datastream": {"@iot.id": ds}, "components": comps,
                     "dataArray@iot.count": len(rs),
                     "dataArray": [[r.obs[c] for c in comps] for r in rs]}]
            try:
                _, answer, _ = await self._call("POST", f"{self.root}/CreateObservations",
                                                body, ok=(201,), forget=False)
            except Refused as e:  # one row may be what it refuses: find which, one by one
                await self._still_there(ds, rs[0], e)
                await self._one_by_one(ds, rs)
                return
            try:
                links = json.loads(answer)
                assert isinstance(links, list) and len(links) == len(rs)
            except (ValueError, AssertionError):
                raise DeliveryError("unreadable answer to CreateObservations: expected one "
                                    f"entry per Observation ({len(rs)})") from None
            failed = [r for r, link in zip(rs, links, strict=True) if link == "error"]
            self._done.update(r.rid for r, link in zip(rs, links, strict=True)
                              if link != "error")
            if not failed:
                return
            attempt += 1
            self.partial_failures += 1
            if attempt > self.cfg.partial_retries:  # each alone: created, poison, or a failure
                await self._one_by_one(ds, failed)
                return
            rs = failed
            await asyncio.sleep(random.uniform(0, min(5.0, 0.2 * 2 ** attempt)))


# ---------------------------------------------------------------- plug-in ([sinks.sensorthings])


def _service_root(v: str) -> str | None:
    problem = http_url(v)
    if problem:
        return problem
    if not urlsplit(v).path.rstrip("/").endswith("/v1.1"):
        return ("expected the SensorThings 1.1 service root, ending in /v1.1, e.g. "
                '"http://frost:8080/FROST-Server/v1.1"')
    return None


def parse(doc: Doc, s: dict[str, Any], key: str, base: Path) -> SensorThingsSinkConfig:
    token = doc.get(s, "token_file", f"{key}.token_file", str, None)
    cfg = SensorThingsSinkConfig(
        url=doc.get(s, "url", f"{key}.url", str, check=_service_root,
                    fix='the service root, e.g. "http://frost:8080/FROST-Server/v1.1"'),
        token_file=base / token if token else None,
        timeout_s=float(doc.get(s, "timeout_s", f"{key}.timeout_s", (int, float), 10.0,
                                positive)),
        batch_observations=doc.get(s, "batch_observations", f"{key}.batch_observations", int,
                                   MAX_ARRAY, lambda v: None if 1 <= v <= MAX_ARRAY
                                   else f"must be 1..{MAX_ARRAY}"),
        sensor_metadata_url=doc.get(s, "sensor_metadata_url", f"{key}.sensor_metadata_url",
                                    str, None, http_url),
        backoff_initial_s=float(doc.get(s, "backoff_initial_s", f"{key}.backoff_initial_s",
                                        (int, float), 0.5, positive)),
        backoff_max_s=float(doc.get(s, "backoff_max_s", f"{key}.backoff_max_s",
                                    (int, float), 60.0, positive)))
    if cfg.token_file:
        check_secret_file(cfg.token_file, f"{key}.token_file")
    return cfg


PLUGIN = SinkPlugin(
    "sensorthings", frozenset({"url", "token_file", "timeout_s", "batch_observations",
                               "sensor_metadata_url", "backoff_initial_s", "backoff_max_s"}),
    parse, open=lambda c, ctx: SensorThingsSink(c, ctx.nodes, ctx.state_dir),
    where=lambda c: c.url,
    backoff=lambda c: (c.backoff_initial_s, c.backoff_max_s))
