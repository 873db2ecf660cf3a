"""Several sinks at once: each has its own cursor; a dead one never blocks the others."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from lantern.agent import ngsi
from lantern.agent.metrics import Metrics
from lantern.agent.queue.forward import Forwarder
from lantern.agent.queue.store import Accepted, Store, Window
from lantern.agent.sinks.http import HttpSink, HttpSinkConfig
from lantern.agent.sinks.ngsi_ld import NgsiLdSink, NgsiLdSinkConfig
from lantern.tools.street.ngsi_broker import NgsiBroker
from lantern.tools.street.upstream import Upstream
from tests.helpers.ngsi import NODES, records

pytestmark = pytest.mark.ngsi_ld


async def _commit(store: Store, windows: dict[str, Window], seq: int) -> None:
    recs = records(seq=seq, t=1_764_331_200 + seq)
    windows.setdefault("SL-0042", Window()).mark(seq)
    await store.commit([Accepted("SL-0042", seq, b"", recs)], windows)


async def _until(cond: object, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_dead_ngsi_broker_never_blocks_http(tmp_path: Path) -> None:
    upstream, broker = Upstream(), NgsiBroker(down=True)
    await upstream.start()
    await broker.start()
    metrics = Metrics()
    names = ["http", "ngsi_ld"]
    windows: dict[str, Window] = {}
    async with Store(tmp_path / "q.sqlite") as store, \
            HttpSink(HttpSinkConfig(url=upstream.url)) as http, \
            NgsiLdSink(NgsiLdSinkConfig(url=broker.url), NODES) as ngsi_sink:
        events = [asyncio.Event(), asyncio.Event()]
        fwds = [Forwarder(store, sink, metrics, ev, 20, 0.05, backoff_initial_s=0.05,
                          backoff_max_s=0.2, all_sinks=names)
                for sink, ev in zip([http, ngsi_sink], events, strict=True)]
        tasks = [asyncio.create_task(f.run()) for f in fwds]
        try:
            n_per_pack = len(records())
            for seq in range(10):
                await _commit(store, windows, seq)
                for ev in events:
                    ev.set()
            await _until(lambda: len(upstream.readings) == 10 * n_per_pack)
            depth, _ = await store.depth()
            assert depth == 10 * n_per_pack, "readings left before the NGSI-LD broker had them"
            assert metrics.upstream_failures > 0 and broker.entities == {}
            assert await store.cursor("ngsi_ld") == 0

            broker.down = False
            await _until(lambda: fwds[1].delivered == 10 * n_per_pack)
            depth, _ = await store.depth()
            assert depth == 0
            # the latest of each entity won, each with its own observation time
            w = broker.entities["urn:ngsi-ld:WeatherObserved:lantern:SL-0042"]
            assert w["temperature"]["observedAt"] == ngsi.iso(1_764_331_209)
            # a pack split across two batches updates its entity twice: count observations
            seen = {e["dateObserved"]["observedAt"]
                    for e in broker.history["urn:ngsi-ld:WeatherObserved:lantern:SL-0042"]}
            assert len(seen) == 10
            assert upstream.duplicates == 0
        finally:
            for t in tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await upstream.stop()
            await broker.stop()
