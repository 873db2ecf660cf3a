"""Second review, gateway side (agent/): each test is a finding, and fails against the tree
it was written on for the reason its docstring gives. Each asserts the behaviour the gateway
should have, so it passes once the finding is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import random
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from lantern.agent import logsetup
from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.resolve import Batch

from .gateway_harness import K1, NODE, T0, FakeLink, Sink, frame, gateway, until

# ---- log lines: what escape_controls lets through ---------------------------------------------


async def test_a_bidi_override_in_a_senml_name_is_escaped_in_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """agent/logsetup.py escape_controls maps C0, DEL, C1, U+2028/2029 only: other characters
    that are not printable (str.isprintable false) — the bidirectional overrides and isolates
    U+202A-202E, U+2066-2069, zero-width characters — reach the log as they are. A SenML name
    is written unquoted into several dead-letter reasons (protocol.resolve_pack: "{name}: time
    is not a number"), so a node's name can reorder how the rest of a log line shows in any
    bidi-aware viewer (journalctl in a browser console, Grafana/Kibana): the "Trojan Source"
    trick on logs, which the module says it prevents for CR and terminal escapes."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logsetup.setup("INFO")
    try:
        bad = cbor2.dumps([{-3: T0, 0: "temp\u202e\u2066gnirts tsrif", 6: "late", 2: 1.0}])
        link = FakeLink()
        async with gateway(tmp_path / "queue.sqlite", {NODE: K1}) as (ingest, sink, tasks):
            ingest.on_data(link, frame(1, bytes(bad)) + frame(2))
            await until(lambda: len(sink.rids) == 2 and ingest.metrics.dead_letters == 1,
                        "frame 2 and the dead letter", *tasks)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    text = err.getvalue()
    assert "gnirts tsrif" in text  # the dead letter was logged
    leaked = sorted({f"U+{ord(c):04X}" for c in text if not c.isprintable() and c != "\n"})
    assert not leaked, f"unescaped in the log: {leaked}"


# ---- an upstream's Retry-After ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def overloaded_upstream(retry_after: str) -> AsyncIterator[tuple[str, list[float]]]:
    """An upstream answering every POST 503 with `retry_after`: its URL, and the POST times."""
    from aiohttp import web

    hits: list[float] = []

    async def overloaded(_: web.Request) -> web.Response:
        hits.append(time.monotonic())
        return web.Response(status=503, headers={"Retry-After": retry_after})

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", overloaded)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", hits
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def sink_to(kind: str, url: str) -> AsyncIterator[tuple[Any, Batch]]:
    """The real sink of `kind` posting to `url`, and a batch it has something to send for."""
    from lantern.agent.ngsi import NodeMeta
    from lantern.agent.sinks.http import HttpSink, HttpSinkConfig
    from lantern.agent.sinks.ngsi_ld import NgsiLdSink, NgsiLdSinkConfig

    rec = {"n": f"urn:dev:lantern:{NODE}:temperature", "t": T0, "v": 21.5, "u": "Cel"}
    batch = Batch(1, 1, time.time(), [f"{NODE}:1:0"], [json.dumps(rec)])
    sink: Any
    if kind == "http":
        sink = HttpSink(HttpSinkConfig(url=f"{url}/in"))
    else:
        sink = NgsiLdSink(NgsiLdSinkConfig(url=url), {NODE: NodeMeta(pole="1", lat=52.37,
                                                                     lon=4.89)})
    async with sink:
        yield sink, batch


@pytest.mark.parametrize("kind", ["http", "ngsi_ld"])
@pytest.mark.parametrize("retry_after", ["0", "Thu, 01 Jan 2015 00:00:00 GMT"])
async def test_a_retry_after_of_zero_or_in_the_past_does_not_remove_the_backoff(
        retry_after: str, kind: str) -> None:
    """queue/forward.py Forwarder._deliver: a DeliveryError's retry_after replaces the jittered
    backoff outright, and agent/sinks/http.py parse_retry_after gives 0 for "0" and for any
    HTTP-date already past (a server whose clock is behind the gateway's, or a stale header from
    a cache or proxy). An overloaded upstream answering 503 that way is then retried in a tight
    loop — thousands of POSTs a second from each gateway of the fleet, one core busy — instead
    of backing off. Retry-After should be a floor under the backoff, not a bypass. (The
    NGSI-LD sink reports its broker's Retry-After the same way.)"""
    async with overloaded_upstream(retry_after) as (url, hits), sink_to(kind, url) as (sink, b):
        fwd = Forwarder(None, sink, Metrics(), asyncio.Event(), 10, 0.0)  # type: ignore[arg-type]
        task = asyncio.create_task(fwd._deliver(b))
        await asyncio.sleep(2.0)  # a span to count POSTs in (no event to await: none is due)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # backoff_initial_s 0.5, doubling: a handful of attempts in two seconds, not thousands
    assert hits, "the sink never posted"
    assert len(hits) <= 10, f"{len(hits)} POSTs in 2 s to an upstream answering 503"


@pytest.mark.parametrize("kind", ["http", "ngsi_ld"])
@pytest.mark.parametrize("retry_after", ["31536000", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_huge_retry_after_cannot_hold_the_queue_back_for_a_year(
        retry_after: str, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """An upstream (or a stale cache in front of it) answering 503 with a Retry-After a year
    away is honoured only up to RETRY_AFTER_MAX_S: the forwarder's first wait, which it logs,
    is no longer than that — and no shorter than the backoff."""
    from lantern.agent.sinks.http import RETRY_AFTER_MAX_S

    caplog.set_level(logging.WARNING, logger="lantern.forward")
    async with overloaded_upstream(retry_after) as (url, hits), sink_to(kind, url) as (sink, b):
        fwd = Forwarder(None, sink, Metrics(), asyncio.Event(), 10, 0.0)  # type: ignore[arg-type]
        task = asyncio.create_task(fwd._deliver(b))
        try:
            await until(lambda: any("retrying in" in r.getMessage() for r in caplog.records),
                        "the forwarder's retry notice", task)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    [notice] = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    m = re.search(r"retrying in ([0-9.]+)s", notice)
    assert m, notice
    assert 0 < float(m.group(1)) <= RETRY_AFTER_MAX_S, notice
    assert len(hits) == 1


@pytest.mark.parametrize("retry_after", [None, 0.0, -1.0, float("nan"), 0.2, 3.0, 1e9,
                                         float("inf")])
def test_the_retry_delay_lies_between_the_backoff_and_the_ceiling(
        retry_after: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forwarder.retry_delay: never below the jittered backoff, never above the larger of
    RETRY_AFTER_MAX_S and backoff_max_s; a Retry-After in between is honoured exactly."""
    from lantern.agent.sinks.http import RETRY_AFTER_MAX_S

    for backoff_max in (2.0, 60.0, 2 * RETRY_AFTER_MAX_S):
        fwd = Forwarder(None, Sink(), Metrics(), asyncio.Event(), 10, 0.0,  # type: ignore[arg-type]
                        backoff_initial_s=0.5, backoff_max_s=backoff_max)
        for failures in (1, 2, 5, 30):
            cap = min(backoff_max, 0.5 * 2 ** failures)
            for drawn in (0.0, cap / 2, cap):  # the jitter's draw, from each end and the middle
                asked: list[tuple[float, float]] = []

                def uniform(a: float, b: float, d: float = drawn,
                            asked: list[tuple[float, float]] = asked) -> float:
                    asked.append((a, b))
                    return d

                monkeypatch.setattr(random, "uniform", uniform)
                got = fwd.retry_delay(failures, retry_after)
                assert asked == [(0, cap)]  # full jitter over the capped exponential backoff
                assert got >= drawn
                assert got <= max(RETRY_AFTER_MAX_S, backoff_max)
                if retry_after is not None and drawn < retry_after <= RETRY_AFTER_MAX_S:
                    assert got == retry_after
                elif retry_after is None or not retry_after > drawn:
                    assert got == drawn
