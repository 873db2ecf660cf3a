"""The gateway service: links → ingest → durable queue → forwarder → sink."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api import ApiServer, GatewayView
from .config import Config, load_config, load_keys
from .ingest import Ingest
from .metrics import Metrics, TimedSink
from .plugins import LinkContext, SinkContext
from .plugins import link as link_plugin
from .plugins import sink as sink_plugin
from .queue.forward import Forwarder
from .queue.layout import QUEUE_FILE
from .queue.store import Store
from .sdnotify import Notifier, supervise

if TYPE_CHECKING:
    from .links.ble import BleBackend

log = logging.getLogger("lantern.gateway")

SUMMARY_EVERY_S = 60.0


async def _summaries(metrics: Metrics, store: Store) -> None:
    while True:
        await asyncio.sleep(SUMMARY_EVERY_S)
        try:
            depth, oldest = await store.depth()
        except sqlite3.Error as e:  # a failing store is reported where it fails; keep running
            log.warning("summary: store not readable (%s)", e)
            continue
        log.info("summary: %s queue=%d oldest=%s", json.dumps(metrics.snapshot()), depth,
                 f"{oldest:.1f}s" if oldest is not None else "-")


async def _line(view: GatewayView) -> str:
    """The one-line summary, or why there is none (never raises: used while stopping)."""
    try:
        return await asyncio.wait_for(view.summary(), 5.0)
    except Exception as e:
        return f"store not answering ({e!r})"


async def run(cfg: Config, ble_backend: BleBackend | None = None) -> None:
    """ble_backend: bleak backend classes for [[links.ble]] (tests: a virtual radio)."""
    keys = load_keys(cfg.keys_file)
    metrics = Metrics()
    async with contextlib.AsyncExitStack() as stack:
        store = await stack.enter_async_context(Store(cfg.state_dir / QUEUE_FILE))
        store.history.keep_s = cfg.history.keep_hours * 3600.0
        store.history.max_rows = cfg.history.max_samples
        await store.limit(cfg.queue.max_bytes, cfg.queue.policy)
        sinks: list[Any] = []
        backoffs: list[tuple[float, float]] = []
        sink_ctx = SinkContext(cfg.nodes)
        for name, sink_cfg in cfg.sinks.items():  # each sink's plug-in opens it (plugins.py)
            plugin = sink_plugin(name)
            sink = await stack.enter_async_context(plugin.open(sink_cfg, sink_ctx))
            sinks.append(TimedSink(sink, metrics))  # upstream latency histogram
            backoffs.append(plugin.backoff(sink_cfg))
        ingest = Ingest(store, keys, metrics)
        await ingest.start()
        ctx = LinkContext(ingest, keys, store, cfg.state_dir, backends={"ble": ble_backend})
        links: list[Any] = [link_plugin(name).make(link_cfg, ctx)
                            for name, link_cfgs in cfg.links.items() for link_cfg in link_cfgs]
        forwarders = []
        for sink, backoff in zip(sinks, backoffs, strict=True):
            ev = asyncio.Event()
            ingest.listeners.append(ev)
            forwarders.append(Forwarder(store, sink, metrics, ev, cfg.batch_max_records,
                                        cfg.batch_max_age_s, *backoff,
                                        all_sinks=[s.name for s in sinks]))
        view = GatewayView(metrics, store, [k.decode() for k in keys], links, forwarders,
                           [store.path, store.path.with_name(store.path.name + "-wal")])
        api = await stack.enter_async_context(ApiServer(cfg.api, view))
        notifier = Notifier()
        stack.callback(notifier.close)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("gateway up: %d node keys, links %s, sinks %s", len(keys),
                 ", ".join(link.name for link in links), ", ".join(s.name for s in sinks))
        tasks = [asyncio.create_task(c, name=n) for n, c in (
            ("ingest", ingest.run()),
            *((f"forward-{f.sink.name}", f.run()) for f in forwarders),
            ("summary", _summaries(metrics, store)),
            ("supervise", supervise(notifier, view.summary)),
            *((link.name, link.run()) for link in links))]
        notifier.ready(("status page " + api.url + "; " if api.url else "")
                       + (api.error + "; " if api.error else "") + await _line(view))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        notifier.stopping("stopping: " + await _line(view))
        stopper.cancel()
        pending = set(tasks)
        while pending:
            # Cancel again until all have ended: a gateway once stayed up after SIGTERM with a
            # forwarder back in its retry loop, its cancellation lost inside a failing POST.
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
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
