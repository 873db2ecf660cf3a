"""The gateway service: links → ingest → durable queue → forwarder → sink."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from pathlib import Path

from .config import Config, load_config, load_keys
from .forward import Forwarder
from .ingest import Ingest
from .links.serial import SerialLink
from .metrics import Metrics
from .sinks.http import HttpSink
from .store import Store

log = logging.getLogger("lantern.gateway")

SUMMARY_EVERY_S = 60.0


async def _summaries(metrics: Metrics, store: Store) -> None:
    while True:
        await asyncio.sleep(SUMMARY_EVERY_S)
        depth, oldest = await store.depth()
        log.info("summary: %s queue=%d oldest=%s", json.dumps(metrics.snapshot()), depth,
                 f"{oldest:.1f}s" if oldest is not None else "-")


async def run(cfg: Config) -> None:
    keys = load_keys(cfg.keys_file)
    metrics = Metrics()
    assert cfg.http is not None
    async with Store(cfg.state_dir / "queue.sqlite") as store, HttpSink(cfg.http) as sink:
        ingest = Ingest(store, keys, metrics)
        await ingest.start()
        links = [SerialLink(s.port, s.baud, ingest.on_data) for s in cfg.serial]
        forwarder = Forwarder(store, sink, metrics, ingest.committed, cfg.batch_max_records,
                              cfg.batch_max_age_s, cfg.http.backoff_initial_s,
                              cfg.http.backoff_max_s)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("gateway up: %d node keys, links %s, sink %s", len(keys),
                 ", ".join(link.name for link in links), cfg.http.url)
        tasks = [asyncio.create_task(c, name=n) for n, c in (
            ("ingest", ingest.run()), ("forward", forwarder.run()),
            ("summary", _summaries(metrics, store)),
            *((link.name, link.run()) for link in links))]
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        failed = [t for t in tasks if t in done and not t.cancelled() and t.exception()]
        if failed:
            name, exc = failed[0].get_name(), failed[0].exception()
            raise RuntimeError(f"gateway task {name} died: {exc!r}") from exc
        log.info("gateway stopped: %s", json.dumps(metrics.snapshot()))


def main(config_path: Path) -> None:
    cfg = load_config(config_path)
    logging.getLogger().setLevel(cfg.log_level.upper())
    asyncio.run(run(cfg))
