"""Review findings 3 and 8: sinks that counted a redirect as delivery, and the local API.

3: aiohttp follows a 301/302 (as a GET) and a 307/308; a 200 from wherever it lands marked
   the batch delivered. Delivery means a 2xx from the URL configured; a 3xx is a failed
   delivery, kept, retried, counted and logged once with where it pointed.
8: the API answered any Host (DNS rebinding), sent no security headers, and a non-UTF-8
   Authorization header gave an unauthenticated 500 with a traceback.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
import re
import socket
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from lantern.agent import ngsi
from lantern.agent.api import Api, GatewayView
from lantern.agent.config import ApiConfig, load_config
from lantern.agent.errors import ConfigError
from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.store import Accepted, Store, Window
from lantern.agent.sinks.http import DeliveryError, HttpSink, HttpSinkConfig
from lantern.agent.sinks.ngsi_ld import UPSERT, NgsiLdSink, NgsiLdSinkConfig
from tests.helpers.api import FakeForwarder, FakeLink, commit, pack

REDIRECTS = (301, 302, 303, 307, 308)
NODE = "SL-0042"
NODES = {NODE: ngsi.NodeMeta(pole="42", lat=52.37, lon=4.89, interval_s=60)}


# ---------------------------------------------------------------- finding 3: redirects


@dataclass
class Redirector:
    """An upstream whose configured path redirects (while `status` is set) to a landing
    handler that answers 200 to anything: what an http→https move or a captive portal does."""

    path: str
    status: int | None = 301
    location: str = "/landing"
    accepted: list[Any] = field(default_factory=list)  # bodies taken at the configured path
    landed: list[str] = field(default_factory=list)  # methods that reached the landing page
    hits: int = 0
    hit: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def _in(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hits += 1
        self.hit.set()
        if self.status is not None:
            return web.Response(status=self.status, headers={"Location": self.location},
                                text="moved")
        self.accepted.append(json.loads(body))
        return web.Response(status=204 if self.path == "/senml" else 201)

    async def _landing(self, request: web.Request) -> web.Response:
        await request.read()
        self.landed.append(request.method)
        self.hit.set()
        return web.json_response({"welcome": "to the captive portal"})

    async def __aenter__(self) -> Redirector:
        app = web.Application()
        app.router.add_route("*", self.path.split("?")[0], self._in)
        app.router.add_route("*", "/landing", self._landing)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def until(self, cond: Callable[[], bool]) -> None:
        """Waits, request by request, until `cond` holds."""
        while not cond():
            self.hit.clear()
            await asyncio.wait_for(self.hit.wait(), 15)


def _records(seq: int) -> list[dict[str, Any]]:
    return [{"id": f"{NODE}:{seq}:0", "n": f"urn:dev:lantern:{NODE}:temperature",
             "t": 1_764_331_200 + seq, "u": "Cel", "v": 20.0 + seq}]


async def _fill(store: Store, n: int) -> None:
    w = Window()
    for seq in range(n):
        w.mark(seq)
    await store.commit([Accepted(NODE, seq, b"", _records(seq)) for seq in range(n)],
                       {NODE: w})


def _queued(store: Store) -> int:
    con = sqlite3.connect(store.path)
    try:
        return int(con.execute("SELECT count(*) FROM frames").fetchone()[0])
    finally:
        con.close()


def _sink(kind: str, base: str) -> Any:
    if kind == "http":
        return HttpSink(HttpSinkConfig(url=base + "/senml", timeout_s=5))
    return NgsiLdSink(NgsiLdSinkConfig(url=base, timeout_s=5), NODES)


PATHS = {"http": "/senml", "ngsi_ld": UPSERT}


@pytest.mark.parametrize("kind", ["http", "ngsi_ld"])
@pytest.mark.parametrize("status", REDIRECTS)
async def test_a_redirect_is_not_delivery(tmp_path: Path, kind: str, status: int) -> None:
    async with Store(tmp_path / "q.sqlite") as store, Redirector(PATHS[kind], status) as up:
        await _fill(store, 3)
        batch = await store.next_batch(100)
        assert batch is not None
        async with _sink(kind, up.url) as sink:
            with pytest.raises(DeliveryError) as e:
                await sink.send(batch)
            assert sink.redirects == {status: 1}
        assert up.landed == []  # never followed
        assert up.accepted == []
        assert f"HTTP {status}" in str(e.value) and "/landing" in str(e.value)
        assert "set the sink's url to the final address" in str(e.value)


@pytest.mark.parametrize("kind", ["http", "ngsi_ld"])
async def test_redirected_frames_stay_queued_until_the_redirect_goes(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with Store(tmp_path / "q.sqlite") as store, Redirector(PATHS[kind], 302) as up:
        await _fill(store, 5)
        metrics = Metrics()
        port = up.url.rpartition(":")[2]
        up.location = f"http://user:hunter2@127.0.0.1:{port}/landing?access_token=SECRET#frag"
        async with _sink(kind, up.url) as sink:
            fwd = Forwarder(store, sink, metrics, asyncio.Event(), 100, 0.0,
                            backoff_initial_s=0.01, backoff_max_s=0.02)
            task = asyncio.create_task(fwd.run())
            try:
                # four attempts at the configured URL (or one that followed to the landing page)
                await up.until(lambda: up.hits >= 4 or bool(up.landed))
                assert up.landed == []
                assert fwd.delivered == 0 and metrics.readings_delivered == 0
                assert _queued(store) == 5
                assert sink.redirects[302] >= 3
                up.status = None  # the redirect is removed
                await asyncio.wait_for(_delivered(fwd, 5), 30)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        assert fwd.delivered == 5 and _queued(store) == 0
        assert up.landed == []
        said = [r for r in caplog.records if "redirect" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]  # logged once
        line = said[0].getMessage()
        assert f"127.0.0.1:{port}/landing?…" in line and "final address" in line
        assert "hunter2" not in caplog.text and "SECRET" not in caplog.text


def test_every_aiohttp_request_in_the_agent_turns_redirects_off() -> None:
    """A new sink (or a new request in an old one) cannot fall back to aiohttp's default."""
    verbs = {"get", "post", "put", "patch", "delete", "head", "options", "request"}
    seen = 0
    for path in (Path(__file__).parents[2] / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in verbs and "session" in ast.unparse(node.func.value)):
                continue
            seen += 1
            kw = {k.arg: k.value for k in node.keywords}
            off = kw.get("allow_redirects")
            assert isinstance(off, ast.Constant) and off.value is False, \
                f"{path}:{node.lineno}: {ast.unparse(node)[:80]} needs allow_redirects=False"
    assert seen >= 2  # the HTTP and NGSI-LD sinks' POSTs


