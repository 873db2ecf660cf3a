"""Counters the gateway keeps, and their Prometheus export (text format via prometheus_client).

The hot path only bumps plain integers and dicts; Prometheus families are built from them
at scrape time by a custom collector, so there is one source of truth and no double count.
prometheus_client itself (~1 MB resident) is imported by the first scrape, not at start: a
cabinet nobody scrapes never loads it (idle memory, issue 22).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

# Every reason a frame can be refused (agent/protocol.py, agent/ingest.py); exported at 0
# before the first one so that rate() and alerts work from the start.
REJECT_REASONS = ("oversize", "cobs", "short", "crc", "type", "cbor", "cose", "mac",
                  "unknown_node", "replay", "senml", "unexpected", "queue_full", "internal",
                  "seq_collision", "reflected", "revoked", "retired")
# A BLE link's counters (agent/links/ble.py, BleLink.stats) exported as lantern_ble_<key>
BLE_COUNTERS = (
    ("connects", "GATT connections attempted to nodes"),
    ("session_failures", "GATT sessions that failed (connect refused, GATT error)"),
    ("drains", "GATT sessions that emptied a node's backlog"),
    ("frames", "Frames received over GATT, before verification"),
    ("adverts", "Adverts received"),
    ("adverts_accepted", "BTHome adverts of our nodes accepted"),
    ("advert_duplicates", "BTHome adverts seen again (the radio repeating one), ignored"),
    ("adverts_foreign", "BTHome adverts of devices that are not ours"),
    ("advert_empty", "Third-party BTHome adverts that carried no reading"),
    ("third_party_readings", "Readings taken from third-party BTHome sensors"),
    ("store_errors", "Third-party readings whose commit failed"),
    ("scanner_starts", "Scanner starts"),
    ("scanner_start_failures", "Scanner starts that failed (retried with backoff)"),
    ("scanner_restarts", "Scanner restarts after no advert for scan_stall_s"),
    ("addresses_proven", "Addresses that authenticated as a node (session or encrypted advert)"),
    ("address_evictions", "Unproven addresses claiming a node dropped for newer claimers"),
    ("address_conflicts", "Adverts naming another node from a node's proven address, ignored"),
    ("adverts_unproven", "BTHome adverts of our nodes from addresses not proven, ignored"),
    ("connects_unproven", "GATT connections attempted to addresses not proven yet"),
)
# What a BLE link refuses, by kind (its stats' rejected_<kind>); exported at 0 from the start
BLE_REJECTS = ("advert_replay", "advert_plain", "bthome", "bthome_key", "bthome_mic",
               "unknown_node", "lantern_advert", "segment", "oversize", "short")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class NodeSeen:
    """Where and when a node's last authentic frame arrived."""

    last_seen: float
    link: str
    seq: int


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.total += v

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(acc)))
        return out


SKIP_REASONS = ("name", "time", "topic")  # why a sink leaves a reading out (agent/sinks)
# why the local API refused a request (agent/api.py): a Host it does not serve, a missing or
# wrong token, an Authorization header that is not even a bearer token
API_REFUSALS = ("host", "token", "malformed")


class Metrics:
    def __init__(self) -> None:
        self.frames_received: Counter[str] = Counter()  # by node
        self.frames_rejected: Counter[str] = Counter()  # by reason
        self.duplicates: Counter[str] = Counter()  # by node
        self.readings_stored = 0
        self.readings_delivered = 0
        self.acks_sent = 0
        self.commits = 0
        self.store_errors = 0
        self.commit_error: str | None = None  # why commits fail now (disk full, read-only)
        self.upstream_failures = 0
        self.dead_letters = 0
        # dead letters dropped beyond their bound (agent/queue/diskcap.py), as of the last commit
        self.dead_letters_dropped = 0
        self.window_restarts = 0  # fresh replay windows, for a key new to its node
        self.evictions = 0  # mirrors store.cap.evicted (agent/queue/diskcap.py) for summaries
        self.nodes: dict[str, NodeSeen] = {}
        self.upstream_latency: dict[tuple[str, str], Histogram] = {}  # (sink, outcome)
        self.ble_links: dict[str, Counter[str]] = {}  # BLE link name → its stats (links/ble.py)
        self.api_refused: Counter[str] = Counter()  # by reason (API_REFUSALS)
        # the fleet's live operations (agent/fleetops.py): key rotations and group settings
        # pushed, by outcome; nodes off their group's config version (set by the fleet task)
        self.rekeys: Counter[str] = Counter()
        self.config_pushes: Counter[str] = Counter()
        self.config_drift: int | None = None
        self.started = time.time()

    def seen(self, node: str, link: str, seq: int) -> None:
        """An authentic frame from `node` arrived on `link`."""
        self.nodes[node] = NodeSeen(time.time(), link, seq)

    def upstream_request(self, sink: str, ok: bool, seconds: float) -> None:
        key = (sink, "ok" if ok else "error")
        self.upstream_latency.setdefault(key, Histogram()).observe(seconds)

    def snapshot(self) -> dict[str, object]:
        return {
            "frames_received": dict(self.frames_received),
            "frames_rejected": dict(self.frames_rejected),
            "duplicates": dict(self.duplicates),
            "readings_stored": self.readings_stored,
            "readings_delivered": self.readings_delivered,
            "acks_sent": self.acks_sent,
            "commits": self.commits,
            "store_errors": self.store_errors,
            "upstream_failures": self.upstream_failures,
            "dead_letters": self.dead_letters,
            "dead_letters_dropped": self.dead_letters_dropped,
            "window_restarts": self.window_restarts,
            "evictions": self.evictions,
        }


