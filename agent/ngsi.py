"""Readings → FIWARE Smart Data Models entities, in NGSI-LD normalized form.

One entity per (node, model), upserted with `options=update` so the broker keeps the latest
value while every attribute carries its own `observedAt` (a backfilled reading keeps its
time). Values follow the models' conventions: relative humidity as 0-1, pressure in hPa.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .protocol import TIME_MAX, TIME_MIN
from .timesync import TIME_Q

CORE_CONTEXT = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld"
CONTEXTS = [
    "https://raw.githubusercontent.com/smart-data-models/dataModel.Environment/master/context.jsonld",
    "https://raw.githubusercontent.com/smart-data-models/dataModel.Weather/master/context.jsonld",
    "https://raw.githubusercontent.com/smart-data-models/dataModel.Streetlighting/master/context.jsonld",
    "https://raw.githubusercontent.com/smart-data-models/dataModel.Device/master/context.jsonld",
    CORE_CONTEXT,
]
MAX_BATCH = 500
LAMP_ON_W = 1.0  # lamp power above this counts as switched on


@dataclass(frozen=True)
class NodeMeta:
    """What the gateway knows of a node's place: its pole and coordinates."""

    pole: str = ""
    lat: float | None = None
    lon: float | None = None
    interval_s: float = 60.0  # sampling interval: the span a LAeq/LAmax value covers


@dataclass(frozen=True)
class Attr:
    model: str
    name: str
    unit_code: str | None
    convert: Callable[[float], float] = lambda v: v


# canonical measurement → model attribute (UN/CEFACT common codes for unitCode)
ATTRS: dict[str, Attr] = {
    "temperature": Attr("WeatherObserved", "temperature", "CEL"),
    "humidity": Attr("WeatherObserved", "relativeHumidity", "C62", lambda v: v / 100.0),
    "pressure": Attr("WeatherObserved", "atmosphericPressure", "A97", lambda v: v / 100.0),
    "illuminance": Attr("WeatherObserved", "illuminance", "LUX"),
    "pm1": Attr("AirQualityObserved", "pm1", "GQ"),
    "pm2_5": Attr("AirQualityObserved", "pm25", "GQ"),
    "pm4": Attr("AirQualityObserved", "pm4", "GQ"),
    "pm10": Attr("AirQualityObserved", "pm10", "GQ"),
    "co2": Attr("AirQualityObserved", "co2", "59"),
    "LAeq": Attr("NoiseLevelObserved", "LAeq", "2N"),
    "LAmax": Attr("NoiseLevelObserved", "LAmax", "2N"),
    "lamp_power": Attr("Streetlight", "powerConsumption", "WTT"),
    "lamp_voltage": Attr("Streetlight", "voltage", "VLT"),
    "lamp_current": Attr("Streetlight", "current", "AMP"),
}
# the node's corrections (docs/corrections.md), each attached to the attribute it corrects as
# an NGSI-LD sub-property: the model's attribute keeps the value the node sent under that name
# (docs/upstream.md says why)
CORRECTED = ("pm1", "pm2_5", "pm4", "pm10")  # "<pm>_corr": humidity-corrected mass
OFFSET = ("temperature", "humidity", "LAeq", "LAmax")  # "<name>_offset": included in the value
KAPPA = "pm_kappa"  # the kappa of the pack's "<pm>_corr" when not the default
KAPPA_DEFAULT = 0.4  # node/drivers/corrections.py KAPPA
PM_METHOD = ("kappa-Koehler hygroscopic growth correction (Crilley et al. 2018, "
             "doi:10.5194/amt-11-709-2018): raw / (1 + (kappa / 1.65) * aw / (1 - aw)), "
             "aw = relative humidity")
# a reading's flags: the bits of its "<name>.q" record (docs/measurements.md "Quality flags",
# firmware/node/sampler.py FLAG_NAMES); a pack's time: the bits of its "time.q" record
# (docs/protocol.md "Time"; bit 4 is the gateway's, agent/timesync.py)
QUALITY_FLAGS = ("warmup", "range", "stale", "stuck", "crc", "nack", "timeout", "failed",
                 "absent", "saving")
TIME_FLAGS = ("relative", "before", "gateway")
# the Device model's controlledProperty vocabulary
CONTROLLED = {"temperature": "temperature", "humidity": "humidity",
              "pressure": "atmosphericPressure", "illuminance": "light", "pm1": "airPollution",
              "pm2_5": "airPollution", "pm4": "airPollution", "pm10": "airPollution",
              "co2": "airPollution", "LAeq": "noiseLevel", "LAmax": "noiseLevel",
              "lamp_power": "power", "lamp_voltage": "power", "lamp_current": "power",
              "battery": "batterySupply"}
