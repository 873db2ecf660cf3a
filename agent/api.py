"""The gateway's local HTTP API and status page (aiohttp), on 127.0.0.1 unless configured.

/healthz (open), /metrics (Prometheus text), /api/status, /api/nodes (with the fleet
registry's record of each node; /api/nodes.csv the same as CSV, docs/fleet.md), /api/nodes/{id},
/api/nodes/{id}/readings?since=&name=&limit=, /api/health (the street: lamps, energy,
open alerts, pole locations; docs/alerts.md), /api/rollout (GET; POST a bundle to start one)
and /api/rollout/halt (POST; docs/rollout.md), and the status page at / (static files from
agent/status/, no CDN). With [api] token_file set, /metrics and /api/* want
`Authorization: Bearer <token>`. Only Host names the API serves are answered (HostRule: a
DNS-rebinding page never reads node data), and every answer carries SECURITY_HEADERS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import io
import ipaddress
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from lantern import __version__

from .config import ApiConfig
from .metrics import Gauges, Metrics, registry
from .ngsi import NodeMeta
from .ota.rollout import BUNDLE_MAX, RolloutError, RolloutManager
from .queue.history import find_gaps, typical_interval
from .queue.store import Store
from .registry import API_FIELDS, CSV_FIELDS, Registry
from .timesync import TimeSync

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

    from .health.service import HealthService

log = logging.getLogger("lantern.api")

OVERVIEW_TTL_S = 1.0
DEFAULT_WINDOW_S = 3600.0
STATIC = ("index.html", "status.js", "status.css")
BATTERY = ("battery", "battery_pct", "battery_v", "supply_v")  # first one a node reports
OUTBOX_DEEP = 20  # frames waiting on a node before the table flags it
# "<name>.q" records carry a reading's quality bits (firmware/node/sampler.py); "stale" (the
# chip's cadence is slower than the interval) is normal and not raised as a flag
QUALITY_BITS = ("warmup", "range", None, "stuck", "crc", "nack", "timeout", "failed", "absent",
                "saving")  # docs/measurements.md; bit 9 only on battery.q
# the status page loads its own script, style and JSON, nothing inline, nothing from elsewhere
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOGGED_HOSTS_MAX = 32  # refused Host values logged by name; later ones only counted
_HOST_PORT = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(:[0-9]*)?")


class Named(Protocol):
    name: str


class Upstream(Protocol):
    """A forwarder: the sink it feeds and whether its last delivery worked."""

    sink: Any
    upstream_ok: bool | None


@dataclass
class GatewayView:
    """What the API may read of a running gateway."""

    metrics: Metrics
    store: Store
    node_ids: Sequence[str]
    links: Sequence[Named]
    upstreams: Sequence[Upstream]
    store_files: Sequence[Path] = ()
    rollout: RolloutManager | None = None  # staged updates (agent/ota/rollout.py)
    health: HealthService | None = None  # lamp faults, energy, alerts (agent/health/)
    nodes_meta: Mapping[str, NodeMeta] = field(default_factory=dict)  # poles, coordinates
    registry: Registry | None = None  # the fleet registry (agent/registry.py)
    clock: TimeSync | None = None  # the gateway's clock's synchronisation (agent/timesync.py)
    _cache: tuple[float, dict[str, Any]] | None = None  # (valid until, overview)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def overview(self) -> dict[str, Any]:
        """The store's view, at most OVERVIEW_TTL_S old, one query however many clients ask."""
        async with self._lock:
            if self._cache and time.monotonic() < self._cache[0]:
                return self._cache[1]
            t0 = time.monotonic()
            ov = await self.store.overview()
            # a long backlog makes the queue scan slow: then ask less often, so that the
            # store's thread stays free for commits (at most ~5% of it goes to this)
            took = time.monotonic() - t0
            self._cache = (time.monotonic() + max(OVERVIEW_TTL_S, 20 * took), ov)
            return ov

    def links_up(self) -> dict[str, bool]:
        return {link.name: bool(getattr(link, "connected", False)) for link in self.links}

    def upstream(self) -> dict[str, bool | None]:
        return {str(getattr(u.sink, "name", "?")): u.upstream_ok for u in self.upstreams}

    def gauges(self, ov: dict[str, Any]) -> Gauges:
        files = 0
        cap = getattr(self.store, "cap", None)  # the disk cap, when the store has one
        for p in self.store_files:
            with contextlib.suppress(OSError):
                files += p.stat().st_size
        return Gauges(
            queue_readings=ov["queue_readings"], queue_bytes=ov["queue_bytes"],
            oldest_age_s=ov["oldest_age_s"], store_file_bytes=files,
            recent_rows=ov["recent_rows"], links_up=self.links_up(),
            link_bytes={link.name: (int(getattr(link, "bytes_in", 0)),
                                    int(getattr(link, "bytes_out", 0))) for link in self.links},
            upstream_up=self.upstream(), last_seen=self.last_seen(ov),
            sink_skipped={str(getattr(u.sink, "name", "?")): dict(getattr(u.sink, "skipped", {}))
                          for u in self.upstreams},
            sink_redirects={str(getattr(u.sink, "name", "?")):
                            dict(getattr(u.sink, "redirects", {})) for u in self.upstreams},
            nodes_configured=len(self.node_ids),
            evictions=int(getattr(cap, "evicted", 0)),
            history_trimmed=int(getattr(cap, "history_trimmed", 0)),
            paused=bool(getattr(cap, "paused", False)),
            cap_bytes=int(getattr(cap, "max_bytes", 0)),
            fleet_states=self.fleet_states(ov),
            **self.update_gauges())

    def fleet(self, ov: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each registry record as a row, with this run's last-seen times."""
        if self.registry is None:
            return {}
        now = time.time()
        return {r.id: r.row(now) for r in self.registry.live(self.last_seen(ov))}

    def fleet_states(self, ov: dict[str, Any]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.fleet(ov).values():
            counts[str(row["state"])] = counts.get(str(row["state"]), 0) + 1
        return counts

    def update_gauges(self) -> dict[str, Any]:
        """The rollout's per-state node counts, whether it halted, every node's firmware."""
        r = self.rollout
        if r is None:
            return {}
        st = r.status()
        ro = st["rollout"]
        return {"update_nodes": dict(ro["counts"]) if ro else {},
                "rollout_halted": None if ro is None else ro["halted"],
                "firmware": dict(r.firmware),
                "bundles_refused": dict(r.refused)}

    def last_seen(self, ov: dict[str, Any]) -> dict[str, float]:
        """Newest of what this run saw and what the store remembers from earlier runs."""
        seen = {n: float(v["last_seen"]) for n, v in ov["nodes"].items()}
        for n, s in self.metrics.nodes.items():
            seen[n] = max(seen.get(n, 0.0), s.last_seen)
        return seen

    async def summary(self) -> str:
        """One line for systemd's STATUS= and the page header."""
        ov = await self.overview()
        seen = self.last_seen(ov)
        links = self.links_up()
        up = self.upstream()
        sinks = ", ".join(f"{s} {'ok' if ok else 'unknown' if ok is None else 'FAILING'}"
                          for s, ok in up.items()) or "none"
        oldest = ov["oldest_age_s"]
        return (f"{sum(1 for n in self.node_ids if n in seen)}/{len(self.node_ids)} nodes seen, "
                f"{sum(links.values())}/{len(links)} links up, queue {ov['queue_readings']}"
                + (f" (oldest {oldest:.0f}s)" if oldest is not None else "")
                + f", upstream {sinks}, {self.metrics.readings_delivered} delivered")


def node_entry(view: GatewayView, ov: dict[str, Any], node: str, now: float) -> dict[str, Any]:
    """One row of the node table: identity, last seen, link, battery, outbox, flags, values."""
    m = view.metrics
    seen = view.last_seen(ov).get(node)
    latest = ov["latest"].get(node, {})
    interval = ov["intervals"].get(node)
    live = m.nodes.get(node)
    flags = []
    rec = view.fleet(ov).get(node, {})
    if rec.get("state") == "revoked":
        flags.append("revoked")
    elif node not in view.node_ids:
        flags.append("no key")
    if seen is None:
        flags.append("never seen")
    elif now - seen > 3 * (interval or 60.0):
        flags.append("stale")
    battery = next((dict(latest[k], n=k) for k in BATTERY if k in latest), None)
    outbox = latest.get("outbox", {}).get("v")
    if isinstance(outbox, int | float) and outbox >= OUTBOX_DEEP:
        flags.append("backlog")
    if m.duplicates.get(node):
        flags.append("duplicates")
    # quality flags ride in the pack: "<name>.q" bit masks, text or boolean records
    newest = max((r["t"] for r in latest.values()), default=None)
    for name, r in sorted(latest.items()):
        if name.endswith(".q"):
            if r["t"] == newest and isinstance(r.get("v"), int | float):
                bits = [b for i, b in enumerate(QUALITY_BITS) if b and int(r["v"]) >> i & 1]
                if bits:
                    flags.append(f"{name[:-2]}: {', '.join(bits)}")
        elif "vs" in r and r["vs"] not in ("", "ok"):
            flags.append(f"{name}: {r['vs']}")
        elif r.get("vb") is True:
            flags.append(name)
    return {
        "id": node,
        "configured": node in view.node_ids,
        "last_seen": seen,
        "age_s": None if seen is None else round(now - seen, 3),
        "link": live.link if live else None,
        "last_seq": live.seq if live else None,
        "frames_received": m.frames_received.get(node, 0),
        "frames_total": ov["nodes"].get(node, {}).get("frames", 0),
        "duplicates": m.duplicates.get(node, 0),
        "interval_s": interval,
        "battery": battery,
        "outbox": outbox,
        "flags": flags,
        "firmware": (view.rollout.firmware.get(node) if view.rollout else None
                     ) or rec.get("firmware"),
        "latest": latest,
        # the fleet registry's record (docs/fleet.md); None where the node has none
        **{k: rec.get(k) for k in API_FIELDS},
    }


def fleet_csv(rows: Any) -> str:
    """Registry rows as CSV (CSV_FIELDS), times as ISO 8601 UTC."""
    import csv  # (only when asked: idle memory, issue 22)

    out = io.StringIO()
    w = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(k, row.get(k)) for k in CSV_FIELDS})
    return out.getvalue()