@dataclass
class Gauges:
    """Values read from the store and the links just before a scrape."""

    queue_readings: int = 0
    queue_bytes: int = 0
    oldest_age_s: float | None = None
    store_file_bytes: int = 0
    recent_rows: int = 0
    links_up: dict[str, bool] = field(default_factory=dict)
    link_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)  # in, out
    upstream_up: dict[str, bool | None] = field(default_factory=dict)
    sink_skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # sink → reason → n
    sink_redirects: dict[str, dict[int, int]] = field(default_factory=dict)  # sink → 3xx → n
    last_seen: dict[str, float] = field(default_factory=dict)  # node → unix time
    nodes_configured: int = 0
    evictions: int = 0  # the disk cap's counters (agent/queue/diskcap.py)
    history_trimmed: int = 0
    paused: bool = False
    cap_bytes: int = 0
    # staged updates (agent/ota/rollout.py): the current or last rollout's nodes by state,
    # whether it halted (None: no rollout yet), each node's firmware, bundles refused
    update_nodes: dict[str, int] = field(default_factory=dict)
    rollout_halted: bool | None = None
    firmware: dict[str, str] = field(default_factory=dict)
    bundles_refused: dict[str, int] = field(default_factory=dict)
    # the fleet registry (agent/registry.py): its nodes by state
    fleet_states: dict[str, int] = field(default_factory=dict)


