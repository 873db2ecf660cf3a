"""HTTP sink and forwarder against a real aiohttp receiver (tools/street/upstream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.resolve import Batch
from lantern.agent.queue.store import Accepted, Store, Window
from lantern.agent.sinks.http import (
    RETRY_AFTER_MAX_S,
    DeliveryError,
    HttpSink,
    HttpSinkConfig,
    idempotency_key,
    parse_retry_after,
)
from lantern.tools.street.upstream import Upstream


class TimedUpstream(Upstream):
    """The stock receiver, noting when each POST arrived."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.posts: list[float] = []

    async def _post(self, request: web.Request) -> web.Response:
        self.posts.append(time.monotonic())
        return await super()._post(request)


async def fill(store: Store, node: str, seqs: range) -> None:
    frames, w = [], Window()
    for seq in seqs:
        frames.append(Accepted(node, seq, b"x", [
            {"id": f"{node}:{seq}:0", "n": f"urn:dev:lantern:{node}:temperature", "t": 1.7e9,
             "u": "Cel", "v": 20.0 + seq}]))
        w.mark(seq)
    await store.commit(frames, {node: w})


def count_rows(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT coalesce(sum(readings), 0) FROM frames").fetchone()[0])
    finally:
        con.close()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def forwarding(fwd: Forwarder) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(fwd.run())
    try:
        yield task
    finally:
        if not task.done():  # a task that died is left for the test to report
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with Store(db_path) as s:
        yield s


@pytest.fixture
async def upstream() -> AsyncIterator[TimedUpstream]:
    up = TimedUpstream()
    await up.start()
    yield up
    await up.stop()


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the POST itself


async def test_batch_posts_senml_json_with_stable_idempotency_key(
        store: Store, upstream: TimedUpstream) -> None:
    await fill(store, "SL-0001", range(1, 6))
    batch = await store.next_batch(3)
    assert batch is not None
    async with HttpSink(HttpSinkConfig(url=upstream.url, timeout_s=5)) as sink:
        await sink.send(batch)
        assert upstream.batches == 1  # 415 unless the body is application/senml+json
        assert set(upstream.readings) == set(batch.rids)
        for rid, rec in zip(batch.rids, batch.records(), strict=True):
            assert upstream.readings[rid] == rec

        await sink.send(batch)  # a retry of the same readings
        assert upstream.duplicates == 3
        k1, k2 = upstream.idempotency_keys
        assert k1 == k2 == idempotency_key(batch)
        assert len(k1) >= 16

        await store.delivered(batch)
        rest = await store.next_batch(3)
        assert rest is not None
        await sink.send(rest)
        assert upstream.idempotency_keys[2] != k1
        assert len(upstream.readings) == 5


def test_idempotency_key_depends_on_the_readings_only() -> None:
    rids = ["SL-0001:1:0", "SL-0001:2:0"]
    a = Batch(1, 2, 1000.0, rids, ['{"v":1}', '{"v":2}'])
    b = Batch(17, 18, 2000.0, list(rids), ['{"v":1}', '{"v":2}'])  # re-queued after a restart
    assert idempotency_key(a) == idempotency_key(b)
    assert idempotency_key(a) != idempotency_key(Batch(1, 2, 1000.0, ["SL-0001:1:0",
                                                                      "SL-0001:3:0"], []))
    assert idempotency_key(a) != idempotency_key(Batch(1, 1, 1000.0, rids[:1], []))
    # no ambiguity from joining ids
    assert idempotency_key(Batch(1, 2, 0, ["a", "bc"], [])) != idempotency_key(
        Batch(1, 2, 0, ["ab", "c"], []))


async def test_bearer_token_from_token_file(tmp_path: Path, store: Store) -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await request.read()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/in", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        token = tmp_path / "token"
        token.write_text("s3cr3t-T0ken\n")
        token.chmod(0o600)
        await fill(store, "SL-0001", range(1, 3))
        batch = await store.next_batch(10)
        assert batch is not None
        url = f"http://127.0.0.1:{port}/in"
        async with HttpSink(HttpSinkConfig(url=url, token_file=token)) as sink:
            await sink.send(batch)
        async with HttpSink(HttpSinkConfig(url=url)) as sink:
            await sink.send(batch)
    finally:
        await runner.cleanup()
    assert seen[0]["Authorization"] == "Bearer s3cr3t-T0ken"
    assert seen[0]["Content-Type"] == "application/senml+json"
    assert seen[0]["Idempotency-Key"] == idempotency_key(batch)
    assert "Authorization" not in seen[1]


async def test_error_status_is_a_delivery_error(store: Store, upstream: TimedUpstream) -> None:
    await fill(store, "SL-0001", range(1, 2))
    batch = await store.next_batch(10)
    assert batch is not None
    upstream.fail_next = [429, 500]
    upstream.retry_after = "7"
    async with HttpSink(HttpSinkConfig(url=upstream.url)) as sink:
        with pytest.raises(DeliveryError) as e429:
            await sink.send(batch)
        with pytest.raises(DeliveryError) as e500:
            await sink.send(batch)
        await sink.send(batch)
    assert "429" in str(e429.value) and e429.value.retry_after == 7.0
    assert "500" in str(e500.value)
    assert len(upstream.readings) == 1


# ---------------------------------------------------------------- Retry-After


NOW = 1_700_000_000.0


@pytest.mark.parametrize(("value", "expected"), [
    ("120", 120.0),
    (" 7 ", 7.0),
    ("0", 0.0),
    (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
    (email.utils.formatdate(NOW - 3600, usegmt=True), 0.0),  # in the past: now
    ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
    ("999999", RETRY_AFTER_MAX_S),  # capped
    ("9" * 400, RETRY_AFTER_MAX_S),
    (email.utils.formatdate(NOW + 86400 * 3, usegmt=True), RETRY_AFTER_MAX_S),
    (None, None),
    ("", None),
    ("soon", None),
    ("-5", None),
    ("1.5", None),  # delta-seconds is 1*DIGIT
    ("12abc", None),
    ("\u00b2", None),  # SUPERSCRIPT TWO: str.isdigit() says yes, float() says no
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    got = parse_retry_after(value, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1.0)


def test_parse_retry_after_date_uses_the_clock() -> None:
    got = parse_retry_after(email.utils.formatdate(time.time() + 60, usegmt=True))
    assert got is not None and 58 <= got <= 61


# ---------------------------------------------------------------- forwarder


async def test_forwarder_honours_retry_after_and_deletes_after_2xx(
        store: Store, db_path: Path) -> None:
    rows_when_accepted: list[int] = []
    up = TimedUpstream(listener=lambda recs: rows_when_accepted.append(count_rows(db_path)))
    await up.start()
    try:
        await fill(store, "SL-0001", range(1, 4))
        up.fail_next = [503]
        up.retry_after = "1"
        metrics = Metrics()
        new_data = asyncio.Event()
        # a tiny backoff: if Retry-After were ignored the retry would come almost at once
        sink = HttpSink(HttpSinkConfig(url=up.url))
        fwd = Forwarder(store, sink, metrics, new_data, max_records=3, max_age_s=0.01,
                        backoff_initial_s=0.001, backoff_max_s=0.002)
        async with sink, forwarding(fwd):
            await until(lambda: len(up.posts) == 1)
            await asyncio.sleep(0.5)  # waiting out the Retry-After: nothing is deleted
            assert count_rows(db_path) == 3
            assert metrics.upstream_failures == 1
            assert fwd.upstream_ok is False
            await until(lambda: len(up.readings) == 3)
            await until(lambda: count_rows(db_path) == 0)
        gap = up.posts[1] - up.posts[0]
        assert 0.95 <= gap <= 1.8, f"retried after {gap:.3f}s, Retry-After said 1"
        assert rows_when_accepted == [3]  # still queued while the upstream took them
        assert metrics.readings_delivered == 3
        assert metrics.upstream_failures == 1
        assert fwd.upstream_ok is True
        assert len(up.posts) == 2
    finally:
        await up.stop()


async def test_forwarder_batches_by_size(store: Store, upstream: TimedUpstream,
                                         db_path: Path) -> None:
    await fill(store, "SL-0001", range(1, 8))
    sink = HttpSink(HttpSinkConfig(url=upstream.url))
    fwd = Forwarder(store, sink, Metrics(), asyncio.Event(), max_records=3, max_age_s=0.01)
    async with sink, forwarding(fwd):
        await until(lambda: count_rows(db_path) == 0)
    assert upstream.batches == 3
    assert len(upstream.readings) == 7
    assert upstream.duplicates == 0
    assert len(set(upstream.idempotency_keys)) == 3


async def test_dead_upstream_keeps_rows_and_counts_failures(
        store: Store, db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lantern.forward")
    await fill(store, "SL-0001", range(1, 6))
    metrics = Metrics()
    url = f"http://127.0.0.1:{free_port()}/senml"
    sink = HttpSink(HttpSinkConfig(url=url, timeout_s=1))
    fwd = Forwarder(store, sink, metrics, asyncio.Event(), max_records=10, max_age_s=0.01,
                    backoff_initial_s=0.01, backoff_max_s=0.05)
    async with sink, forwarding(fwd):
        await until(lambda: metrics.upstream_failures >= 3)
    assert count_rows(db_path) == 5
    assert (await store.depth())[0] == 5
    assert metrics.readings_delivered == 0
    assert fwd.upstream_ok is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the first failure is logged, the rest only counted
    assert "5 readings kept" in warnings[0].getMessage()


async def test_malformed_retry_after_does_not_stop_forwarding(
        store: Store, upstream: TimedUpstream, db_path: Path) -> None:
    """A 503 with a Retry-After we cannot read is still a 503: back off and try again."""
    await fill(store, "SL-0001", range(1, 3))
    upstream.fail_next = [503]
    upstream.retry_after = "\u00b2"
    sink = HttpSink(HttpSinkConfig(url=upstream.url))
    fwd = Forwarder(store, sink, Metrics(), asyncio.Event(), max_records=10, max_age_s=0.01,
                    backoff_initial_s=0.01, backoff_max_s=0.05)
    async with sink, forwarding(fwd) as task:
        await until(lambda: count_rows(db_path) == 0 or task.done(), timeout=3.0)
        assert not task.done(), f"forwarder died: {task.exception()!r}"
    assert len(upstream.readings) == 2