def _csv_value(k: str, v: Any) -> Any:
    if v is None:
        return ""
    if k in ("last_seen", "revoked"):
        return datetime.datetime.fromtimestamp(v, datetime.UTC).isoformat(timespec="seconds")
    return v


def street(view: GatewayView, now: float) -> dict[str, Any]:
    """/api/health: every configured or seen node at its pole (lat/lon from [nodes]), its
    lamp as the health monitor sees it, and the open alerts; `configured` false without
    [health] (then only the places)."""
    h = view.health
    lamps = {v.node: v for v in h.lamps(now)} if h is not None else {}
    alerts: dict[str, list[dict[str, Any]]] = {}
    if h is not None:
        from .health.alerts import RULES

        for (alert, node, subject), o in sorted(h.health.conditions.open.items()):
            alerts.setdefault(node, []).append({
                "alert": alert, "measurement": subject or None, "severity": RULES[alert][0],
                "since": o.starts_at, "summary": o.summary})
    ids = sorted(set(view.node_ids) | set(view.nodes_meta) | set(lamps) | set(alerts))
    nodes = []
    for node in ids:
        meta = view.nodes_meta.get(node, NodeMeta())
        lamp = lamps.get(node)
        nodes.append({
            "id": node, "pole": meta.pole or None, "lat": meta.lat, "lon": meta.lon,
            "lamp": None if lamp is None else {
                "state": lamp.state, "power_w": lamp.power_w, "rating_w": lamp.rating_w,
                "t": lamp.t, "last_on": lamp.last_on, "last_off": lamp.last_off,
                "kwh": lamp.kwh, "today_kwh": lamp.today_kwh, "burning_h": lamp.burning_h,
                "dayburn_kwh": lamp.dayburn_kwh, "co2e_kg": lamp.co2e_kg,
                "unmeasured_h": lamp.unmeasured_h},
            "alerts": alerts.get(node, [])})
    totals = {k: sum(getattr(v, k) for v in lamps.values())
              for k in ("kwh", "today_kwh", "dayburn_kwh", "co2e_kg", "burning_h")}
    return {"configured": h is not None, "now": now, "nodes": nodes, "totals": totals,
            "grid_g_per_kwh": h.health.s.grid_g_per_kwh if h is not None else None,
            "raised": dict(h.health.conditions.raised) if h is not None else {},
            "cleared": dict(h.health.conditions.cleared) if h is not None else {}}


