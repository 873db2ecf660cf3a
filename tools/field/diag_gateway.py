"""`lantern diag gateway`: a gateway's health from its local API, for a technician or a script.

Exit status: 0 healthy, 1 degraded (the report says why), 2 unreachable.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

HEALTHY, DEGRADED, UNREACHABLE = 0, 1, 2
STATES = {HEALTHY: "healthy", DEGRADED: "degraded", UNREACHABLE: "unreachable"}
DEFAULT_URL = "http://127.0.0.1:8470/"
GAP_WINDOW_S = 3600.0
QUEUE_OLD_S = 600.0  # readings older than this still waiting for upstream: a stuck sink
SECURITY_KINDS = ("mac", "unknown_node", "replay")  # rejections a technician must look into
# the API's own refusals in plain text (agent/api.py: a bad option, a foreign Origin, a
# content type a form could send); anything else that is not JSON is not the Lantern API
API_PLAIN = (400, 403, 415)


class Unreachable(Exception):
    """The API did not answer: the message says what was tried."""


def url_from_config(path: Path) -> tuple[str, Path | None]:
    """The API's URL and bearer-token file, read from the gateway's own config."""
    from lantern.agent.config import load_config

    cfg = load_config(path)
    host = f"[{cfg.api.host}]" if ":" in cfg.api.host else cfg.api.host
    return f"http://{host}:{cfg.api.port}/", cfg.api.token_file


def api_target(url: str | None, config: Path | None, token_file: Path | None
               ) -> tuple[str, str | None]:
    """The API's URL and bearer token from --url, --config and --token-file (the options
    override the config). ConfigError if the config or the token file is refused."""
    if config:
        cfg_url, cfg_token = url_from_config(config)
        url, token_file = url or cfg_url, token_file or cfg_token
    token = None
    if token_file:
        from lantern.agent.config import check_secret_file

        # a token others can read is refused here as the gateway refuses it
        token = check_secret_file(token_file, "API token").strip()
    return url or DEFAULT_URL, token


async def request(session: aiohttp.ClientSession, method: str, url: str,
                  **kw: Any) -> tuple[int, Any]:
    """(status, JSON body) of one API call; Unreachable if what answers is not the API.

    The API's answers that are not JSON (a body over its size limit, an exception in the
    gateway, its plain-text refusals) come back as {"kind", "error"}, saying what happened."""
    # never followed: the bearer token goes to the URL given and nowhere else
    async with session.request(method, url, allow_redirects=False, **kw) as r:
        if 300 <= r.status < 400:
            raise Unreachable(f"{url}: HTTP {r.status} redirect, not the Lantern API "
                              "(it never redirects): check --url")
        if r.status == 401:
            raise Unreachable(f"{url}: the API wants a bearer token: pass --token-file (the "
                              "file named by [api] token_file) or --config gateway.toml")
        if r.content_type == "application/json":
            return r.status, await r.json()
        text = (await r.text(errors="replace"))[:200].strip()
        said = f"{r.content_type}{': ' + text if text else ''}"
        if r.status == 413:  # aiohttp's answer beyond the API's client_max_size
            from lantern.agent.ota.rollout import BUNDLE_MAX

            data = kw.get("data")
            size = f" ({len(data):,} bytes)" if isinstance(data, bytes) else ""
            return 413, {"kind": "too_large", "error": (
                f"{url}: HTTP 413: the bundle{size} is too big: the gateway takes at most "
                f"{BUNDLE_MAX:,} bytes (4 MiB); a node's whole firmware is a few hundred KiB, "
                "so check that this is a bundle from `lantern release build`")}
        if r.status == 500:  # an exception in the gateway: aiohttp answers in plain text
            return 500, {"kind": "server_error", "error": (
                f"{url}: HTTP 500: the gateway failed on this request ({said}); see its log "
                "(journalctl -u lantern-gateway) and report it with the log")}
        if r.status in API_PLAIN and r.content_type == "text/plain" and text:
            return r.status, {"kind": "bad_request", "error": f"HTTP {r.status}: {text}"}
        raise Unreachable(f"{url}: HTTP {r.status}, not the Lantern API ({said}): check --url")


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    return await request(session, "GET", url)


async def fetch(url: str, token: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Everything the report needs, in parallel where it can be."""
    base = url if url.endswith("/") else url + "/"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    t = aiohttp.ClientTimeout(total=timeout)
    try:
        async with aiohttp.ClientSession(timeout=t, headers=headers) as s:
            (_, health), status, nodes, rollout = await asyncio.gather(
                _get(s, base + "healthz"), _must(s, base + "api/status"),
                _must(s, base + "api/nodes"), _rollout(s, base))
            gaps = await asyncio.gather(*(
                _get(s, f"{base}api/nodes/{n['id']}/readings?since=-{GAP_WINDOW_S:.0f}&limit=1")
                for n in nodes["nodes"] if n.get("last_seen") is not None))
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise Unreachable(f"no gateway API at {base} ({type(e).__name__}: {e}): is "
                          "`lantern gateway run` up (systemctl status lantern-gateway)? is "
                          "[api] enabled, and on this host and port?") from None
    return {"health": health, "status": status, "nodes": nodes, "rollout": rollout,
            "readings": {g[1]["node"]: g[1] for g in gaps}}


