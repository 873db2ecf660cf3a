"""NGSI-LD fixtures: a node's metadata and SenML records of every measurement."""

from __future__ import annotations

import json

from lantern.agent import ngsi
from lantern.agent.queue.resolve import Batch

T0 = 1_764_331_200

NODES = {"SL-0042": ngsi.NodeMeta(pole="42", lat=52.3702, lon=4.8952, interval_s=60)}


FULL = [("temperature", 21.5, "Cel"), ("humidity", 48.25, "%RH"), ("pressure", 101325, "Pa"),
        ("illuminance", 3.5, "lx"), ("pm1", 3.0, "ug/m3"), ("pm2_5", 12.5, "ug/m3"),
        ("pm4", 14.0, "ug/m3"), ("pm10", 20.0, "ug/m3"), ("co2", 420, "ppm"),
        ("LAeq", 55.2, "dB"), ("LAmax", 71.0, "dB"), ("lamp_power", 35.5, "W"),
        ("lamp_voltage", 230.1, "V"), ("lamp_current", 0.154, "A"), ("uptime", 3600, "s"),
        ("heap_free", 51000, "B"), ("outbox", 0, None)]


def records(node: str = "SL-0042", seq: int = 0, t: float = T0,
            which: list[tuple[str, float, str | None]] = FULL) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for i, (name, v, u) in enumerate(which):
        r: dict[str, object] = {"n": f"urn:dev:lantern:{node}:{name}", "t": t, "v": v,
                                "id": f"{node}:{seq}:{i}"}
        if u:
            r["u"] = u
        out.append(r)
    return out


def batch(recs: list[dict[str, object]]) -> Batch:
    return Batch(1, len(recs), T0, [str(r["id"]) for r in recs],
                 [json.dumps(r) for r in recs])
