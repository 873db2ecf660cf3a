"""BLE link on bleak: passive scan for BTHome and Lantern adverts, GATT sessions that drain nodes.

One scanner runs for as long as the gateway does; if it cannot start, or the adapter stops
reporting adverts for `scan_stall_s`, it is restarted with backoff (never the process). A
Lantern advert names a node (4-byte tag) and its backlog; nodes with a backlog are connected,
at most `max_connections` at a time, largest backlog first, and drained (ble_session.py). A
failed connection is retried with exponential backoff and jitter, per node. Frames go to
ingest one by one (`Ingest.on_frame`), which acknowledges them only after they are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bleak import BleakClient, BleakScanner
from bleak.args.bluez import OrPattern, OrPatternLike
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner

from .. import bthome
from ..config import BleLinkConfig
from ..errors import FrameError
from ..ingest import Ingest
from ..store import Store
from .ble_adverts import CounterBook, ThirdParty
from .ble_session import SERVICE_UUID, NodeSession

log = logging.getLogger("lantern.link.ble")

LANTERN_ADVERT_VERSION = 1
_SERVICE_LE = bytes.fromhex(SERVICE_UUID.replace("-", ""))[::-1]


@dataclass(frozen=True)
class BleBackend:
    """bleak backend classes to use; None picks the platform's (BlueZ on the gateway)."""

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


@dataclass
class Candidate:
    node: str
    device: BLEDevice
    backlog: int = 0
    seen: float = 0.0
    rssi: int = 0


@dataclass
class NodeView:
    """What adverts told us about a node: for the status page and diagnostics."""

    address: str
    rssi: int = 0
    last_advert: float = 0.0
    values: dict[str, float | bool] = field(default_factory=dict)


def node_tag(node: str) -> bytes:
    return hashlib.sha256(node.encode()).digest()[:4]