async def _must(s: aiohttp.ClientSession, url: str) -> Any:
    """The body of a GET the report cannot do without; Unreachable with the API's word."""
    code, body = await _get(s, url)
    if code != 200:
        why = body.get("error") if isinstance(body, dict) else None
        raise Unreachable(why or f"{url}: HTTP {code}")
    return body


async def _rollout(s: aiohttp.ClientSession, base: str) -> dict[str, Any] | None:
    """GET /api/rollout; None from a gateway without rollouts (older, or none configured)."""
    try:
        code, body = await _get(s, base + "api/rollout")
    except Unreachable:  # an older gateway: 404 in plain text
        return None
    return body if code == 200 and isinstance(body, dict) else None


def report(url: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The technician's view of what the API said, with the problems spelled out."""
    health, status, now = raw["health"], raw["status"], raw["nodes"]["now"]
    problems: list[str] = []
    notes: list[str] = []
    nodes = []
    for n in raw["nodes"]["nodes"]:
        r = raw["readings"].get(n["id"], {})
        gaps = [g for g in r.get("gaps", []) if g[1] is not None]
        nodes.append({
            "id": n["id"], "configured": n["configured"], "last_seen": n["last_seen"],
            "age_s": n["age_s"], "interval_s": n["interval_s"], "link": n["link"],
            "last_seq": n["last_seq"], "outbox": n["outbox"], "battery": n["battery"],
            "duplicates": n["duplicates"], "flags": n["flags"],
            "firmware": n.get("firmware"),
            "gaps": len(gaps), "gap_s": round(sum(b - a for a, b in gaps), 1),
            "missing_since": n["last_seen"] if "stale" in n["flags"] else None})
        for flag in n["flags"]:
            if flag in ("stale", "never seen", "no key", "backlog"):
                problems.append(f"node {n['id']}: {flag}"
                                + (f" (last seen {_ago(n['age_s'])})" if flag == "stale" else ""))
            elif flag != "duplicates":
                notes.append(f"node {n['id']}: {flag}")
        if gaps:
            notes.append(f"node {n['id']}: {len(gaps)} gap(s) in the last hour, "
                         f"{sum(b - a for a, b in gaps):.0f} s without readings")
    q = status["queue"]
    if q.get("oldest_age_s") is not None and q["oldest_age_s"] > QUEUE_OLD_S:
        problems.append(f"queue: the oldest reading has waited {_dur(q['oldest_age_s'])} for "
                        "upstream")
    for sink, st in status["upstream"].items():
        if st["state"] == "failing":
            problems.append(f"upstream {sink}: failing")
    for link in status["links"]:
        if not link["up"]:
            problems.append(f"link {link['name']}: down")
    clock = health.get("clock") if isinstance(health.get("clock"), dict) else None
    if clock is not None and not clock.get("synchronized"):
        problems.append(clock_trouble(clock, now))
    if clock is not None and clock.get("state_refused"):
        notes.append("gateway clock: its saved state (clock.json) was refused at start and "
                     "set aside as clock.json.bad: see the gateway's log")
    if health.get("status") != "ok":
        problems.append(f"gateway reports itself {health.get('status')}"
                        + (" (its clock, above)" if clock is not None
                           and not clock.get("synchronized") else ""))
    rejected = status["counters"].get("frames_rejected", {})
    for kind in SECURITY_KINDS:
        if rejected.get(kind):
            notes.append(f"{rejected[kind]} frames rejected as {kind}: a node with a wrong key, "
                         "or someone replaying or forging frames")
    updates = raw.get("rollout") or {}
    ro = updates.get("rollout")
    if ro:
        from lantern.tools.field.diag_view import rollout_summary

        line = rollout_summary(ro)
        # a rollout that stopped itself needs someone; one the operator stopped, or one
        # under way, is worth knowing
        halted_itself = ro["state"] == "halted" and not str(ro.get("reason", "")).startswith(
            "halted by the operator")
        (problems if halted_itself else notes).append(line)
    for reason, n in sorted(updates.get("bundles_refused", {}).items()):
        notes.append(f"{n} update bundle(s) refused by the gateway: {reason}")
    state = DEGRADED if problems else HEALTHY
    return {
        "url": url, "state": STATES[state], "exit": state, "checked_at": now,
        "version": status.get("version"), "summary": status.get("summary"),
        "health": health, "nodes": nodes,
        "stale": [n["id"] for n in nodes if "stale" in n["flags"]],
        "never_seen": [n["id"] for n in nodes if "never seen" in n["flags"]],
        "queue": q, "upstream": status["upstream"], "links": status["links"],
        "rejections": rejected, "counters": status["counters"], "rollout": ro,
        "clock": clock,
        "problems": problems, "notes": notes,
    }


def clock_trouble(clock: dict[str, Any], now: float) -> str:
    """An unsynchronised gateway clock in one line: source, since when, what it does to data."""
    source = str(clock.get("source") or "unknown")
    detail = f": {clock['detail']}" if clock.get("detail") else ""
    since = clock.get("since")
    when = (f" since {_clock_time(since)} ({_ago(max(0.0, now - since))})"
            if isinstance(since, int | float) else "")
    return (f"gateway clock NOT synchronised ({source}{detail}){when}: nodes are not given "
            "the time, so they hold their samples until it syncs; readings timed at their "
            "receipt carry time.q until then (check NTP: timedatectl timesync-status)")


def _clock_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def unreachable(url: str, why: str) -> dict[str, Any]:
    return {"url": url, "state": STATES[UNREACHABLE], "exit": UNREACHABLE,
            "checked_at": time.time(), "problems": [why], "notes": []}


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _ago(s: float | None) -> str:
    return "never" if s is None else _dur(s) + " ago"


def render(rep: dict[str, Any], console: Any) -> None:
    """The readable view: a verdict, then nodes, queue, upstream, links, rejections.

    Only the view's own styling is markup: every text from the report (our messages name
    `[api]`, and names come from the gateway) is printed as it is, escaped.
    """
    from rich.markup import escape
    from rich.table import Table

    colour = {"healthy": "green", "degraded": "yellow", "unreachable": "red"}[rep["state"]]
    console.print(f"[bold {colour}]gateway {rep['state'].upper()}[/] at {escape(rep['url'])}")
    for p in rep["problems"]:
        console.print(f"  [{colour}]✗[/] {escape(p)}")
    if rep["state"] == "unreachable":
        return
    console.print(escape(f"  {rep['summary']}"))
    t = Table(title="nodes", title_justify="left")
    for col in ("node", "firmware", "last seen", "link", "seq", "outbox", "battery",
                "gaps (1 h)", "flags"):
        t.add_column(col)
    for n in rep["nodes"]:
        bat = n["battery"]
        t.add_row(*map(escape, (
            n["id"], n.get("firmware") or "?", _ago(n["age_s"]), n["link"] or "-",
            str(n["last_seq"] or "-"),
            "-" if n["outbox"] is None else str(n["outbox"]),
            f"{bat['v']:g} {bat.get('u', '')}" if bat and "v" in bat else "-",
            f"{n['gaps']} ({n['gap_s']:.0f} s)" if n["gaps"] else "0",
            ", ".join(n["flags"]) or "ok")))
    console.print(t)
    q = rep["queue"]
    lines = [f"queue: {q['readings']} readings, {q['bytes']} bytes, oldest "
             f"{_ago(q['oldest_age_s']) if q['oldest_age_s'] is not None else '-'}, "
             f"{q.get('dead_letters', 0)} dead letters, {q.get('evictions', 0)} evicted"]
    up = ", ".join(f"{k} {v['state']}" for k, v in rep["upstream"].items()) or "no sinks"
    lines.append(f"upstream: {up}")
    links = ", ".join(f"{li['name']} {'up' if li['up'] else 'DOWN'}" for li in rep["links"])
    lines.append(f"links: {links or 'none'}")
    rej = ", ".join(f"{k} {v}" for k, v in sorted(rep["rejections"].items()) if v)
    lines.append(f"rejected frames: {rej or 'none'}")
    clock = rep.get("clock")
    if clock is not None:
        lines.append("clock: " + ("synchronised" if clock.get("synchronized") else
                                  "NOT synchronised") + f" ({clock.get('source')}, mode "
                     f"{clock.get('mode')}), {clock.get('acks_without_time', 0)} ACKs without "
                     "the time")
    for line in lines:
        console.print(escape(line))
    if rep.get("rollout"):
        from lantern.tools.field.diag_view import rollout_table

        console.print(rollout_table(rep["rollout"]))
    for n in rep["notes"]:
        console.print(f"  [dim]•[/] {escape(n)}")


async def diagnose(url: str, token: str | None, timeout: float) -> dict[str, Any]:
    try:
        return report(url, await fetch(url, token, timeout))
    except Unreachable as e:
        return unreachable(url, str(e))