# node health goes on the Device entity under these names
HEALTH = {"battery": ("batteryVoltage", "VLT"), "uptime": ("uptime", "SEC"),
          "heap_free": ("heapFree", "AD"), "outbox": ("outboxDepth", None)}


# a location that says "not known" (Streetlight requires one): GeoJSON with empty
# coordinates, which RFC 7946 §3.1 lets a reader take as a null geometry, and which the
# Smart Data Models' location (MultiPoint) allows
NOWHERE: dict[str, Any] = {"type": "MultiPoint", "coordinates": []}


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _datetime(t: float) -> dict[str, str]:
    return {"@type": "DateTime", "@value": iso(t)}


def _prop(value: Any, t: float, unit: str | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"type": "Property", "value": value, "observedAt": iso(t)}
    if unit:
        p["unitCode"] = unit
    return p


def entity_id(model: str, node: str, meta: NodeMeta) -> str:
    if model == "Streetlight" and meta.pole:
        return f"urn:ngsi-ld:Streetlight:lantern:pole-{meta.pole}"
    if ":" in node:  # a third-party sensor, "<scheme>:<name>" (split_name)
        return f"urn:ngsi-ld:{model}:{node}"
    return f"urn:ngsi-ld:{model}:lantern:{node}"


def split_name(n: str) -> tuple[str, str]:
    """(device, measurement) of a resolved SenML name urn:dev:<scheme>:<id>:<measurement>.

    The device is the node id for Lantern's own nodes (urn:dev:lantern:SL-0042:co2 →
    SL-0042, which has no ':') and "<scheme>:<id>" for third-party sensors the gateway
    reads (urn:dev:bthome:park-1:temperature → bthome:park-1). ValueError for anything else.
    """
    parts = n[8:].split(":", 2) if n.startswith("urn:dev:") else []
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"not a device reading name urn:dev:<scheme>:<id>:<measurement>: {n!r}")
    scheme, ident, measurement = parts
    return (ident if scheme == "lantern" else f"{scheme}:{ident}"), measurement