class BleLink:
    def __init__(self, cfg: BleLinkConfig, ingest: Ingest, keys: dict[bytes, bytes], store: Store,
                 state_dir: Path, backend: BleBackend | None = None) -> None:
        self.cfg = cfg
        self.name = f"ble:{cfg.adapter}"
        self.ingest = ingest
        self.keys = keys
        self.backend = backend or BleBackend()
        self.stats: Counter[str] = Counter()
        ingest.metrics.ble_links[self.name] = self.stats  # exported on /metrics as lantern_ble_*
        self.connected = False  # the scanner is running
        self.bytes_in = 0
        self.bytes_out = 0
        self.nodes: dict[str, NodeView] = {}
        self.candidates: dict[str, Candidate] = {}
        self.sessions: dict[str, asyncio.Task[None]] = {}
        self._tags: dict[bytes, str] = {}
        for kid in keys:
            node = kid.decode()
            other = self._tags.setdefault(node_tag(node), node)
            if other != node:
                log.error("nodes %s and %s share an advert tag; %s is reached only when its "
                          "adverts are told apart by address", other, node, node)
        self._bindkeys = {kid.decode(): bthome.derive_bindkey(k) for kid, k in keys.items()}
        self._addr_node: dict[str, str] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._last_advert = 0.0
        self._wake = asyncio.Event()
        # a controller takes one LE Create Connection at a time (BlueZ: "InProgress"), so
        # connects are made one after another; the connections then run side by side
        self._connecting = asyncio.Lock()
        self._logged: set[tuple[str, str]] = set()
        self.counters = CounterBook(state_dir / f"ble-{cfg.adapter}-adverts.json")
        self.third_party = ThirdParty(cfg.devices, store, cfg.repeat_s, self.stats,
                                      self._wake_forwarders, ingest.metrics)

    # -- bookkeeping ------------------------------------------------------------------------

    def _wake_forwarders(self) -> None:
        """Readings we committed ourselves (third-party adverts): tell the forwarders."""
        self.ingest.committed.set()
        for ev in getattr(self.ingest, "listeners", ()):
            ev.set()

    def _reject(self, source: str, e: FrameError) -> None:
        self.stats[f"rejected_{e.kind}"] += 1
        if (source, e.kind) not in self._logged:
            self._logged.add((source, e.kind))
            log.warning("%s: rejected (%s): %s; further ones are only counted", source, e.kind, e)

    def snapshot(self) -> dict[str, Any]:
        return {"stats": dict(self.stats), "sessions": sorted(self.sessions),
                "nodes": {n: {"address": v.address, "rssi": v.rssi, "values": v.values}
                          for n, v in self.nodes.items()}}

    # -- adverts ----------------------------------------------------------------------------

    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        self._last_advert = time.monotonic()
        self.stats["adverts"] += 1
        address = device.address.upper()
        lantern = adv.service_data.get(SERVICE_UUID)
        if lantern is not None:
            try:
                self._on_lantern(address, device, adv, lantern)
            except FrameError as e:
                self._reject(f"{self.name} {address}", e)
        data = adv.service_data.get(bthome.UUID)
        if data is not None:
            try:
                self._on_bthome(address, adv, data)
            except FrameError as e:
                self._reject(f"{self.name} {address}", e)

    def _on_lantern(self, address: str, device: BLEDevice, adv: AdvertisementData,
                    data: bytes) -> None:
        if len(data) < 7 or data[0] != LANTERN_ADVERT_VERSION:
            raise FrameError("lantern_advert", f"version {data[:1].hex()} / {len(data)} bytes")
        node = self._tags.get(bytes(data[3:7]))
        if node is None:
            raise FrameError("unknown_node", f"tag {data[3:7].hex()} matches no node key")
        self._addr_node[address] = node
        c = self.candidates.get(address)
        if c is None or c.node != node:
            c = self.candidates[address] = Candidate(node, device)
        c.device, c.backlog, c.seen, c.rssi = device, int.from_bytes(data[1:3], "little"), \
            time.monotonic(), adv.rssi
        view = self.nodes.setdefault(node, NodeView(address))
        view.address, view.rssi, view.last_advert = address, adv.rssi, time.time()
        if c.backlog and address not in self.sessions:
            self._wake.set()

    def _on_bthome(self, address: str, adv: AdvertisementData, data: bytes) -> None:
        if self.third_party.handles(address):
            self.third_party.on_advert(address, data)
            return
        node = self._addr_node.get(address)
        if node is None:
            self.stats["adverts_foreign"] += 1  # someone else's sensor: not ours to judge
            return
        a = bthome.decode(data, bthome.mac_bytes(address), self._bindkeys[node])
        if a.encrypted:
            assert a.counter is not None
            fresh = self.counters.check(node, a.counter)
            if fresh is None:
                raise FrameError("advert_replay", f"{node}: counter {a.counter} <= "
                                 f"{self.counters.high[node]}")
            if not fresh:
                self.stats["advert_duplicates"] += 1
                return
        elif self.cfg.require_encrypted_adverts:
            raise FrameError("advert_plain", f"{node}: plaintext advert (nodes encrypt by "
                             "default; set require_encrypted_adverts = false to accept)")
        self.stats["adverts_accepted"] += 1
        view = self.nodes.setdefault(node, NodeView(address))
        view.rssi = adv.rssi
        for r in a.readings:
            view.values[bthome.LANTERN_NAMES.get(r.object_id, r.name)] = r.value

    # -- scanner ----------------------------------------------------------------------------

    async def _scan(self) -> None:
        delay = self.cfg.backoff_initial_s
        # BlueZ scans passively only through advertisement monitors: match both kinds of advert
        patterns: list[OrPatternLike] = [
            OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\xd2\xfc"),
            OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID128, _SERVICE_LE)]
        mode: Literal["active", "passive"] = (
            "active" if self.cfg.scanning_mode == "active" else "passive")
        while True:
            scanner = BleakScanner(self._on_advert, scanning_mode=mode,
                                   bluez={"adapter": self.cfg.adapter, "or_patterns": patterns},
                                   backend=self.backend.scanner)
            try:
                await asyncio.wait_for(scanner.start(), 30.0)
            except Exception as e:
                self.stats["scanner_start_failures"] += 1
                log.warning("%s: scanner does not start (%s: %s); retrying in %.1fs",
                            self.name, type(e).__name__, e, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.cfg.backoff_max_s)
                continue
            self.connected = True
            self.stats["scanner_starts"] += 1
            log.info("%s: scanning (%s)", self.name, self.cfg.scanning_mode)
            self._last_advert = time.monotonic()
            try:
                while time.monotonic() - self._last_advert < self.cfg.scan_stall_s:
                    await asyncio.sleep(min(1.0, self.cfg.scan_stall_s / 4))
                self.stats["scanner_restarts"] += 1
                log.warning("%s: no advert for %.0fs; restarting the scanner", self.name,
                            self.cfg.scan_stall_s)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(scanner.stop(), 5.0)

    # -- connections ------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            free = self.cfg.max_connections - len(self.sessions)
            ready = [c for addr, c in self.candidates.items()
                     if c.backlog > 0 and addr not in self.sessions
                     and self._retry_at.get(addr, 0.0) <= now
                     and now - c.seen < self.cfg.scan_stall_s]
            ready.sort(key=lambda c: -c.backlog)
            for c in ready[:max(free, 0)]:
                addr = c.device.address.upper()
                task = asyncio.create_task(self._session(addr, c), name=f"ble-{addr}")
                self.sessions[addr] = task
                task.add_done_callback(functools.partial(self._session_done, addr))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)

    def _session_done(self, addr: str, _task: asyncio.Task[None]) -> None:
        self.sessions.pop(addr, None)
        self._wake.set()

    async def _session(self, addr: str, c: Candidate) -> None:
        node = c.node
        session = NodeSession(f"{self.name} {addr} {node}", node, self.keys[node.encode()],
                              self.ingest.on_frame, self._reject)
        client = BleakClient(c.device, timeout=self.cfg.connect_timeout_s,
                             backend=self.backend.client)
        drained = False
        self.stats["connects"] += 1
        try:
            async with self._connecting:
                # bounded here too: some stacks never return from a connect to a gone device
                await asyncio.wait_for(client.connect(), self.cfg.connect_timeout_s + 5.0)
            log.info("%s: connected (backlog %d, MTU %d)", session.name, c.backlog,
                     client.mtu_size)
            drained = await session.run(client, self.cfg.idle_timeout_s, self.cfg.max_session_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.stats["session_failures"] += 1
            log.warning("%s: session failed (%s: %s)", session.name, type(e).__name__, e)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5.0)
            self.bytes_in += session.bytes_in
            self.bytes_out += session.bytes_out
            self.stats["frames"] += session.frames
        c.backlog = 0  # until an advert after this session says otherwise
        if drained:
            self.stats["drains"] += 1
            self._failures.pop(addr, None)
            self._retry_at.pop(addr, None)
            log.info("%s: drained (%d frames)", session.name, session.frames)
        else:
            n = self._failures.get(addr, 0) + 1
            self._failures[addr] = n
            delay = min(self.cfg.backoff_initial_s * 2 ** (n - 1), self.cfg.backoff_max_s)
            self._retry_at[addr] = time.monotonic() + delay * random.uniform(0.5, 1.0)

    async def run(self) -> None:
        await self.third_party.start()
        tasks = [asyncio.create_task(coro, name=f"{self.name}-{n}") for n, coro in (
            ("scan", self._scan()), ("schedule", self._schedule()),
            ("counters", self.counters.run()), ("third-party", self.third_party.run()))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in [*tasks, *self.sessions.values()]:
                t.cancel()
            for t in [*tasks, *self.sessions.values()]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