def parse_since(text: str | None, now: float) -> float:
    """`since` as unix seconds, ISO 8601, or a negative offset from now (-900)."""
    if text is None or text == "":
        return now - DEFAULT_WINDOW_S
    try:
        v = float(text)
        if not math.isfinite(v):  # nan and inf parse as floats, and are no time (nor JSON)
            raise web.HTTPBadRequest(text=f"since={text!r}: not a time")
    except ValueError:
        try:
            dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise web.HTTPBadRequest(
                text=f"since={text!r}: expected unix seconds, ISO 8601 or a negative offset"
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.UTC)
        return dt.timestamp()
    return now + v if v < 0 else v


def host_of(value: str) -> str | None:
    """A Host header's name, lower-case, without port or brackets; None if it is not one."""
    m = _HOST_PORT.fullmatch(value) if value.isascii() and value.isprintable() else None
    if m is None or not m.group(1):
        return None
    name = m.group(1).lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name.removeprefix("[").removesuffix("]")))
    except ValueError:
        return None if name.startswith("[") else name


class HostRule:
    """Which Host values are answered. A browser sends the name it was pointed at, so a page
    of attacker.example whose DNS now says 127.0.0.1 names attacker.example: refused."""

    def __init__(self, listen: str, allowed: Sequence[str] = ()) -> None:
        addr = None if listen == "localhost" else ipaddress.ip_address(listen)
        self.loopback = addr is None or addr.is_loopback
        self.wildcard = addr is not None and addr.is_unspecified  # 0.0.0.0 or ::
        self.names = {str(addr) if addr else "localhost", *allowed}

    def allows(self, host: str | None) -> bool:
        if host is None:
            return False
        if host in self.names:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:  # a name: only localhost, and only where loopback reaches us
            return host == "localhost" and (self.loopback or self.wildcard)
        # the machine's own addresses when bound to all of them: an address is not a name
        # anybody can re-point, so rebinding cannot use it
        return self.wildcard or (self.loopback and addr.is_loopback)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guard(rule: HostRule, token: str | None, metrics: Metrics) -> Callable[..., Any]:
    """The Host rule for every path, then the bearer token for /api/ and /metrics."""
    expected = token.encode() if token else None
    logged: set[str] = set()

    def refuse(reason: str, what: str, key: str) -> None:
        """Counted always; logged once per key (a host; a kind of malformed header)."""
        metrics.api_refused[reason] += 1
        if reason == "token" or key in logged:
            return
        if len(logged) >= LOGGED_HOSTS_MAX:
            key, what = "*", "more of them"
            if key in logged:
                return
        logged.add(key)
        log.warning("api: refused %s; counted in lantern_api_refused_total{reason=\"%s\"}, "
                    "logged once", what, reason)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = request.headers.get("Host")
        host = None if raw is None else host_of(raw)
        if raw is not None and not rule.allows(host):
            refuse("host", f"Host {raw[:100]!r}: not a name this API serves (if it should, "
                   "add it to [api] allowed_hosts)", host or raw[:100])
            raise web.HTTPMisdirectedRequest(
                text="421 this gateway does not serve that Host (see [api] allowed_hosts)\n")
        if expected is not None and request.path.startswith(("/api/", "/metrics")):
            got = request.headers.get("Authorization")
            scheme, _, cred = (got or "").partition(" ")
            if got is not None and not (got.isascii() and got.isprintable()
                                        and scheme.lower() == "bearer" and cred):
                refuse("malformed", "an Authorization header that is not `Bearer <token>` in "
                       "printable ASCII (401)", "malformed")
            elif hmac.compare_digest(cred.encode(), expected):
                return await handler(request)
            else:
                refuse("token", "", "")
            raise web.HTTPUnauthorized(
                text="a bearer token is required (see [api] token_file)",
                headers={"WWW-Authenticate": 'Bearer realm="lantern"'})
        return await handler(request)

    return guard


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


