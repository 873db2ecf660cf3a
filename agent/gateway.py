"""The gateway service: links → ingest → durable queue → forwarder → sink."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sqlite3
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import preflight
from .api import ApiServer, GatewayView
from .config import Config, load_config, load_keys
from .errors import ConfigError
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


LOCK_FILE = "gateway.lock"


def claim_state_dir(state_dir: Path) -> IO[str]:
    """What the state directory must give before anything is opened, and a lock held for the
    process's life: a second gateway on the same queue is refused, never run beside it.
    Raises ConfigError, one line saying what to fix."""
    found = preflight.check_state(state_dir)
    if found:
        raise ConfigError("; ".join(found))
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        f = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until the process ends
    except OSError as e:
        raise ConfigError(f"{state_dir}: cannot create the state directory or its lock "
                          f"({e.strerror}); check its owner and free space") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip() or "?"
        f.close()
        raise ConfigError(f"{state_dir}: another gateway (pid {other}) runs on this state "
                          "directory; stop it first, or give this one its own state_dir"
                          ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


async def _open_store(path: Path) -> Store:
    try:
        return await Store(path).__aenter__()
    except (sqlite3.Error, OSError) as e:
        raise ConfigError(f"{path}: cannot open the queue ({e}); check that the state "
                          "directory is writable and has free space") from None


async def run(cfg: Config, ble_backend: BleBackend | None = None) -> None:
    """ble_backend: bleak backend classes for [[links.ble]] (tests: a virtual radio)."""
    keys = load_keys(cfg.keys_file)
    metrics = Metrics()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(claim_state_dir(cfg.state_dir))
        store = await _open_store(cfg.state_dir / QUEUE_FILE)
        stack.push_async_exit(store)
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
