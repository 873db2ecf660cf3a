"""The health families for /metrics: open conditions, raised/cleared counts, each lamp's
state, energy, day-burn waste and emissions, street totals, and alert delivery.

Built at scrape time from the service's own state (like agent/metrics.py's collector):
register `HealthCollector(service)` on the gateway's registry. The Prometheus rules shipped
with the gateway (packaging/prometheus/lantern-alerts.yml) alert on these names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .alerts import RULES

if TYPE_CHECKING:
    from .service import HealthService

LAMP_STATES = ("on", "dimmed", "off", "unknown")


class HealthCollector(Collector):
    def __init__(self, service: HealthService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        health = svc.health
        cond = health.conditions
        g = GaugeMetricFamily("lantern_health_condition", "1 for each open health condition "
                              "(docs/alerts.md)", labels=["alertname", "node", "measurement",
                                                          "severity"])
        for (alert, node, subject) in sorted(cond.open):
            g.add_metric([alert, node, subject, RULES[alert][0]], 1.0)
        yield g
        for name, doc, counts in (("raised", "Health conditions raised", cond.raised),
                                  ("cleared", "Health conditions cleared", cond.cleared)):
            c = CounterMetricFamily(f"lantern_health_{name}", doc, labels=["alertname"])
            for alert in RULES:
                c.add_metric([alert], counts.get(alert, 0))
            yield c
        lamps = svc.lamps()
        st = GaugeMetricFamily("lantern_lamp_state", "1 for the lamp's state (on, dimmed, off; "
                               "from its power against its rating)", labels=["node", "state"])
        pw = GaugeMetricFamily("lantern_lamp_power_watts", "The lamp's latest power reading",
                               labels=["node"])
        for v in lamps:
            for s in LAMP_STATES:
                st.add_metric([v.node, s], 1.0 if v.state == s else 0.0)
            if v.power_w is not None:
                pw.add_metric([v.node], v.power_w)
        yield st
        yield pw
        for name, doc, attr in (
            ("lantern_lamp_energy_kwh", "Energy the lamp drew over its measured time "
             "(never interpolated across a gap)", "kwh"),
            ("lantern_lamp_burning_hours", "Hours the lamp burned", "burning_h"),
            ("lantern_lamp_dayburn_kwh", "Energy the lamp burned in full daylight",
             "dayburn_kwh"),
            ("lantern_lamp_co2e_kg", "Emissions of the lamp's energy at the configured grid "
             "intensity", "co2e_kg"),
            ("lantern_lamp_unmeasured_hours", "Hours between samples too far apart to "
             "integrate (a silent node)", "unmeasured_h"),
        ):
            c = CounterMetricFamily(name, doc, labels=["node"])
            for v in lamps:
                c.add_metric([v.node], getattr(v, attr))
            yield c
            yield CounterMetricFamily(name.replace("lantern_lamp_", "lantern_street_"),
                                      f"{doc}: every lamp of the gateway",
                                      value=sum(getattr(v, attr) for v in lamps))
        yield GaugeMetricFamily("lantern_grid_intensity_grams_per_kwh", "The grid carbon "
                                "intensity the emissions are computed with (gCO2e/kWh)",
                                value=health.s.grid_g_per_kwh)
        w = GaugeMetricFamily("lantern_alert_outbox", "Alert notifications waiting for their "
                              "target", labels=["target"])
        d = CounterMetricFamily("lantern_alert_deliveries", "Alert notifications delivered",
                                labels=["target"])
        f = CounterMetricFamily("lantern_alert_delivery_failures", "Alert notification "
                                "attempts that failed (kept and retried)", labels=["target"])
        for t in svc.targets:
            w.add_metric([t.name], svc.waiting.get(t.name, 0))
            d.add_metric([t.name], svc.delivered.get(t.name, 0))
            f.add_metric([t.name], svc.failed.get(t.name, 0))
        yield w
        yield d
        yield f
        dropped = CounterMetricFamily(
            "lantern_alert_notifications_dropped", "Alert notifications that left the outbox "
            "undelivered: a firing and its resolved never tried (coalesced), or the oldest "
            "beyond the outbox's cap (cap)", labels=["target", "reason"])
        for t in svc.targets:
            dropped.add_metric([t.name, "coalesced"], svc.store.coalesced.get(t.name, 0))
            dropped.add_metric([t.name, "cap"], svc.store.dropped.get(t.name, 0))
        yield dropped
        yield from self._monitor()

    def _monitor(self) -> Iterator[Metric]:
        """The monitor's own trouble: what it could not save, take or judge."""
        svc = self.service
        health = svc.health
        yield CounterMetricFamily("lantern_health_store_errors", "health.sqlite failing "
                                  "(a feed, a silence check or a delivery's bookkeeping)",
                                  value=svc.store_errors)
        c = CounterMetricFamily("lantern_health_skipped", "Batches of the queue the monitor "
                                "let go unjudged: its store failing (store) or a bug (bug)",
                                labels=["reason"])
        for why in ("store", "bug"):
            c.add_metric([why], svc.skipped.get(why, 0))
        yield c
        r = CounterMetricFamily("lantern_health_readings_refused", "Readings the monitor does "
                                "not judge: a pack ahead of the gateway's clock (future), a lamp "
                                "power no lamp draws (power), a name no sensor has (name), a "
                                "pack without a time (malformed)", labels=["reason"])
        for why in ("future", "power", "name"):
            r.add_metric([why], health.refused.get(why, 0))
        r.add_metric(["malformed"], health.ignored)
        yield r
        yield CounterMetricFamily("lantern_health_backlog_samples", "Lamp samples older than "
                                  "the lamp's latest (a backlog): counted, not integrated",
                                  value=sum(n.energy.m.out_of_order
                                            for n in health.nodes.values()))