class Api:
    def __init__(self, view: GatewayView, token: str | None = None,
                 cfg: ApiConfig | None = None) -> None:
        self.view = view
        self._registry: CollectorRegistry | None = None  # made by the first scrape
        self._scrape_gauges = Gauges()
        cfg = cfg or ApiConfig()
        rule = HostRule(cfg.host, cfg.allowed_hosts)
        # a bundle is the largest body the API takes (POST /api/rollout)
        self.app = web.Application(middlewares=[_guard(rule, token, view.metrics)],
                                   client_max_size=BUNDLE_MAX + 1)
        self.app.on_response_prepare.append(_secure)
        r = self.app.router
        r.add_get("/", self.page)
        for name in STATIC:
            r.add_get(f"/{name}", self.static)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/api/status", self.status)
        r.add_get("/api/nodes", self.nodes)
        r.add_get("/api/nodes.csv", self.nodes_csv)
        r.add_get("/api/nodes/{id}", self.node)
        r.add_get("/api/nodes/{id}/readings", self.readings)
        r.add_get("/api/health", self.health)
        r.add_get("/api/rollout", self.rollout)
        r.add_post("/api/rollout", self.rollout_start)
        r.add_post("/api/rollout/halt", self.rollout_halt)

    def _gauges_for_scrape(self) -> Gauges:
        return self._scrape_gauges

    @property
    def registry(self) -> CollectorRegistry:
        """The exporter's families; built, and prometheus_client loaded, when first asked
        for (a cabinet nobody scrapes never loads them: idle memory, issue 22)."""
        if self._registry is None:
            view = self.view
            extra: list[Collector] = []
            if view.health is not None:
                from .health.metrics import HealthCollector

                extra.append(HealthCollector(view.health))
            if view.clock is not None:
                extra.append(view.clock.collector())
            self._registry = registry(view.metrics, self._gauges_for_scrape, __version__,
                                      extra)
        return self._registry

    async def page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        return self._file(request.path.lstrip("/"))

    @staticmethod
    def _file(name: str) -> web.Response:
        import importlib.resources  # (only when a page is asked for: idle memory, issue 22)

        body = importlib.resources.files("lantern.agent").joinpath("status", name).read_bytes()
        kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
        return web.Response(body=body, content_type=kind[name.rsplit(".", 1)[1]],
                            charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness (we answer at all) and readiness (store answers, a link is up)."""
        store_ok = True
        try:
            ov = await asyncio.wait_for(self.view.overview(), 5.0)
        except Exception as e:  # any store failure makes us unready, never a 500
            store_ok, ov = False, None
            log.warning("healthz: store did not answer: %r", e)
        links = self.view.links_up()
        up = self.view.upstream()
        failing = self.view.metrics.commit_error  # answers reads, but cannot take a frame
        ready = store_ok and failing is None and any(links.values())
        paused = bool(getattr(getattr(self.view.store, "cap", None), "paused", False))
        clock = None if self.view.clock is None else self.view.clock.health()
        degraded = (not all(links.values()) or any(v is False for v in up.values())
                    or paused or (clock is not None and not clock["synchronized"]))
        body = {
            "status": "ok" if ready and not degraded else "degraded" if ready else "unready",
            "live": True, "ready": ready, "version": __version__,
            "links": {"up": sum(links.values()), "total": len(links), "by_link": links},
            "store": "not answering" if not store_ok else "ok" if failing is None
            else f"commits failing: {failing}",
            "intake": "paused (queue at its disk cap)" if paused else "open",
            "queue": None if ov is None else {"readings": ov["queue_readings"],
                                              "oldest_age_s": ov["oldest_age_s"]},
            "upstream": {s: "unknown" if ok is None else "ok" if ok else "failing"
                         for s, ok in up.items()},
            # not synchronised: nodes are not given the time (docs/time.md)
            "clock": clock,
        }
        return web.json_response(body, status=200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        from prometheus_client import exposition

        self._scrape_gauges = self.view.gauges(await self.view.overview())
        encoder, ctype = exposition.choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": ctype})

    async def status(self, request: web.Request) -> web.Response:
        v, m = self.view, self.view.metrics
        ov = await v.overview()
        g = v.gauges(ov)
        latency = {f"{s}:{o}": {"count": h.count, "sum_s": round(h.total, 6)}
                   for (s, o), h in m.upstream_latency.items()}
        return web.json_response({
            "version": __version__, "now": time.time(), "started": m.started,
            "summary": await v.summary(),
            "queue": {"readings": g.queue_readings, "bytes": g.queue_bytes,
                      "oldest_age_s": g.oldest_age_s, "store_file_bytes": g.store_file_bytes,
                      "dead_letters": ov["dead_letters"], "evictions": g.evictions,
                      "paused": g.paused, "cap_bytes": g.cap_bytes},
            "upstream": {s: {"state": "unknown" if ok is None else "ok" if ok else "failing"}
                         for s, ok in g.upstream_up.items()},
            "upstream_latency": latency,
            "clock": None if v.clock is None else v.clock.health(),
            "links": [{"name": n, "up": up, "bytes_in": g.link_bytes[n][0],
                       "bytes_out": g.link_bytes[n][1]} for n, up in g.links_up.items()],
            "counters": m.snapshot(),
        })

    def _all_nodes(self, ov: dict[str, Any]) -> list[str]:
        reg = self.view.registry
        return sorted(set(self.view.node_ids) | set(ov["nodes"]) | set(self.view.metrics.nodes)
                      | {r.id for r in (reg.records() if reg else ())})

    async def nodes_csv(self, request: web.Request) -> web.Response:
        """The fleet registry as CSV (`lantern gateway nodes --csv` reads the file)."""
        rows = self.view.fleet(await self.view.overview())
        return web.Response(text=fleet_csv(rows[n] for n in sorted(rows)),
                            content_type="text/csv")

    async def nodes(self, request: web.Request) -> web.Response:
        ov = await self.view.overview()
        now = time.time()
        return web.json_response({"now": now, "nodes": [
            node_entry(self.view, ov, n, now) for n in self._all_nodes(ov)]})

    async def node(self, request: web.Request) -> web.Response:
        ov = await self.view.overview()
        node = request.match_info["id"]
        if node not in self._all_nodes(ov):
            raise web.HTTPNotFound(text=f"no node {node!r} (not configured, never seen)")
        return web.json_response(node_entry(self.view, ov, node, time.time()))

    async def readings(self, request: web.Request) -> web.Response:
        node = request.match_info["id"]
        ov = await self.view.overview()
        if node not in self._all_nodes(ov):
            raise web.HTTPNotFound(text=f"no node {node!r} (not configured, never seen)")
        now = time.time()
        since = parse_since(request.query.get("since"), now)
        try:
            limit = int(request.query.get("limit", "5000"))
        except ValueError:
            raise web.HTTPBadRequest(text="limit: expected an integer") from None
        name = request.query.get("name") or None
        rows, more, times = await self.view.store.recent(node, since, limit, name)
        interval = ov["intervals"].get(node) or typical_interval(times)
        gaps: list[list[float | None]] = [[a, b] for a, b in find_gaps(times, interval)]
        if not more and times and interval and now - times[-1] > max(2.5 * interval,
                                                                      interval + 2):
            gaps.append([times[-1], None])  # still missing: nothing since the last sample
        return web.json_response({
            "node": node, "since": since, "now": now, "interval_s": interval,
            "readings": rows, "more": more,
            "next_since": rows[-1]["t"] if rows else since, "gaps": gaps})

    async def health(self, request: web.Request) -> web.Response:
        """The street: each lamp's state, energy and open alerts, where its pole stands."""
        return web.json_response(street(self.view, time.time()))

    def _updates(self) -> RolloutManager:
        if self.view.rollout is None:
            raise web.HTTPServiceUnavailable(text="this gateway runs no rollouts\n")
        return self.view.rollout

    async def rollout(self, request: web.Request) -> web.Response:
        if self.view.rollout is None:  # a view without updates: nothing to show, no error
            return web.json_response({"configured": False, "gateway_version": __version__,
                                      "rollout": None, "firmware": {}, "bundles_refused": {}})
        return web.json_response(self.view.rollout.status())

    async def rollout_start(self, request: web.Request) -> web.Response:
        """POST the bundle itself (application/octet-stream): a type a form cannot send."""
        _same_origin(request)
        manager = self._updates()
        if request.content_type != "application/octet-stream":
            raise web.HTTPUnsupportedMediaType(text="POST the bundle as "
                                               "application/octet-stream\n")
        args = _rollout_args(request.query)
        bundle = await request.read()  # 413 beyond client_max_size
        resp = await _rollout_call(self.view, manager.start(bundle, **args))
        return resp if resp.status != 200 else web.json_response(manager.status(), status=201)

    async def rollout_halt(self, request: web.Request) -> web.Response:
        """Halt the running rollout; wants a JSON body ({} or {"reason": "..."})."""
        _same_origin(request)
        manager = self._updates()
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="POST {} as application/json\n")
        try:
            body = await request.json()
        except ValueError:
            body = None
        reason = body.get("reason") if isinstance(body, dict) else None
        if reason is not None and not (isinstance(reason, str) and reason.isprintable()):
            raise web.HTTPBadRequest(text="reason: one line of text\n")
        why = f"halted by the operator: {reason[:200]}" if reason else "halted by the operator"
        return await _rollout_call(self.view, manager.halt(why))