def entities(records: Iterable[dict[str, Any]], nodes: dict[str, NodeMeta],
             skipped: Counter[str] | None = None, firmware: Mapping[str, str] | None = None,
             now: float | None = None, lamp_state: bool = True,
             states: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Entities for resolved SenML records; one per (node, model, observation time).

    firmware: node → the version it last reported (agent/ota/rollout.py), put on its Device
    entity as `firmwareVersion`, observed at `now` (when the gateway says so: a pack does not
    carry it, a STATUS does).

    lamp_state: give the Streetlight entity a `status` ("ok") and a `powerState` from a
    LAMP_ON_W threshold, as a gateway without [health] must (the model requires a status).
    False when the health monitor sends them (agent/health/streetlight.py: from the lamp's
    rating and its open faults); a reading must not overwrite them with a guess.

    states: node → its state in the fleet registry (agent/registry.py), the Device entity's
    `deviceState` ("ok" for a node the registry does not hold).

    A record no model can hold is left out: without a number (`vs`, `vb`, `vd`), or of a
    measurement no model has. One whose name is not a device's or whose time is beyond
    what a DateTime can say is left out too, and counted in `skipped` by reason.

    Flags (docs/upstream.md): a `<name>.q` record becomes the `qualityFlags` sub-property of
    its reading's attribute (of the same pack), a pack's `time.q` the `timeQuality`
    sub-property of every attribute observed at the pack's time; a flagged pack's entity is
    never merged with an unflagged one. A `<name>.q` whose reading the pack lacks (`failed`,
    `absent`, `stale`) is counted as "unpaired", one that is not a bit field as "flag".
    """
    records = list(records)
    qualities, times = _flags(records, skipped)
    used: set[tuple[str, str, str]] = set()
    groups: defaultdict[tuple[str, str, float, int], dict[str, Any]] = defaultdict(dict)
    controlled: defaultdict[str, set[str]] = defaultdict(set)
    # corrections of one sample: (node, t, time.q) → measurement → ("corr" | "offset", value)
    fixes: defaultdict[tuple[str, float, int], dict[tuple[str, str], Any]] = defaultdict(dict)
    for r in records:
        if "v" not in r:
            continue
        try:
            node, measurement = split_name(r["n"])
        except ValueError:
            if skipped is not None:
                skipped["name"] += 1
            continue
        if measurement.endswith(".q"):
            continue  # in `qualities` and `times`
        t = float(r["t"])
        if not TIME_MIN <= t <= TIME_MAX:
            if skipped is not None:
                skipped["time"] += 1
            continue
        if measurement in CONTROLLED:
            controlled[node].add(CONTROLLED[measurement])
        frame = _frame(r)
        tq = times.get((node, frame), 0)
        fix = _fix(measurement)
        if fix is not None:
            fixes[(node, t, tq)][fix] = r["v"]
            continue
        attr = ATTRS.get(measurement)
        if attr is not None:
            group = groups[(node, attr.model, t, tq)]
            group[attr.name] = _prop(attr.convert(r["v"]), t, attr.unit_code)
            if lamp_state and attr.model == "Streetlight" and measurement == "lamp_power":
                group["powerState"] = _prop("on" if r["v"] > LAMP_ON_W else "off", t)
            flagged = [group[attr.name], group.get("powerState")] if (
                measurement == "lamp_power") else [group[attr.name]]
        elif measurement in HEALTH:
            name, unit = HEALTH[measurement]
            prop = groups[(node, "Device", t, tq)][name] = _prop(r["v"], t, unit)
            flagged = [prop]
        else:
            continue
        q = qualities.get((node, measurement, frame))
        if q is not None:
            used.add((node, measurement, frame))
            for prop in flagged:
                if prop is not None:  # a reading's flags hold for what is derived from it
                    prop["qualityFlags"] = _flagged(q, QUALITY_FLAGS, t)
    unpaired = sum(1 for key in qualities.keys() - used if key[1] in ATTRS or key[1] in HEALTH)
    if skipped is not None and unpaired:
        skipped["unpaired"] += unpaired
    for (node, t, tq), found in fixes.items():
        _attach(groups, (node, t, tq), found, skipped)
    out = []
    for (node, model, t, tq), attrs in sorted(groups.items(), key=lambda kv: kv[0][2]):
        meta = nodes.get(node, NodeMeta())
        e: dict[str, Any] = {"id": entity_id(model, node, meta), "type": model, **attrs}
        if meta.lat is not None and meta.lon is not None:
            e["location"] = {"type": "GeoProperty",
                             "value": {"type": "Point", "coordinates": [meta.lon, meta.lat]}}
        if model == "NoiseLevelObserved":
            e["dateObservedFrom"] = _prop(_datetime(t - meta.interval_s), t)
            e["dateObservedTo"] = _prop(_datetime(t), t)
        elif model == "Streetlight":
            if lamp_state:
                e["status"] = _prop("ok", t)
            if "location" not in e:  # the model requires one: a pole without coordinates
                e["location"] = {"type": "GeoProperty", "value": dict(NOWHERE)}
            if meta.pole:
                e["streetPoleNum"] = _prop(meta.pole, t)
        elif model == "Device":
            e["controlledProperty"] = _prop(sorted(controlled[node]) or ["temperature"], t)
            e["dateLastValueReported"] = _prop(_datetime(t), t)
            e["deviceState"] = _prop((states or {}).get(node, "ok"), t)
            if firmware and node in firmware:
                e["firmwareVersion"] = _prop(firmware[node],
                                             time.time() if now is None else now)
        if model != "Device":
            # Streetlight names its observation time differently from the observed models
            e["observationDateTime" if model == "Streetlight" else "dateObserved"] = _prop(
                _datetime(t), t)
            device = entity_id("Device", node, meta)
            # Streetlight's model takes a list of devices; the observed models take one
            e["refDevice"] = {"type": "Relationship",
                              "object": [device] if model == "Streetlight" else device}
        if tq:  # the pack's time is not exact: said on everything observed at it
            stamp = iso(t)
            for a in e.values():
                if isinstance(a, dict) and a.get("observedAt") == stamp:
                    a["timeQuality"] = _flagged(tq, TIME_FLAGS, t)
        e["@context"] = CONTEXTS
        out.append(e)
    return out


def _frame(r: dict[str, Any]) -> str:
    """The pack a record came in: its reading id's `<node>:<seq>`, else (no id) its time."""
    rid = r.get("id")
    return rid.rpartition(":")[0] if isinstance(rid, str) else f"t={r.get('t')}"


def _flags(records: list[dict[str, Any]], skipped: Counter[str] | None
           ) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], int]]:
    """The packs' flag records: (node, measurement, frame) → its `<measurement>.q` bits, and
    (node, frame) → the pack's `time.q` bits. A flag that is not a bit field is counted."""
    qualities: dict[tuple[str, str, str], int] = {}
    times: dict[tuple[str, str], int] = {}
    for r in records:
        n = r.get("n")
        if not isinstance(n, str) or not n.endswith(".q"):
            continue
        try:
            node, measurement = split_name(n)
        except ValueError:
            continue  # counted with the records
        v = r.get("v")
        if type(v) is not int or v < 0:
            if skipped is not None:
                skipped["flag"] += 1
            continue
        if v == 0:
            continue  # nothing flagged (a node never sends one)
        if measurement == TIME_Q:
            times[(node, _frame(r))] = v
        else:
            qualities[(node, measurement[:-2], _frame(r))] = v
    return qualities, times