class LanternCollector:
    """Builds the `lantern_*` families from Metrics and the latest Gauges (a
    prometheus_client Collector)."""

    def __init__(self, metrics: Metrics, gauges: Callable[[], Gauges], version: str) -> None:
        self.metrics = metrics
        self.gauges = gauges
        self.version = version

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m, g = self.metrics, self.gauges()
        yield _gauge("lantern_build_info", "Gateway version", [("version", self.version)], 1)
        yield _gauge("lantern_start_time_seconds", "When the gateway started (unix time)",
                     [], m.started)
        c = CounterMetricFamily("lantern_frames_received", "Authentic frames received",
                                labels=["node"])
        for node, n in sorted(m.frames_received.items()):
            c.add_metric([node], n)
        yield c
        c = CounterMetricFamily("lantern_frames_rejected", "Frames refused, by reason",
                                labels=["reason"])
        for reason in sorted(set(REJECT_REASONS) | set(m.frames_rejected)):
            c.add_metric([reason], m.frames_rejected.get(reason, 0))
        yield c
        c = CounterMetricFamily("lantern_frames_duplicate", "Frames received again (already "
                                "stored or pending), by node", labels=["node"])
        for node, n in sorted(m.duplicates.items()):
            c.add_metric([node], n)
        yield c
        for name, doc, value in (
            ("readings_stored", "Readings committed to the queue", m.readings_stored),
            ("readings_delivered", "Readings confirmed by a sink", m.readings_delivered),
            ("acks_sent", "ACK frames sent to nodes", m.acks_sent),
            ("commits", "Queue transactions committed", m.commits),
            ("store_errors", "Queue commits that failed (frames not acknowledged)",
             m.store_errors),
            ("upstream_failures", "Upstream deliveries that failed (retried)",
             m.upstream_failures),
            ("dead_letters", "Authentic frames whose payload could not be decoded or "
             "resolved, kept in the queue's dead_letters table", m.dead_letters),
            ("dead_letters_dropped", "Dead letters deleted, oldest first, beyond their bound "
             "or to make room under the disk cap", m.dead_letters_dropped),
            ("replay_window_restarts", "Replay windows started for a key new to its node "
             "(provisioned again); a key seen before gets its own window back",
             m.window_restarts),
        ):
            yield CounterMetricFamily(f"lantern_{name}", doc, value=value)
        yield CounterMetricFamily("lantern_evictions", "Undelivered readings evicted by the "
                                  "disk cap (policy evict_oldest)", value=g.evictions)
        yield CounterMetricFamily("lantern_history_trimmed", "Recent-readings rows dropped to "
                                  "make room under the disk cap", value=g.history_trimmed)
        yield _gauge("lantern_queue_paused", "1 while intake is paused at the disk cap "
                     "(policy pause_intake)", [], 1.0 if g.paused else 0.0)
        yield _gauge("lantern_queue_cap_bytes", "The disk cap (0: none)", [], g.cap_bytes)
        yield _gauge("lantern_queue_readings", "Readings waiting for upstream", [],
                     g.queue_readings)
        yield _gauge("lantern_queue_bytes", "Bytes of readings waiting for upstream", [],
                     g.queue_bytes)
        yield _gauge("lantern_queue_oldest_age_seconds",
                     "Age of the oldest undelivered reading (0 when none waits)", [],
                     g.oldest_age_s or 0.0)
        yield _gauge("lantern_store_file_bytes", "Size of the queue database and its WAL", [],
                     g.store_file_bytes)
        yield _gauge("lantern_history_samples", "Samples (a node's readings at one time) kept "
                     "for the status page", [], g.recent_rows)
        yield _gauge("lantern_nodes_configured", "Nodes with a key", [], g.nodes_configured)
        if g.fleet_states:
            fs = GaugeMetricFamily("lantern_fleet_nodes", "Nodes of the fleet registry, by "
                                   "state (provisioned, active, silent, revoked)",
                                   labels=["state"])
            for state in ("provisioned", "active", "silent", "revoked"):
                fs.add_metric([state], g.fleet_states.get(state, 0))
            yield fs
        lu = GaugeMetricFamily("lantern_link_up", "1 if the link's device is open",
                               labels=["link"])
        for link, up in sorted(g.links_up.items()):
            lu.add_metric([link], 1.0 if up else 0.0)
        yield lu
        for i, (name, doc) in enumerate((("lantern_link_received_bytes", "Bytes read from a link"),
                                         ("lantern_link_sent_bytes", "Bytes written to a link"))):
            c = CounterMetricFamily(name, doc, labels=["link"])
            for link, pair in sorted(g.link_bytes.items()):
                c.add_metric([link], pair[i])
            yield c
        yield from _ble_families(m.ble_links)
        uu = GaugeMetricFamily("lantern_upstream_up", "1 if the sink's last delivery succeeded, "
                               "0 if it failed (absent before the first)", labels=["sink"])
        for sink, ok in sorted(g.upstream_up.items()):
            if ok is not None:
                uu.add_metric([sink], 1.0 if ok else 0.0)
        yield uu
        sk = CounterMetricFamily("lantern_sink_skipped_readings",
                                 "Readings a sink cannot express (an NGSI-LD entity, an MQTT "
                                 "topic) and leaves out; the other sinks still get them",
                                 labels=["sink", "reason"])
        for sink, reasons in sorted(g.sink_skipped.items()):
            for reason in SKIP_REASONS:
                sk.add_metric([sink, reason], reasons.get(reason, 0))
        yield sk
        rd = CounterMetricFamily("lantern_upstream_redirects",
                                 "Redirects (3xx) a sink got instead of delivery; never "
                                 "followed: the batch is kept and retried",
                                 labels=["sink", "status"])
        for sink, statuses in sorted(g.sink_redirects.items()):
            for status, n in sorted(statuses.items()):
                rd.add_metric([sink, str(status)], n)
        yield rd
        c = CounterMetricFamily("lantern_api_refused", "Requests the local API refused, by "
                                "reason (host: a Host it does not serve)", labels=["reason"])
        for reason in sorted(set(API_REFUSALS) | set(m.api_refused)):
            c.add_metric([reason], m.api_refused.get(reason, 0))
        yield c
        yield from _fleet_families(m)
        h = HistogramMetricFamily("lantern_upstream_request_duration_seconds",
                                  "Time for one batch POST upstream, by sink and outcome",
                                  labels=["sink", "outcome"])
        for (sink, outcome), hist in sorted(m.upstream_latency.items()):
            h.add_metric([sink, outcome], hist.cumulative(), hist.total)
        yield h
        ls = GaugeMetricFamily("lantern_node_last_seen_timestamp_seconds",
                               "When the node's last authentic frame arrived (unix time)",
                               labels=["node"])
        for node, t in sorted(g.last_seen.items()):
            ls.add_metric([node], t)
        yield ls
        yield from _update_families(g)


REKEY_OUTCOMES = ("done", "promoted", "refused", "failed")  # agent/fleetops.py
CONFIG_OUTCOMES = ("applied", "refused", "failed")


