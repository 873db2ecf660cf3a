"""Corrections end to end (docs/corrections.md): nodes on MicroPython with provisioned offsets,
the real gateway, the HTTP upstream. Every corrected value arrives beside its raw one, equal to
the method's formula over the values in the same pack; every offset arrives with its unit; the
records with a secondary unit say their SenML version."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lantern.agent.units import UNITS

from .harness.delivery import check_delivery
from .harness.topology import Topology

OFFSETS = {"temperature": -0.7, "humidity": 2.5, "LAeq": 1.5}
SECONDARY = {"ppm", "ug/m3", "ms"}


def formula(raw: float, rh: float, kappa: float = 0.4) -> int:
    """Crilley et al. 2018 as docs/corrections.md writes it, rounded to whole ug/m3."""
    aw = rh / 100
    return round(raw / (1 + (kappa / 1.65) * aw / (1 - aw)))


async def test_corrections_reach_the_city_beside_the_raw_values(topology: Topology) -> None:
    topology.sample_limit = 10
    topology.node_extra = {"offsets": OFFSETS}
    await topology.start()
    total = lambda: sum(sum(topology.sampled(n).values()) for n in topology.nodes)  # noqa: E731
    await topology.wait_for(
        lambda: all(len(topology.sampled(n)) == 10 and not topology.outbox(n)
                    for n in topology.nodes) and len(topology.upstream.readings) == total(),
        60, "every pack upstream")
    check_delivery(topology)  # bit-exact, each frame's MAC checked by pycose

    packs: dict[tuple[str, float], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in topology.upstream.readings.values():
        node, _, name = r["n"].rpartition(":")
        packs[(node, r["t"])][name] = r
    corrected = 0
    for (node, _), p in packs.items():
        for name, off in OFFSETS.items():
            if name in p:  # a sensor that answered has its offset beside it
                o = p[name + "_offset"]
                assert o["v"] == off and o["u"] == UNITS[name], (node, o)
        for pm in ("pm1", "pm2_5", "pm4", "pm10"):
            if pm + "_corr" in p:
                assert pm in p, (node, pm)  # raw kept
                rh = p["humidity"]["v"]
                assert p[pm + "_corr"]["v"] == formula(p[pm]["v"], rh), (node, pm, rh)
                assert p[pm + "_corr"]["u"] == "ug/m3"
                corrected += 1
        for r in p.values():
            assert (r.get("bver") == 26) == (r.get("u") in SECONDARY), r  # RFC 9100 §4
    assert corrected >= len(topology.nodes) * 4, "no particulate reading was corrected"
    assert topology.upstream.conflicting == 0
