"""A spec-following OGC SensorThings API 1.1 test server (OGC 18-088), in memory.

What the sink uses, checked as the standard writes it: the landing page with
`serverSettings.conformance`; creating Things, Locations, Sensors, ObservedProperties,
Datastreams and Observations (deep insert, links to existing entities by @iot.id only, 201 with
a Location header); `$filter` on `properties/<key> eq '…'` and `name eq '…'`; the data array
extension's CreateObservations (§14); a FeatureOfInterest generated from the Thing's Location.
It refuses what the standard forbids: a missing mandatory property, an unknown one, a value
the entity's tables do not allow (encodingType, observationType, a time that is not ISO 8601
with its offset), a server-generated property sent by a client, a link to nothing. `down`
answers 503; `persist` keeps the entities in a JSON file across the server's own restart.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

BASE = "/v1.1"
DATA_ARRAY_CLASS = "http://www.opengis.net/spec/iot_sensing/1.1/req/data-array/data-array"
CORE = ["http://www.opengis.net/spec/iot_sensing/1.1/req/datamodel",
        "http://www.opengis.net/spec/iot_sensing/1.1/req/resource-path/resource-path-to-entities",
        "http://www.opengis.net/spec/iot_sensing/1.1/req/request-data",
        "http://www.opengis.net/spec/iot_sensing/1.1/req/create-update-delete"]
OM = "http://www.opengis.net/def/observationType/OGC-OM/2.0/"
OBSERVATION_TYPES = {OM + t for t in ("OM_CategoryObservation", "OM_CountObservation",
                                      "OM_Measurement", "OM_Observation", "OM_TruthObservation")}
GEO = {"application/geo+json", "application/vnd.geo+json"}
SENSOR_ENCODINGS = {"application/pdf", "http://www.opengis.net/doc/IS/SensorML/2.0",
                    "text/html"}
COMPONENTS = {"id", "phenomenonTime", "result", "resultTime", "resultQuality", "validTime",
              "parameters", "FeatureOfInterest/id"}
_INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)\Z")
_FILTER = re.compile(r"(name|properties/[A-Za-z0-9_]+) eq '((?:[^']|'')*)'\Z")

# entity set → (mandatory, optional) properties a client may send; links in LINKS
FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "Things": ({"name"}, {"description", "properties"}),
    "Locations": ({"name", "encodingType", "location"}, {"description", "properties"}),
    "Sensors": ({"name", "encodingType", "metadata"}, {"description", "properties"}),
    "ObservedProperties": ({"name", "definition"}, {"description", "properties"}),
    "Datastreams": ({"name", "unitOfMeasurement", "observationType"},
                    {"description", "properties"}),
    "FeaturesOfInterest": ({"name", "encodingType", "feature"}, {"description", "properties"}),
    "Observations": ({"result"}, {"phenomenonTime", "resultTime", "resultQuality",
                                  "validTime", "parameters"}),
}
# entity set → navigation property → (target set, to-many, mandatory on create)
LINKS: dict[str, dict[str, tuple[str, bool, bool]]] = {
    "Things": {"Locations": ("Locations", True, False)},
    "Locations": {},
    "Sensors": {},
    "ObservedProperties": {},
    "Datastreams": {"Thing": ("Things", False, True), "Sensor": ("Sensors", False, True),
                    "ObservedProperty": ("ObservedProperties", False, True)},
    "FeaturesOfInterest": {},
    "Observations": {"Datastream": ("Datastreams", False, True),
                     "FeatureOfInterest": ("FeaturesOfInterest", False, False)},
}


class Invalid(Exception):
    """A request the standard does not allow: answered 400 with the reason."""


def instant(v: Any, what: str) -> dt.datetime:
    if not isinstance(v, str) or not _INSTANT.match(v):
        raise Invalid(f"{what}: {v!r} is not an ISO 8601 instant with a time zone")
    return dt.datetime.fromisoformat(v)


def time_value(v: Any, what: str) -> None:
    """A TM_Object: an instant, or an interval 'start/end' with start <= end."""
    if isinstance(v, str) and "/" in v:
        a, b = v.split("/", 1)
        if instant(a, what) > instant(b, what):
            raise Invalid(f"{what}: interval {v!r} ends before it starts")
    else:
        instant(v, what)


@dataclass
class StaServer:
    data_array: bool = True  # list the data array extension (CreateObservations)
    down: bool = False
    persist: Path | None = None
    fail_rows: int = 0  # the next N dataArray rows answer "error"
    poison: set[str] = field(default_factory=set)  # reading ids whose Observation it refuses
    sets: dict[str, dict[int, dict[str, Any]]] = field(
        default_factory=lambda: {s: {} for s in FIELDS})
    next_id: int = 1
    requests: list[str] = field(default_factory=list)  # "METHOD path?query"
    rejected: list[str] = field(default_factory=list)
    array_bodies: list[str] = field(default_factory=list)  # CreateObservations bodies, as JSON
    url: str = ""
    _runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ storage

    def _load(self) -> None:
        if self.persist and self.persist.exists():
            saved = json.loads(self.persist.read_text())
            self.sets = {s: {int(k): v for k, v in saved["sets"][s].items()} for s in FIELDS}
            self.next_id = saved["next_id"]

    def _save(self) -> None:
        if self.persist:
            self.persist.write_text(json.dumps({"sets": self.sets, "next_id": self.next_id}))

    def entity(self, entity_set: str, ident: int) -> dict[str, Any]:
        """An entity as the service shows it: its properties, @iot.id, links' ids."""
        e = self.sets[entity_set][ident]
        out = dict(e["props"], **{"@iot.id": ident,
                                  "@iot.selfLink": f"{self.url}{BASE}/{entity_set}({ident})"})
        for nav, target in e["links"].items():
            out[f"{nav}@iot.id"] = target
        return out

    def all(self, entity_set: str) -> list[dict[str, Any]]:
        return [self.entity(entity_set, i) for i in sorted(self.sets[entity_set])]

    # ------------------------------------------------------------------ creation

    def _link(self, target: str, value: Any, what: str, made: list[tuple[str, int]]) -> int:
        if not isinstance(value, dict):
            raise Invalid(f"{what}: expected an entity object")
        if "@iot.id" in value:
            if len(value) != 1:
                raise Invalid(f"{what}: a link to an existing entity holds only its @iot.id")
            if value["@iot.id"] not in self.sets[target]:
                raise Invalid(f"{what}: no {target}({value['@iot.id']!r})")
            ident: int = value["@iot.id"]
            return ident
        return self._create(target, value, made, what)

    def _create(self, entity_set: str, body: Any, made: list[tuple[str, int]],
                what: str = "") -> int:
        what = what or entity_set
        if not isinstance(body, dict):
            raise Invalid(f"{what}: expected a JSON object")
        mandatory, optional = FIELDS[entity_set]
        links = LINKS[entity_set]
        for k in body:
            if k not in mandatory | optional and k not in links:
                raise Invalid(f"{what}: {k!r} is not a property a client may set on "
                              f"{entity_set}")
        for k in mandatory:
            if k not in body:
                raise Invalid(f"{what}: mandatory property {k!r} missing")
        props = {k: v for k, v in body.items() if k not in links}
        self._check(entity_set, props, what)
        linked: dict[str, Any] = {}
        for nav, (target, many, required) in links.items():
            if nav not in body:
                if required:
                    raise Invalid(f"{what}: mandatory link {nav!r} missing")
                continue
            if many:
                if not isinstance(body[nav], list):
                    raise Invalid(f"{what}: {nav} must be an array")
                linked[nav] = [self._link(target, v, f"{what}.{nav}", made) for v in body[nav]]
            else:
                linked[nav] = self._link(target, body[nav], f"{what}.{nav}", made)
        if entity_set == "Observations":
            params = props.get("parameters")
            if isinstance(params, dict) and params.get("lantern_id") in self.poison:
                raise Invalid(f"{what}: this server will never take this Observation")
            self._observation(props, linked, what, made)
        ident = self.next_id
        self.next_id += 1
        self.sets[entity_set][ident] = {"props": props, "links": linked}
        made.append((entity_set, ident))
        return ident

    def _check(self, entity_set: str, p: dict[str, Any], what: str) -> None:
        for k in ("name", "description", "definition"):
            if k in p and not isinstance(p[k], str):
                raise Invalid(f"{what}: {k} must be a string")
        if "properties" in p and not isinstance(p["properties"], dict):
            raise Invalid(f"{what}: properties must be a JSON object")
        if entity_set in ("Locations", "FeaturesOfInterest"):
            if p["encodingType"] not in GEO:
                raise Invalid(f"{what}: encodingType {p['encodingType']!r} is not GeoJSON's")
            geo = p["location" if entity_set == "Locations" else "feature"]
            c = geo.get("coordinates") if isinstance(geo, dict) else None
            if not (isinstance(geo, dict) and geo.get("type") == "Point" and isinstance(c, list)
                    and len(c) in (2, 3) and all(isinstance(x, int | float) for x in c)
                    and -180 <= c[0] <= 180 and -90 <= c[1] <= 90):
                raise Invalid(f"{what}: not a GeoJSON Point [longitude, latitude]: {geo!r}")
        elif entity_set == "Sensors" and p["encodingType"] not in SENSOR_ENCODINGS:
            raise Invalid(f"{what}: Sensor encodingType {p['encodingType']!r} not in the "
                          "standard's list")
        elif entity_set == "ObservedProperties" and not urlsplit(p["definition"]).scheme:
            raise Invalid(f"{what}: definition {p['definition']!r} is not a URI")
        elif entity_set == "Datastreams":
            u = p["unitOfMeasurement"]
            if not (isinstance(u, dict) and set(u) == {"name", "symbol", "definition"}
                    and all(isinstance(v, str) and v for v in u.values())):
                raise Invalid(f"{what}: unitOfMeasurement needs name, symbol and definition")
            if p["observationType"] not in OBSERVATION_TYPES:
                raise Invalid(f"{what}: observationType {p['observationType']!r} unknown")

    def _observation(self, p: dict[str, Any], linked: dict[str, Any], what: str,
                     made: list[tuple[str, int]]) -> None:
        ds = self.sets["Datastreams"][linked["Datastream"]]
        if ds["props"]["observationType"] == OM + "OM_Measurement" and (
                not isinstance(p["result"], int | float) or isinstance(p["result"], bool)):
            raise Invalid(f"{what}: an OM_Measurement's result must be a number")
        if "phenomenonTime" in p:
            time_value(p["phenomenonTime"], f"{what}.phenomenonTime")
        else:
            p["phenomenonTime"] = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        if p.get("resultTime") is not None:
            instant(p["resultTime"], f"{what}.resultTime")
        p.setdefault("resultTime", None)
        if "validTime" in p:
            time_value(p["validTime"], f"{what}.validTime")
        if "parameters" in p and not isinstance(p["parameters"], dict):
            raise Invalid(f"{what}: parameters must be a JSON object")
        if "FeatureOfInterest" not in linked:
            # the service makes one from the Thing's Location, or refuses the Observation
            thing = self.sets["Things"][ds["links"]["Thing"]]
            locs = thing["links"].get("Locations", [])
            if not locs:
                raise Invalid(f"{what}: no FeatureOfInterest, and its Thing has no Location")
            loc = self.sets["Locations"][locs[0]]["props"]
            for fid, foi in self.sets["FeaturesOfInterest"].items():
                if foi["props"]["feature"] == loc["location"]:
                    linked["FeatureOfInterest"] = fid
                    return
            linked["FeatureOfInterest"] = self._create("FeaturesOfInterest", {
                "name": loc["name"], "description": loc.get("description", ""),
                "encodingType": loc["encodingType"], "feature": loc["location"]}, made)

    # ------------------------------------------------------------------ HTTP

    def _refuse(self, status: int, reason: str) -> web.Response:
        self.rejected.append(reason)
        return web.json_response({"code": status, "type": "error", "message": reason},
                                 status=status)

    async def _body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise Invalid(f"content type {request.content_type!r}, expected application/json")
        try:
            return json.loads(await request.read())
        except ValueError:
            raise Invalid("body is not JSON") from None

    @web.middleware
    async def _gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs}")
        if self.down:
            return web.Response(status=503, headers={"Retry-After": "1"})
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except Invalid as e:
            return self._refuse(400, str(e))

    async def _landing(self, _request: web.Request) -> web.Response:
        value = [{"name": s, "url": f"{self.url}{BASE}/{s}"} for s in FIELDS]
        conformance = CORE + ([DATA_ARRAY_CLASS] if self.data_array else [])
        return web.json_response({"value": value,
                                  "serverSettings": {"conformance": conformance}})

    async def _get(self, request: web.Request) -> web.Response:
        entity_set = request.match_info["set"]
        if entity_set not in FIELDS:
            return self._refuse(404, f"no entity set {entity_set}")
        extra = set(request.query) - {"$filter"}
        if extra:
            raise Invalid(f"query options {sorted(extra)} not supported by this test server")
        found = self.all(entity_set)
        if "$filter" in request.query:
            m = _FILTER.match(request.query["$filter"])
            if not m:
                raise Invalid(f"$filter {request.query['$filter']!r} not supported here")
            path, text = m.group(1).split("/"), m.group(2).replace("''", "'")
            found = [e for e in found if _at(e, path) == text]
        return web.json_response({"value": found})

    async def _post(self, request: web.Request) -> web.Response:
        entity_set = request.match_info["set"]
        if entity_set not in FIELDS:
            return self._refuse(404, f"no entity set {entity_set}")
        body = await self._body(request)
        made: list[tuple[str, int]] = []
        try:
            ident = self._create(entity_set, body, made)
        except Invalid:
            for s, i in made:  # a deep insert is all or nothing
                del self.sets[s][i]
            raise
        self._save()
        link = f"{self.url}{BASE}/{entity_set}({ident})"
        return web.json_response(self.entity(entity_set, ident), status=201,
                                 headers={"Location": link})

    async def _create_observations(self, request: web.Request) -> web.Response:
        if not self.data_array:
            return self._refuse(404, "CreateObservations is not offered by this server")
        body = await self._body(request)
        self.array_bodies.append(json.dumps(body))
        if not isinstance(body, list) or not body:
            raise Invalid("CreateObservations takes a non-empty array")
        plans = []
        for i, item in enumerate(body):
            what = f"CreateObservations[{i}]"
            if not isinstance(item, dict) or set(item) - {
                    "Datastream", "components", "dataArray", "dataArray@iot.count"}:
                raise Invalid(f"{what}: expected Datastream, components and dataArray")
            ds = item.get("Datastream")
            if not isinstance(ds, dict) or set(ds) != {"@iot.id"} or \
                    ds["@iot.id"] not in self.sets["Datastreams"]:
                raise Invalid(f"{what}: Datastream must link an existing one by @iot.id")
            comps, rows = item.get("components"), item.get("dataArray")
            if not isinstance(comps, list) or len(set(comps)) != len(comps) or \
                    not set(comps) <= COMPONENTS or "result" not in comps:
                raise Invalid(f"{what}: components {comps!r} not allowed (§14)")
            if not isinstance(rows, list) or any(
                    not isinstance(r, list) or len(r) != len(comps) for r in rows):
                raise Invalid(f"{what}: every dataArray row needs one value per component")
            if "dataArray@iot.count" in item and item["dataArray@iot.count"] != len(rows):
                raise Invalid(f"{what}: dataArray@iot.count is not the number of rows")
            plans.append((ds["@iot.id"], comps, rows))
        links = []
        for ds_id, comps, rows in plans:
            for row in rows:
                obs = dict(zip(comps, row, strict=True))
                if "FeatureOfInterest/id" in obs:
                    obs["FeatureOfInterest"] = {"@iot.id": obs.pop("FeatureOfInterest/id")}
                obs.pop("id", None)
                obs["Datastream"] = {"@iot.id": ds_id}
                made: list[tuple[str, int]] = []
                try:
                    if self.fail_rows > 0:
                        self.fail_rows -= 1
                        raise Invalid("simulated failure")
                    ident = self._create("Observations", obs, made)
                except Invalid as e:
                    for s, i in made:
                        del self.sets[s][i]
                    self.rejected.append(str(e))
                    links.append("error")
                    continue
                links.append(f"{self.url}{BASE}/Observations({ident})")
        self._save()
        return web.json_response(links, status=201)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._load()
        app = web.Application(middlewares=[self._gate], client_max_size=16 * 1024 * 1024)
        app.router.add_get(BASE, self._landing)
        app.router.add_post(BASE + "/CreateObservations", self._create_observations)
        app.router.add_get(BASE + "/{set}", self._get)
        app.router.add_post(BASE + "/{set}", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url + BASE

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None


def _at(entity: dict[str, Any], path: list[str]) -> Any:
    value: Any = entity
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value