def _fleet_families(m: Metrics) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    c = CounterMetricFamily("lantern_fleet_key_rotations", "Live key rotations by outcome "
                            "(done; promoted: the node's frames under its next key before the "
                            "COMMIT answer; refused; failed: no answer, tried again)",
                            labels=["outcome"])
    for k in sorted(set(REKEY_OUTCOMES) | set(m.rekeys)):
        c.add_metric([k], m.rekeys.get(k, 0))
    yield c
    c = CounterMetricFamily("lantern_fleet_config_pushes", "Group settings sent to nodes, by "
                            "outcome (refused: the node named a setting it does not take)",
                            labels=["outcome"])
    for k in sorted(set(CONFIG_OUTCOMES) | set(m.config_pushes)):
        c.add_metric([k], m.config_pushes.get(k, 0))
    yield c
    if m.config_drift is not None:
        yield _gauge("lantern_fleet_config_drift", "Nodes of a group not on its config version "
                     "(or refusing it)", [], m.config_drift)


def _update_families(g: Gauges) -> Iterator[Metric]:
    """lantern_update_* and lantern_node_firmware_info (docs/rollout.md)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    from .ota.rollout import NODE_STATES

    un = GaugeMetricFamily("lantern_update_nodes", "Nodes of the current (or last) rollout, by "
                           "state", labels=["state"])
    for state in NODE_STATES:
        un.add_metric([state], g.update_nodes.get(state, 0))
    yield un
    yield _gauge("lantern_update_rollout_halted", "1 if the current (or last) rollout halted "
                 "(a node rolled back or refused it, or the operator stopped it), else 0",
                 [], 1.0 if g.rollout_halted else 0.0)
    c = CounterMetricFamily("lantern_update_bundles_refused", "Update bundles the gateway "
                            "refused before sending them to any node, by reason",
                            labels=["reason"])
    for reason, n in sorted(g.bundles_refused.items()):
        c.add_metric([reason], n)
    yield c
    fw = InfoMetricFamily("lantern_node_firmware", "The firmware version each node last "
                          "reported", labels=["node"])
    for node, version in sorted(g.firmware.items()):
        fw.add_metric([node], {"version": version})
    yield fw


def _ble_families(links: dict[str, Counter[str]]) -> Iterator[Metric]:
    """lantern_ble_* by link, from each BLE link's own counters (read, never copied)."""
    if not links:
        return
    from prometheus_client.core import CounterMetricFamily

    for key, doc in BLE_COUNTERS:
        c = CounterMetricFamily(f"lantern_ble_{key}", doc, labels=["link"])
        for link, stats in sorted(links.items()):
            c.add_metric([link], stats.get(key, 0))
        yield c
    c = CounterMetricFamily("lantern_ble_rejected", "Adverts and GATT segments a BLE link "
                            "refused, by kind", labels=["link", "kind"])
    for link, stats in sorted(links.items()):
        kinds = set(BLE_REJECTS) | {k[9:] for k in stats if k.startswith("rejected_")}
        for kind in sorted(kinds):
            c.add_metric([link, kind], stats.get(f"rejected_{kind}", 0))
    yield c


def _gauge(name: str, doc: str, labels: list[tuple[str, str]], value: float) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    g = GaugeMetricFamily(name, doc, labels=[k for k, _ in labels])
    g.add_metric([v for _, v in labels], value)
    return g


def registry(metrics: Metrics, gauges: Callable[[], Gauges], version: str,
             extra: Sequence[Collector] = ()) -> CollectorRegistry:
    """A registry of our own (never the global one): the gateway's families, those of its
    optional parts (`extra`: the health monitor's, agent/health/metrics.py) and process stats."""
    from prometheus_client import ProcessCollector
    from prometheus_client.registry import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(LanternCollector(metrics, gauges, version))
    for collector in extra:
        reg.register(collector)
    ProcessCollector(registry=reg)
    return reg


def as_dict(g: Gauges) -> dict[str, Any]:
    return {k: getattr(g, k) for k in g.__dataclass_fields__}


class TimedSink:
    """Wraps a sink so that every send() lands in the upstream latency histogram."""

    def __init__(self, sink: Any, metrics: Metrics) -> None:
        self._sink = sink
        self._metrics = metrics
        self.name: str = sink.name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._sink, attr)

    async def send(self, batch: Any) -> None:
        t0 = time.monotonic()
        try:
            await self._sink.send(batch)
        except Exception:
            self._metrics.upstream_request(self.name, False, time.monotonic() - t0)
            raise
        self._metrics.upstream_request(self.name, True, time.monotonic() - t0)