async def test_redirects_are_exported_by_sink_and_status(tmp_path: Path) -> None:
    view, store = await _view(tmp_path)
    try:
        sink = SimpleNamespace(name="ngsi_ld", redirects=Counter({301: 2, 308: 1}))
        view.upstreams = [FakeForwarder(sink=sink, upstream_ok=False)]
        async with TestClient(TestServer(Api(view).app, host="127.0.0.1")) as c:
            text = await (await c.get("/metrics")).text()
    finally:
        await store.__aexit__(None, None, None)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    got = {(s.labels["sink"], s.labels["status"]): s.value
           for s in fams["lantern_upstream_redirects"].samples if s.name.endswith("_total")}
    assert got == {("ngsi_ld", "301"): 2, ("ngsi_ld", "308"): 1}


async def _delivered(fwd: Forwarder, n: int) -> None:
    while fwd.delivered < n:
        await asyncio.sleep(0.01)


async def test_ngsi_ld_207_naming_nobody_we_sent_is_not_a_confirmation(
        tmp_path: Path) -> None:
    """A 207 must name what failed; one that names only ids we never sent confirms nothing."""
    async def upsert(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"success": [], "errors": [
            {"entityId": "urn:ngsi-ld:Device:someone-else", "error": {"status": 400}}]},
            status=207)

    app = web.Application()
    app.router.add_post(UPSERT.split("?")[0], upsert)
    async with TestServer(app, host="127.0.0.1") as server, Store(tmp_path / "q.sqlite") as s:
        await _fill(s, 1)
        batch = await s.next_batch(10)
        assert batch is not None
        cfg = NgsiLdSinkConfig(url=str(server.make_url("")), partial_retries=1)
        async with NgsiLdSink(cfg, NODES) as sink:
            with pytest.raises(DeliveryError):
                await sink.send(batch)


# ---------------------------------------------------------------- finding 8: the API


async def _view(tmp_path: Path) -> tuple[GatewayView, Store]:
    store = Store(tmp_path / "queue.sqlite")
    await store.__aenter__()
    await commit(store, [pack("SL-0001", 0, 1.7e9, {"temperature": 20.0})])
    metrics = Metrics()
    metrics.seen("SL-0001", "serial:/dev/ttyUSB0", 0)
    return GatewayView(metrics, store, ["SL-0001"], [FakeLink("serial:/dev/ttyUSB0")],
                       [FakeForwarder()]), store


