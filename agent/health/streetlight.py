"""A lamp's state as the FIWARE Smart Data Models Streetlight entity (NGSI-LD, normalized).

`status` (ok, defectiveLamp, columnIssue; brokenLantern is for a broken luminaire housing,
which no measurement shows), `powerState` (on, low = dimmed, off), the switching dates,
`lifetimePowerConsumption` (kWh measured since the gateway first saw the lamp) and
`powerRating`. Same id as the readings' Streetlight entity (agent/ngsi.py), so an upsert
with `options=update` adds these attributes to it.
"""

from __future__ import annotations

from typing import Any

from ..ngsi import CONTEXTS, NOWHERE, NodeMeta, entity_id, iso
from .monitor import LampView

POWER_STATE = {"on": "on", "dimmed": "low", "off": "off"}
# an open condition → the entity's status; the first that applies wins
STATUS = (("LampDarkAtNight", "defectiveLamp"), ("LampCycling", "defectiveLamp"),
          ("LampPowerOffRating", "defectiveLamp"),
          # a day-burner's lamp works: its photocell or controller, in the column, does not
          ("LampDayBurner", "columnIssue"))


def status(alerts: tuple[str, ...] | list[str]) -> str:
    for alert, value in STATUS:
        if alert in alerts:
            return value
    return "ok"


def entity(lamp: LampView, meta: NodeMeta, t: float) -> dict[str, Any]:
    """The Streetlight entity of one lamp, observed at t (the lamp's latest sample)."""

    def prop(value: Any, unit: str | None = None) -> dict[str, Any]:
        p: dict[str, Any] = {"type": "Property", "value": value, "observedAt": iso(t)}
        if unit:
            p["unitCode"] = unit
        return p

    def when(x: float) -> dict[str, Any]:
        return prop({"@type": "DateTime", "@value": iso(x)})

    e: dict[str, Any] = {"id": entity_id("Streetlight", lamp.node, meta), "type": "Streetlight",
                         "status": prop(status(lamp.alerts)),
                         "lifetimePowerConsumption": prop(round(lamp.kwh, 4), "KWH"),
                         "powerRating": prop(lamp.rating_w, "WTT"),
                         "observationDateTime": when(t)}
    if lamp.state in POWER_STATE:
        e["powerState"] = prop(POWER_STATE[lamp.state])
    if lamp.last_on is not None:
        e["dateLastSwitchingOn"] = when(lamp.last_on)
    if lamp.last_off is not None:
        e["dateLastSwitchingOff"] = when(lamp.last_off)
    # the model requires a location: a pole without coordinates ([nodes] location unset)
    # gets the null geometry (the sink counts those, agent/sinks/ngsi_ld.py)
    e["location"] = {"type": "GeoProperty", "value": (
        {"type": "Point", "coordinates": [meta.lon, meta.lat]}
        if meta.lat is not None and meta.lon is not None else dict(NOWHERE))}
    if meta.pole:
        e["streetPoleNum"] = prop(meta.pole)
    e["refDevice"] = {"type": "Relationship", "object": [entity_id("Device", lamp.node, meta)]}
    e["@context"] = CONTEXTS
    return e
