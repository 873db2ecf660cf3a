"""The gateway service: links → ingest → durable queue → forwarder → sink."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import pwd
import signal
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import preflight
from .api import ApiServer, GatewayView
from .config import Config, HealthConfig, load_config, load_keys
from .errors import ConfigError
from .ingest import Ingest
from .metrics import Metrics, TimedSink
from .ota.rollout import RolloutManager
from .plugins import LinkContext, SinkContext
from .plugins import link as link_plugin
from .plugins import sink as sink_plugin
from .queue.forward import Forwarder
from .queue.layout import QUEUE_FILE
from .queue.store import Store
from .registry import REGISTRY_FILE, Fleet, Registry
from .sdnotify import Notifier, supervise
from .timesync import CLOCK_FILE, TimeSync

if TYPE_CHECKING:
    from .health.service import HealthService
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


VERSIONS_EVERY_S = 5.0
PROBE_UNKNOWN_S = 15.0
PROBE_EVERY_S = 600.0


def _reach(links: list[Any], metrics: Metrics) -> Callable[[str], Any]:
    """node id → the command channel of the link that reaches it now, or None."""
    from .nodecmd import NoRoute, route

    def reach(node: str) -> Any:
        seen = metrics.nodes.get(node)
        try:
            return route(links, node, seen.link if seen else None)
        except NoRoute:
            return None

    return reach


async def _learn_versions(rollout: RolloutManager, links: list[Any], nodes: list[str]) -> None:
    """Each node's firmware and board, as its last STATUS on any link said (agent/nodecmd.py
    keeps them per channel), handed to the rollout manager and from it to the sinks and the
    API. A node speaks STATUS only when asked: a link is probed (one empty COMMAND, answered
    by whoever is on it) every PROBE_UNKNOWN_S while a node's version is unknown, and every
    PROBE_EVERY_S anyway (a node flashed by cable runs another version)."""
    probed: dict[str, float] = {}
    while True:
        now = time.monotonic()
        unknown = any(n not in rollout.firmware for n in nodes)
        for link in links:
            channel = getattr(link, "commander", None)
            if channel is None or not hasattr(channel, "identity"):
                continue
            for node in nodes:
                ident = channel.identity(node)
                if ident is not None and ident.verified:
                    rollout.learn(node, ident.firmware, ident.board, ident.upd)
            last = probed.get(link.name)
            if getattr(link, "connected", False) and (
                    last is None or now - last > (PROBE_UNKNOWN_S if unknown else PROBE_EVERY_S)):
                probed[link.name] = now
                channel.probe()
        await asyncio.sleep(VERSIONS_EVERY_S)


def release_memory() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim(0)): what the
    imports and the start freed stays resident otherwise, ~1 MB of an idle gateway's RSS
    (docs/performance.md "Idle memory"). False, and nothing done, without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # musl, or no C library to ask
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


LOCK_FILE = "gateway.lock"
_LOCK_FLAGS = (os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
               | os.O_NONBLOCK)  # a FIFO or a device in its place must not block the start


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _open_lock(state_dir: Path) -> int:
    """The lock file's descriptor, if it is a plain file of this user's that nobody else can
    open (whoever holds it keeps every gateway from starting). Raises ConfigError or OSError."""
    st = os.stat(state_dir)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{state_dir}: mode {stat.S_IMODE(st.st_mode):04o} lets other users "
                          f"replace the gateway's files; run: chmod go-w {state_dir}")
    lock = state_dir / LOCK_FILE
    try:
        fd = os.open(lock, _LOCK_FLAGS, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{lock}: is a symbolic link; the lock must be a plain file "
                              "owned by the gateway's user: remove it (the gateway creates it)"
                              ) from None
        raise
    try:
        st = os.fstat(fd)
        problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
                   else f"belongs to {_owner(st.st_uid)}, not to {_owner(os.geteuid())}"
                   if st.st_uid != os.geteuid()
                   else f"has {st.st_nlink} hard links" if st.st_nlink != 1 else "")
        if problem:
            raise ConfigError(f"{lock}: {problem}; the lock must be a plain file owned by "
                              "the gateway's user: run the gateway as the state directory's "
                              "user, or remove it (the gateway creates it)")
        if stat.S_IMODE(st.st_mode) != 0o600:  # an older gateway's 0644 lock
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def claim_state_dir(state_dir: Path) -> IO[bytes]:
    """What the state directory must give before anything is opened, and a lock held for the
    process's life: a second gateway on the same queue is refused, never run beside it.
    Raises ConfigError, one line saying what to fix."""
    found = preflight.check_state(state_dir)
    if found:
        raise ConfigError("; ".join(found))
    try:
        # 0700: only the gateway's user may open the lock (flock needs only read access);
        # a directory the operator made is left as it is, and refused if others can write it
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = _open_lock(state_dir)
    except OSError as e:
        raise ConfigError(f"{state_dir}: cannot create the state directory or its lock "
                          f"({e.strerror}); check its owner and free space") from None
    f = os.fdopen(fd, "r+b", buffering=0)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        # the other gateway's pid, if the file holds one: it is shown in a one-line message
        held = os.pread(fd, 32, 0).strip()
        f.close()
        other = held.decode() if held.isdigit() else "?"
        raise ConfigError(f"{state_dir}: another gateway (pid {other}) runs on this state "
                          "directory; stop it first, or give this one its own state_dir"
                          ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return f


HEALTH_TICK_S = 30.0  # how often a silent node is looked for


async def _health_ticks(health: HealthService) -> None:
    """NodeSilent needs a clock, not a reading: the monitor looks every HEALTH_TICK_S."""
    failures = 0
    while True:
        await asyncio.sleep(HEALTH_TICK_S)
        try:
            await health.tick()
        except Exception as e:  # its store failing, or a bug: said once, tried next tick
            failures += 1
            if failures == 1:
                log.error("health: the silence check failed (%r); tried again every %g s",
                          e, HEALTH_TICK_S, exc_info=not isinstance(e, sqlite3.Error))
            continue
        if failures:
            log.info("health: the silence check works again after %d failures", failures)
            failures = 0


async def _open_health(cfg: HealthConfig, stack: contextlib.AsyncExitStack, state_dir: Path,
                       mqtt: Any) -> HealthService:
    """The health monitor and its alert targets, closed with the stack (targets last)."""
    from .health import notify
    from .health.service import HealthService

    targets: list[notify.Target] = []
    if cfg.webhook_url:
        import aiohttp

        session = await stack.enter_async_context(aiohttp.ClientSession())
        headers = {}
        if cfg.webhook_token_file:
            headers["Authorization"] = "Bearer " + cfg.webhook_token_file.read_text().strip()
        targets.append(notify.Webhook(cfg.webhook_url, session, timeout_s=cfg.webhook_timeout_s,
                                      headers=headers))
    if cfg.mqtt_topic:
        publisher = notify.MqttPublisher(mqtt)
        stack.push_async_callback(publisher.aclose)
        targets.append(notify.Mqtt(publisher.publish, cfg.mqtt_topic))
    svc = HealthService(cfg.settings, state_dir, targets, receiver=cfg.receiver,
                        external_url=cfg.external_url)
    try:
        return await stack.enter_async_context(svc)
    except (sqlite3.Error, OSError) as e:
        raise ConfigError(f"{state_dir}: cannot open the health monitor's store ({e}); check "
                          "that the state directory is writable and has free space") from None


async def _open_registry(path: Path) -> Registry:
    try:
        return await asyncio.to_thread(Registry, path)
    except (sqlite3.Error, OSError) as e:
        raise ConfigError(f"{path}: cannot open the fleet registry ({e}); check that the "
                          "state directory is writable and has free space") from None


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
    # Signals are taken from the start: a stop while starting (systemctl stop, Ctrl-C) ends
    # the start, closing what it opened, instead of killing the process half way.
    stop, up = asyncio.Event(), asyncio.Event()
    me = asyncio.current_task()

    def on_signal() -> None:
        if me is not None and not up.is_set() and not stop.is_set():
            me.cancel()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await _serve(cfg, keys, metrics, ble_backend, stop, up)
    except asyncio.CancelledError:
        if me is None or up.is_set() or not stop.is_set():
            raise
        me.uncancel()
        log.info("gateway stopped while starting")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _serve(cfg: Config, keys: dict[bytes, bytes], metrics: Metrics,
                 ble_backend: BleBackend | None, stop: asyncio.Event, up: asyncio.Event) -> None:
    """Start everything, then run until `stop` (`up` is set once started)."""
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(claim_state_dir(cfg.state_dir))
        store = await _open_store(cfg.state_dir / QUEUE_FILE)
        stack.push_async_exit(store)
        store.history.keep_s = cfg.history.keep_hours * 3600.0
        store.history.max_rows = cfg.history.max_samples
        await store.limit(cfg.queue.max_bytes, cfg.queue.policy)
        store.deliver_every_s = cfg.queue.deliver_every_s
        links: list[Any] = []  # made below, once ingest runs; the rollout reaches them then
        node_ids = [k.decode() for k in keys]
        # the fleet registry (docs/fleet.md): the keys ingest and the links are given leave
        # out a revoked node's and a retired key; nodes imported while running are added
        registry = await _open_registry(cfg.state_dir / REGISTRY_FILE)
        stack.callback(registry.close)
        fleet = Fleet(registry, cfg.keys_file, keys, cfg.nodes, node_ids)
        await fleet.start()
        rollout = RolloutManager(cfg.state_dir, cfg.updates, _reach(links, metrics),
                                 lambda: node_ids)
        health = None
        if cfg.health is not None:
            health = await _open_health(cfg.health, stack, cfg.state_dir, cfg.sinks.get("mqtt"))
        sinks: list[Any] = []
        opened: list[Any] = []  # the sinks themselves, as their plug-ins made them
        backoffs: list[tuple[float, float]] = []
        sink_ctx = SinkContext(fleet.nodes_meta, cfg.state_dir, rollout.firmware, health)
        for name, sink_cfg in cfg.sinks.items():  # each sink's plug-in opens it (plugins.py)
            plugin = sink_plugin(name)
            sink = await stack.enter_async_context(plugin.open(sink_cfg, sink_ctx))
            opened.append(sink)
            sinks.append(TimedSink(sink, metrics))  # upstream latency histogram
            backoffs.append(plugin.backoff(sink_cfg))
        for sink in opened:
            if hasattr(sink, "registry"):  # deviceState from the registry (NGSI-LD)
                sink.registry = registry
        ingest = Ingest(store, fleet.ingest_keys, metrics)
        ingest.commit_window_s = cfg.queue.commit_window_ms / 1000.0
        # its own clock (docs/time.md): ACKs carry the time only while it is synchronised,
        # and relative times are anchored at receipt, corrected by the step it takes on syncing
        clock = TimeSync(mode=cfg.clock.mode, path=cfg.state_dir / CLOCK_FILE)
        ingest.clock = clock
        store.out.clock = store.history.clock = clock
        clock.state()  # logged now: an unsynchronised clock is the first thing an operator sees
        await ingest.start()
        ctx = LinkContext(ingest, fleet.link_keys, store, cfg.state_dir,
                          backends={"ble": ble_backend})
        links += [link_plugin(name).make(link_cfg, ctx)
                  for name, link_cfgs in cfg.links.items() for link_cfg in link_cfgs]
        # the registry's verdict on every frame (a revocation applies at once), a rotating
        # node's other key, and the live fleet operations over the links (docs/fleet.md)
        stack.callback(fleet.attach(ingest, links, metrics).close)
        # every consumer of the queue: a frame leaves it once each one has it
        consumers = [s.name for s in sinks]
        if health is not None:  # (loaded only when configured: idle memory, issue 22)
            from .health.feed import NAME as HEALTH
            from .health.feed import HealthSink

            consumers.append(HEALTH)
        forwarders = []
        for sink, backoff in zip(sinks, backoffs, strict=True):
            ev = asyncio.Event()
            ingest.listeners.append(ev)
            forwarders.append(Forwarder(store, sink, metrics, ev, cfg.batch_max_records,
                                        cfg.batch_max_age_s, *backoff, all_sinks=consumers))
        fed: list[Forwarder] = []
        if health is not None:
            # the monitor reads each frame once it is committed, with no wait for a fuller
            # batch; its counters are not the sinks' (readings_delivered counts upstream)
            ev = asyncio.Event()
            ingest.listeners.append(ev)
            fed.append(Forwarder(store, HealthSink(health), Metrics(), ev,
                                 cfg.batch_max_records, 0.0, 0.5, 30.0, all_sinks=consumers))
        await stack.enter_async_context(rollout)
        view = GatewayView(metrics, store, node_ids, links, forwarders,
                           [store.path, store.path.with_name(store.path.name + "-wal")],
                           rollout=rollout, health=health, nodes_meta=fleet.nodes_meta,
                           registry=registry, clock=clock)
        api = await stack.enter_async_context(ApiServer(cfg.api, view))
        notifier = Notifier()
        stack.callback(notifier.close)
        log.info("gateway up: %d node keys, links %s, sinks %s", len(keys),
                 ", ".join(link.name for link in links), ", ".join(s.name for s in sinks))
        up.set()  # from here a signal stops the tasks below in order
        tasks = [asyncio.create_task(c, name=n) for n, c in (
            ("ingest", ingest.run()),
            *((f"forward-{f.sink.name}", f.run()) for f in forwarders + fed),
            *((("health", _health_ticks(health)),) if health is not None else ()),
            ("summary", _summaries(metrics, store)),
            ("supervise", supervise(notifier, view.summary)),
            ("versions", _learn_versions(rollout, links, node_ids)),
            ("fleet", fleet.run(lambda: {n: s.last_seen for n, s in metrics.nodes.items()},
                                rollout.firmware, getattr(ingest, "forget", None), opened)),
            *((link.name, link.run()) for link in links))]
        release_memory()  # start-up is over: its freed memory goes back (issue 22)
        notifier.ready(("status page " + api.url + "; " if api.url else "")
                       + (api.error + "; " if api.error else "") + await _line(view))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        notifier.stopping("stopping: " + await _line(view))
        stopper.cancel()
        await rollout.stop()  # before the links: a node must not look unreachable
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