@contextlib.asynccontextmanager
async def api_client(tmp_path: Path, token: str | None = None,
                     cfg: ApiConfig | None = None) -> AsyncIterator[TestClient[Any, Any]]:
    view, store = await _view(tmp_path)
    try:
        api = Api(view, token, cfg) if cfg else Api(view, token)
        async with TestClient(TestServer(api.app, host="127.0.0.1")) as client:
            yield client
    finally:
        await store.__aexit__(None, None, None)


async def test_a_foreign_host_is_refused_on_loopback(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """DNS rebinding: a page at attacker.example, re-pointed at 127.0.0.1, reads node data."""
    async with api_client(tmp_path) as c:
        for _ in range(3):
            r = await c.get("/api/nodes", headers={"Host": "attacker.example:8470"})
            assert r.status == 421
            assert "SL-0001" not in await r.text()
        r = await c.get("/", headers={"Host": "attacker.example"})
        assert r.status == 421
        for host in ("localhost", "localhost:8470", "127.0.0.1", "127.0.0.1:8470", "[::1]",
                     "[::1]:8470", "LOCALHOST:1"):
            r = await c.get("/api/nodes", headers={"Host": host})
            assert r.status == 200, host
        m = await c.get("/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(await m.text())}
        refused = {s.labels["reason"]: s.value for s in fams["lantern_api_refused"].samples
                   if s.name.endswith("_total")}
        assert refused["host"] == 4
    logged = [r for r in caplog.records if "attacker.example" in r.getMessage()]
    assert len(logged) == 1  # once per host


@pytest.mark.parametrize(("listen", "allowed", "ok", "refused"), [
    ("192.0.2.7", (), ["192.0.2.7:8470", "192.0.2.7"], ["gw.example", "127.0.0.1", "x.y"]),
    ("192.0.2.7", ("gw.example",), ["gw.example:8470", "GW.example.", "192.0.2.7"],
     ["gw.example.evil", "evil.gw.example"]),
    ("0.0.0.0", ("cab7.local",), ["10.1.2.3:8470", "[fe80::1]", "localhost", "cab7.local"],
     ["attacker.example", "10.1.2.3.nip.io"]),
])
async def test_host_rule_off_loopback(tmp_path: Path, listen: str, allowed: tuple[str, ...],
                                      ok: list[str], refused: list[str]) -> None:
    cfg = ApiConfig(host=listen, allowed_hosts=allowed)
    async with api_client(tmp_path, token="t" * 24, cfg=cfg) as c:
        for host in ok:
            assert (await c.get("/healthz", headers={"Host": host})).status in (200, 503), host
        for host in refused:
            assert (await c.get("/healthz", headers={"Host": host})).status == 421, host


SECURITY = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@pytest.mark.parametrize("path", ["/", "/status.js", "/status.css", "/healthz", "/metrics",
                                  "/api/nodes", "/api/nodes/nobody", "/no-such-page",
                                  "/api/nodes/SL-0001/readings?since=soon"])
async def test_security_headers_on_every_response(tmp_path: Path, path: str) -> None:
    async with api_client(tmp_path) as c:
        r = await c.get(path)
        for k, v in SECURITY.items():
            assert r.headers.get(k) == v, (path, k)
        csp = r.headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        refused = await c.get(path, headers={"Host": "evil.example"})
        assert refused.status == 421
        assert refused.headers.get("X-Frame-Options") == "DENY"


def test_status_page_has_no_inline_script_or_style() -> None:
    """The CSP allows scripts and styles from the gateway's own files only."""
    html = (Path(__file__).parents[2] / "agent" / "status" / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers


async def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Sends bytes as they are (no client library cleans them up); the status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("auth", [
    b"Bearer \xff\xfe\xfd",  # not UTF-8
    "Bearer t\u00f6ken".encode(),  # UTF-8, not ASCII
    "Bearer t\u00f6ken".encode("latin-1"),
    b"Bearer",
    b"Basic dXNlcjpwYXNz",
    b"Bearer  two  spaces",
    b"\xc3\x28",
])
async def test_a_malformed_authorization_is_a_401_not_a_500(
        tmp_path: Path, auth: bytes, caplog: pytest.LogCaptureFixture) -> None:
    async with api_client(tmp_path, token="s3cret-token-of-some-length") as c:
        assert c.port is not None
        for _ in range(2):
            status, body = await _raw(c.port, b"GET /api/nodes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Authorization: " + auth + b"\r\n"
                                      b"Connection: close\r\n\r\n")
            assert status == 401, body
            assert b"SL-0001" not in body and b"Traceback" not in body
    # (only the API's and aiohttp's loggers: another test's garbage can log at any time)
    bad = [r.getMessage() for r in caplog.records if r.name.startswith(("lantern", "aiohttp"))
           and (r.exc_info or r.levelno >= logging.ERROR)]
    assert bad == []
    said = [r for r in caplog.records if r.name == "lantern.api"]
    assert len(said) <= 1  # a malformed header: logged once, later ones only counted


# ---------------------------------------------------------------- property: never a 5xx


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The API (with a token) served from a thread of its own, for blocking raw sockets."""
    tmp = tmp_path_factory.mktemp("api-fuzz")
    loop = asyncio.new_event_loop()
    ready: list[Any] = []

    async def up() -> tuple[web.AppRunner, Store]:
        view, store = await _view(tmp)
        runner = web.AppRunner(Api(view, "s3cret-token-of-some-length").app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, store

    def serve() -> None:
        asyncio.set_event_loop(loop)
        ready.append(loop.run_until_complete(up()))
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while not ready:
        thread.join(0.05)
    runner, store = ready[0]
    try:
        yield int(runner.addresses[0][1])
    finally:
        async def down() -> None:
            await runner.cleanup()
            await store.__aexit__(None, None, None)
        asyncio.run_coroutine_threadsafe(down(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


_header_name = st.sampled_from([b"Authorization", b"Host", b"Accept", b"Cookie", b"Origin",
                                b"If-None-Match", b"Content-Length", b"X-Anything"])
_value = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_path = st.sampled_from(["/", "/api/nodes", "/api/nodes/SL-0001", "/api/status", "/metrics",
                         "/healthz", "/api/nodes/SL-0001/readings", "/status.js", "/x"])
_segment = st.binary(max_size=20).map(
    lambda b: "".join(chr(c) if 0x21 <= c < 0x7F and c not in b"?#% " else f"%{c:02X}"
                      for c in b))
_query = st.lists(st.tuples(st.sampled_from(["since", "limit", "name", "x"]), _segment),
                  max_size=3)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=_path, extra=_segment, query=_query,
       headers=st.lists(st.tuples(_header_name, _value), max_size=4),
       token=st.booleans())
def test_property_no_request_gets_a_5xx(served: int, path: str, extra: str,
                                         query: list[tuple[str, str]],
                                         headers: list[tuple[bytes, bytes]],
                                         token: bool) -> None:
    target = path + ("/" + extra if extra and path.startswith("/api/nodes/") else "")
    if query:
        target += "?" + "&".join(f"{k}={v}" for k, v in query)
    lines = [b"GET " + target.encode() + b" HTTP/1.1", b"Host: 127.0.0.1"]
    if token:
        lines.append(b"Authorization: Bearer s3cret-token-of-some-length")
    lines += [k + b": " + v for k, v in headers if k != b"Content-Length"]
    lines.append(b"Connection: close")
    with socket.create_connection(("127.0.0.1", served), timeout=20) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert status < 500, data[:400]


# ---------------------------------------------------------------- [api] allowed_hosts


def _cfg(tmp_path: Path, api: str) -> Path:
    (tmp_path / "keys.toml").write_text("")
    (tmp_path / "keys.toml").chmod(0o600)
    p = tmp_path / "gateway.toml"
    p.write_text('[gateway]\nstate_dir = "."\nkeys_file = "keys.toml"\n[[links.serial]]\n'
                 'port = "/dev/ttyUSB0"\n[sinks.http]\nurl = "http://127.0.0.1:1/in"\n\n'
                 '[api]\n' + api)
    return p


def test_allowed_hosts_config(tmp_path: Path) -> None:
    cfg = load_config(_cfg(tmp_path, 'allowed_hosts = ["gw.example", "Cab7.Local.", '
                                     '"192.0.2.1", "::1"]\n'))
    assert cfg.api.allowed_hosts == ("gw.example", "cab7.local", "192.0.2.1", "::1")
    assert load_config(_cfg(tmp_path, "")).api.allowed_hosts == ()


@pytest.mark.parametrize("value", ['"gw.example"', '["http://gw.example"]', '["gw:8470"]',
                                   '["*.example"]', '[""]', "[1]", '["a b"]'])
def test_allowed_hosts_config_errors_name_key_and_line(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(tmp_path, f'port = 8470\nallowed_hosts = {value}\n'))
    assert "line 11: api.allowed_hosts" in str(e.value)