# what a refused start or halt answers, by RolloutError.kind
ROLLOUT_STATUS = {"refused": 422, "busy": 409, "idle": 409, "unconfigured": 503,
                  "bad_request": 400}


def _same_origin(request: web.Request) -> None:
    """A browser page of another site may POST to a loopback API (no token needed there):
    refuse any request a browser marks as coming from another origin. Scripts send none."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise web.HTTPForbidden(text=f"Origin {origin[:100]!r}: rollouts are started and "
                                "halted from this gateway's own page or `lantern gateway "
                                "rollout`, not from another site\n")


def _rollout_args(q: Any) -> dict[str, Any]:
    """?canary=N|id,id&step=K&nodes=id,id → RolloutManager.start's arguments."""
    out: dict[str, Any] = {}
    canary = q.get("canary")
    if canary:
        out["canary"] = int(canary) if canary.isdigit() else [
            c for c in canary.split(",") if c]
    step = q.get("step")
    if step:
        if not step.isdigit():
            raise web.HTTPBadRequest(text=f"step={step[:40]!r}: expected a whole number\n")
        out["step"] = int(step)
    nodes = q.get("nodes")
    if nodes:
        out["nodes"] = [n for n in nodes.split(",") if n]
    return out


async def _rollout_call(view: GatewayView, action: Awaitable[Any]) -> web.Response:
    try:
        await action
    except RolloutError as e:
        return web.json_response({"error": str(e), "kind": e.kind},
                                 status=ROLLOUT_STATUS.get(e.kind, 400))
    assert view.rollout is not None
    return web.json_response(view.rollout.status())


class ApiServer:
    """Serves Api while the gateway runs; a port in use is logged, never fatal."""

    def __init__(self, cfg: ApiConfig, view: GatewayView) -> None:
        self.cfg = cfg
        token = cfg.token_file.read_text().strip() if cfg.token_file else None
        self.api = Api(view, token, cfg)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.error: str | None = None

    async def __aenter__(self) -> ApiServer:
        if not self.cfg.enabled:
            return self
        self._runner = web.AppRunner(self.api.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port)
        try:
            await site.start()
        except OSError as e:
            # The data path matters more than the page: keep ingesting, say so loudly.
            await self._runner.cleanup()
            self._runner = None
            self.error = (f"API not listening: {self.cfg.host}:{self.cfg.port}: "
                          f"{e.strerror or e}; set another [api] port")
            log.error("%s", self.error)
            return self
        port = self._runner.addresses[0][1]
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        self.url = f"http://{host}:{port}/"
        log.info("status page and API at %s", self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
