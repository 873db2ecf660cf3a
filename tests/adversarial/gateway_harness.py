"""The gateway as the second review's tests drive it: authentic frames under test keys, a
link that records what the gateway sends, and ingest → SQLite queue → forwarder → a sink,
wired as agent/gateway.py wires them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.ingest import Ingest
from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.resolve import Batch
from lantern.agent.queue.store import Store

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
ROGUE_KEY = bytes(range(50, 82))
NODE, OTHER, ROGUE = "SL-0001", "SL-0002", "SL-6666"
T0 = 1_764_331_200


def good_pack(seq: int) -> bytes:
    return bytes(cbor2.dumps([{-3: T0 + seq, 0: "temperature", 2: 21.5},
                              {0: "humidity", 2: 48.25}], canonical=True))


def frame(seq: int, payload: bytes | None = None, key: bytes = K1, node: str = NODE) -> bytes:
    payload = good_pack(seq) if payload is None else payload
    return protocol.encode_frame(protocol.DATA,
                                 protocol.create_mac0(key, node.encode(), seq, payload))


class FakeLink:
    name = "serial:/dev/ttyFAKE0"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def acked(link: FakeLink, keys: dict[str, bytes]) -> dict[str, list[int]]:
    """Sequences acknowledged on `link`, by node (each ACK verified with the node's key)."""
    out: dict[str, list[int]] = {}
    for data in link.sent:
        for chunk in protocol.Deframer().feed(data):
            assert chunk is not None
            _, body = protocol.decode_frame(chunk)
            m = protocol.parse_mac0(body)
            node = m.kid.decode()
            protocol.verify_mac0(keys[node], m)
            out.setdefault(node, []).extend(cbor2.loads(m.payload)[1])
    return {n: sorted(s) for n, s in out.items()}


class Sink:
    name = "http"

    def __init__(self) -> None:
        self.rids: list[str] = []

    async def send(self, batch: Batch) -> None:
        self.rids += batch.rids


async def until(cond: Callable[[], bool], what: str, *tasks: asyncio.Task[None],
                timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for t in tasks:
            if t.done():
                exc = None if t.cancelled() else t.exception()
                pytest.fail(f"task {t.get_name()} died (waiting for {what}): {exc!r}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def gateway(db: Path, keys: dict[str, bytes]
                  ) -> AsyncIterator[tuple[Ingest, Sink, list[asyncio.Task[None]]]]:
    """ingest → SQLite queue → forwarder → a sink, wired as agent/gateway.py wires them."""
    async with Store(db) as store:
        metrics = Metrics()
        ingest = Ingest(store, {k.encode(): v for k, v in keys.items()}, metrics)
        await ingest.start()
        ev = asyncio.Event()
        ingest.listeners.append(ev)
        sink = Sink()
        fwd = Forwarder(store, sink, metrics, ev, max_records=64, max_age_s=0.0)
        tasks = [asyncio.create_task(ingest.run(), name="ingest"),
                 asyncio.create_task(fwd.run(), name="forward-http")]
        try:
            yield ingest, sink, tasks
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t


class RecordingLink:
    """A node's line as the gateway sees it: what the gateway sends is kept."""

    name = "uart0"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


@contextlib.asynccontextmanager
async def ingest_running(db: Path, keys: dict[bytes, bytes]
                         ) -> AsyncIterator[tuple[Ingest, Store]]:
    """The gateway's ingest over its SQLite queue, committing as agent/gateway.py runs it."""
    async with Store(db) as store:
        ing = Ingest(store, keys, Metrics())
        await ing.start()
        task = asyncio.create_task(ing.run())
        try:
            yield ing, store
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