def _flagged(bits: int, names: tuple[str, ...], t: float) -> dict[str, Any]:
    """Flags as a Property: the names of the bits set, with the bit field itself as `bits`
    (which keeps a bit this gateway has no name for)."""
    p = _prop([name for i, name in enumerate(names) if bits >> i & 1], t)
    p["bits"] = _prop(bits, t)
    return p


def _fix(measurement: str) -> tuple[str, str] | None:
    """("corr" | "offset" | "kappa", the measurement it belongs to) for a correction record."""
    base, _, kind = measurement.rpartition("_")
    if kind == "corr" and base in CORRECTED:
        return "corr", base
    if kind == "offset" and base in OFFSET:
        return "offset", base
    if measurement == KAPPA:
        return "kappa", ""
    return None


def _attach(groups: dict[tuple[str, str, float, int], dict[str, Any]],
            sample: tuple[str, float, int], found: dict[tuple[str, str], Any],
            skipped: Counter[str] | None) -> None:
    """One sample's corrections as sub-properties of the attributes they correct.

    `<pm>_corr` → the pm attribute's `humidityCorrected` (its value, unit, `method`, `kappa`);
    `<name>_offset` → the attribute's `calibrationOffset` (the value includes it: the raw
    reading is value - offset), converted as the attribute is. A correction whose attribute
    is not in the sample has nothing to qualify: counted in `skipped` as "unpaired"."""
    kappa = found.get(("kappa", ""), KAPPA_DEFAULT)
    for (kind, name), v in found.items():
        if kind == "kappa":
            continue
        attr = ATTRS[name]
        node, t, tq = sample
        prop = groups.get((node, attr.model, t, tq), {}).get(attr.name)
        if prop is None:
            if skipped is not None:
                skipped["unpaired"] += 1
            continue
        if kind == "corr":
            sub = _prop(attr.convert(v), t, attr.unit_code)
            sub["method"] = _prop(PM_METHOD, t)
            sub["kappa"] = _prop(kappa, t)
            prop["humidityCorrected"] = sub
        else:
            prop["calibrationOffset"] = _prop(attr.convert(v), t, attr.unit_code)


# what a Lantern node measures, for a Device entity of a node no reading has shown yet
LANTERN_CONTROLLED = ("airPollution", "atmosphericPressure", "humidity", "light", "noiseLevel",
                      "power", "temperature")


def device_entity(node: str, state: str, now: float, *, firmware: str | None = None,
                  last_seen: float | None = None, lat: float | None = None,
                  lon: float | None = None, board: str = "",
                  controlled: Iterable[str] = ()) -> dict[str, Any]:
    """A node's Device entity from its fleet registry record (agent/registry.py): its state
    (provisioned, active, silent, revoked) as `deviceState`, observed at `now`."""
    meta = NodeMeta(lat=lat, lon=lon)
    e: dict[str, Any] = {
        "id": entity_id("Device", node, meta), "type": "Device",
        "controlledProperty": _prop(sorted(set(controlled)) or list(LANTERN_CONTROLLED), now),
        "deviceState": _prop(state, now)}
    if firmware:
        e["firmwareVersion"] = _prop(firmware, now)
    if board:
        e["hardwareVersion"] = _prop(board, now)
    if last_seen is not None and TIME_MIN <= last_seen <= TIME_MAX:
        e["dateLastValueReported"] = _prop(_datetime(last_seen), now)
    if lat is not None and lon is not None:
        e["location"] = {"type": "GeoProperty", "value": {"type": "Point",
                                                          "coordinates": [lon, lat]}}
    e["@context"] = CONTEXTS
    return e


def rounds(ents: list[dict[str, Any]], max_batch: int = MAX_BATCH) -> list[list[dict[str, Any]]]:
    """Upsert requests in time order, each holding an entity id at most once and ≤ max_batch.

    Two observations of one entity in one request would leave their order to the broker.
    """
    out: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    ids: set[str] = set()
    for e in ents:
        if e["id"] in ids or len(current) >= max_batch:
            out.append(current)
            current, ids = [], set()
        current.append(e)
        ids.add(e["id"])
    if current:
        out.append(current)
    return out


def key_values(entity: dict[str, Any]) -> dict[str, Any]:
    """The key-values form the Smart Data Models schemas validate (their README's recipe)."""
    kv: dict[str, Any] = {}
    for k, v in entity.items():
        if k == "@context":
            continue
        if isinstance(v, dict) and v.get("type") in ("Property", "GeoProperty"):
            val = v["value"]
            kv[k] = val["@value"] if isinstance(val, dict) and "@value" in val else val
        elif isinstance(v, dict) and v.get("type") == "Relationship":
            kv[k] = v["object"]
        else:
            kv[k] = v
    return kv
