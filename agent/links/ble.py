"""BLE link on bleak: passive scan for BTHome and Lantern adverts, GATT sessions that drain nodes.

One scanner runs for as long as the gateway does; if it cannot start, or the adapter stops
reporting adverts for `scan_stall_s`, it is restarted with backoff (never the process). A
Lantern advert names a node (4-byte tag, public) and its backlog; it is a claim, not a proof.
Addresses that proved themselves (ble_adverts.AddressBook) are drained first, the node that
waited longest first, at most `max_connections` at a time; claimers are tried only for a node
with no proven address on air, one at a time (ble_session.py drains). A failed session is
retried with exponential backoff and jitter, per address. Frames go to ingest one by one
(`Ingest.on_frame`), which acknowledges them only after they are committed.

Commands (agent/nodecmd.py, `commander`): REPLY and STATUS go to the channel, COMMANDs to the
node's session behind its ACKs. A command to a node with no session opens one at the node's
proven address, backlog or not, and the session stays while commands are unanswered or were
sent within `idle_timeout_s`, up to `max_command_session_s` (docs/updates-gateway.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
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

from .. import bthome, protocol
from ..errors import FrameError
from ..ingest import Ingest
from ..nodecmd import Channel, counters_for
from ..queue.store import Store
from .ble_adverts import AddressBook, Candidate, CounterBook, ThirdParty
from .ble_config import BleLinkConfig
from .ble_session import SERVICE_UUID, NodeSession

log = logging.getLogger("lantern.link.ble")

LANTERN_ADVERT_VERSION = 1
_SERVICE_LE = bytes.fromhex(SERVICE_UUID.replace("-", ""))[::-1]
MAX_UNPROVEN_SESSIONS = 1  # connections spent on claimers at once (the rest: proven nodes)
TRIAL_NODES = 4  # bindkeys tried on an encrypted advert from an address we do not know
LOG_SOURCES = 8  # sources logged per kind of rejection; after them, only counted
_MIN_PASS_S = 0.05  # between scheduling passes: a flood of adverts wakes it, once per this


@dataclass(frozen=True)
class BleBackend:
    """bleak backend classes to use; None picks the platform's (BlueZ on the gateway)."""

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


@dataclass
class NodeView:
    """What adverts told us about a node: for the status page and diagnostics."""

    address: str  # only ever one that proved itself (AddressBook.prove)
    rssi: int = 0
    last_advert: float = 0.0
    values: dict[str, float | bool] = field(default_factory=dict)


def node_tag(node: str) -> bytes:
    return hashlib.sha256(node.encode()).digest()[:4]


def _sealed_for(data: bytes, address: str) -> bool:
    """Whether an encrypted BTHome advert was sealed for the address that sent it: its nonce
    holds that address, unless the advert carries another MAC (flag 0x02) to use instead."""
    return not data[0] & 0x02 or data[1:7][::-1] == bthome.mac_bytes(address)


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
        self.book = AddressBook((kid.decode() for kid in keys), self.stats)
        self.sessions: dict[str, asyncio.Task[None]] = {}  # address → its session
        self._busy: dict[str, str] = {}  # node → the address of its session
        self._claimer_sessions: set[str] = set()  # addresses of sessions to claimers
        self._tags: dict[bytes, str] = {}
        for kid in keys:
            node = kid.decode()
            other = self._tags.setdefault(node_tag(node), node)
            if other != node:
                log.error("nodes %s and %s share an advert tag; %s is reached only when its "
                          "adverts are told apart by address", other, node, node)
        # node → (its key, the BTHome bindkey made from it): made again when a rotation
        # (agent/fleetops.py) replaces the key in `keys`, as the node does (node/rekey.py)
        self._bindkeys: dict[str, tuple[bytes, bytes]] = {}
        self._trial_from = 0  # round robin over the nodes an unknown address may be
        self._last_advert = 0.0
        self._wake = asyncio.Event()
        # a controller takes one LE Create Connection at a time (BlueZ: "InProgress"), so
        # connects are made one after another; the connections then run side by side
        self._connecting = asyncio.Lock()
        self._logged: dict[str, set[str]] = {}  # kind → sources logged (≤ LOG_SOURCES)
        self.counters = CounterBook(state_dir / f"ble-{cfg.adapter}-adverts.json")
        # third-party readings reach the queue through ingest, its one writer; `store` is not
        # used here any more (kept while ble_config.make and the tests still pass it)
        self.third_party = ThirdParty(cfg.devices, ingest, cfg.repeat_s, self.stats, self.name)
        # commands: counted in commander.stats (its own keys, and `unsent`, `command_connects`,
        # `command_limits` of this link), not in self.stats, which /metrics exports as is
        self.commander = Channel(self.name, None, keys, counters_for(state_dir), self.serves,
                                 send_to=self._send_command, reach=self._reach)
        self._live: dict[str, NodeSession] = {}  # node → its session, once commands can go
        self._want: dict[str, float] = {}  # node → keep (or open) its session until then
        self._changed = asyncio.Event()  # a session became ready or ended (pulsed)

    # -- bookkeeping ------------------------------------------------------------------------


    def _bindkey(self, node: str) -> bytes:
        """The node's BTHome bindkey, from the key it seals with now."""
        key = self.keys[node.encode()]
        have = self._bindkeys.get(node)
        if have is None or have[0] != key:
            have = self._bindkeys[node] = (key, bthome.derive_bindkey(key))
        return have[1]
    def _reject(self, source: str, e: FrameError) -> None:
        self.stats[f"rejected_{e.kind}"] += 1
        # sources are addresses, which a stranger picks at will: a few logged per kind
        logged = self._logged.setdefault(e.kind, set())
        if source in logged or len(logged) > LOG_SOURCES:
            return
        logged.add(source)
        if len(logged) > LOG_SOURCES:
            log.warning("%s: rejected (%s): %s; further ones, from any source, are only "
                        "counted (lantern_ble_rejected_total)", source, e.kind, e)
        else:
            log.warning("%s: rejected (%s): %s; further ones are only counted", source,
                        e.kind, e)

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
                self._on_bthome(address, device, adv, data)
            except FrameError as e:
                self._reject(f"{self.name} {address}", e)

    def _on_lantern(self, address: str, device: BLEDevice, adv: AdvertisementData,
                    data: bytes) -> None:
        if len(data) < 7 or data[0] != LANTERN_ADVERT_VERSION:
            raise FrameError("lantern_advert", f"version {data[:1].hex()} / {len(data)} bytes")
        node = self._tags.get(bytes(data[3:7]))
        if node is None:
            raise FrameError("unknown_node", f"tag {data[3:7].hex()} matches no node key")
        now = time.monotonic()
        c = self.book.claim(node, address, device, now)
        if c.node != node:
            return  # the proven address of another node: counted (address_conflicts)
        c.backlog, c.seen, c.rssi = int.from_bytes(data[1:3], "little"), now, adv.rssi
        if self.book.is_proven(c):
            view = self.nodes[node]  # made by the proof
            view.rssi, view.last_advert = adv.rssi, time.time()
        if c.backlog and node not in self._busy:
            self._wake.set()

    def _on_bthome(self, address: str, device: BLEDevice, adv: AdvertisementData,
                   data: bytes) -> None:
        if self.third_party.handles(address):
            self.third_party.on_advert(address, data)
            return
        c = self.book.get(address)
        if c is not None:
            node = c.node
            try:
                a = bthome.decode(data, bthome.mac_bytes(address), self._bindkey(node))
            except FrameError:
                self.book.forget(c)  # claims a node and fails its key: no node does that
                raise
        else:
            found = self._trial(address, data)
            if found is None:
                self.stats["adverts_foreign"] += 1  # someone else's sensor: not ours to judge
                return
            node, a = found
        if a.encrypted:
            assert a.counter is not None
            fresh = self.counters.check(node, a.counter)
            if fresh is None:
                raise FrameError("advert_replay", f"{node}: counter {a.counter} <= "
                                 f"{self.counters.high[node]}")
            if fresh and _sealed_for(data, address):
                self._proven(node, address, device)
            elif not fresh:
                self.stats["advert_duplicates"] += 1
                return
        elif self.cfg.require_encrypted_adverts:
            raise FrameError("advert_plain", f"{node}: plaintext advert (nodes encrypt by "
                             "default; set require_encrypted_adverts = false to accept)")
        c = self.book.get(address)
        if c is None or not self.book.is_proven(c):
            self.stats["adverts_unproven"] += 1  # plain, from an address that proved nothing
            return
        self.stats["adverts_accepted"] += 1
        view = self.nodes[node]
        view.rssi = adv.rssi
        for r in a.readings:
            view.values[bthome.LANTERN_NAMES.get(r.object_id, r.name)] = r.value

    def _trial(self, address: str, data: bytes) -> tuple[str, bthome.Advert] | None:
        """An encrypted advert from an address no Lantern advert of ours is kept for: try the
        bindkeys of the few nodes that were claimed lately and have no proven address on air
        (a node whose claimers a flood keeps evicting still proves itself this way)."""
        if not data or not data[0] & 0x01:
            return None
        now = time.monotonic()
        stall = self.cfg.scan_stall_s
        need = [n for n, e in self.book.nodes.items()
                if now - e.claimed_at < stall
                and (e.proven is None or now - e.proven.seen >= stall)]
        if not need:
            return None
        start = self._trial_from % len(need)
        self._trial_from += 1
        mac = bthome.mac_bytes(address)
        for node in (need[start:] + need[:start])[:TRIAL_NODES]:
            try:
                return node, bthome.decode(data, mac, self._bindkey(node))
            except FrameError:
                continue
        return None

    def _proven(self, node: str, address: str, device: BLEDevice) -> None:
        """`address` authenticated as `node`: the address it is drained at, and shown at."""
        before = self.book.nodes[node].proven
        c = self.book.prove(node, address, device)
        if before is not c:
            log.info("%s: %s proved itself as %s", self.name, address, node)
        view = self.nodes.setdefault(node, NodeView(address))
        view.address = address
        if c.backlog and node not in self._busy:
            self._wake.set()

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

    # -- commands ---------------------------------------------------------------------------

    def serves(self, node: str) -> bool:
        """Whether a command can reach `node`: a session is open, or its proven address is on
        air (a claimer is never commanded: it has proved nothing)."""
        if node in self._live:
            return True
        entry = self.book.nodes.get(node)
        p = entry.proven if entry is not None else None
        return p is not None and time.monotonic() - p.seen < self.cfg.scan_stall_s

    def _hold(self, node: str) -> tuple[float, int]:
        return self._want.get(node, 0.0), self.commander.waiting(node)

    def _send_command(self, node: str | None, ftype: int, body: bytes) -> None:
        """The channel's sender: into the node's session (every open one for a probe)."""
        if node is None:
            for live in self._live.values():
                live.send_command(ftype, body)
            return
        s = self._live.get(node)
        if s is None or not s.send_command(ftype, body):
            self.commander.stats["unsent"] += 1  # the session ended: the channel times out
            return
        self._want[node] = max(self._want.get(node, 0.0),
                               time.monotonic() + self.cfg.idle_timeout_s)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _reach(self, node: str) -> bool:
        """Wait until `node` has a session that takes commands, asking the scheduler for one
        if need be (within connect_timeout_s + idle_timeout_s); False if none came."""
        deadline = time.monotonic() + self.cfg.connect_timeout_s + self.cfg.idle_timeout_s
        while True:
            now = time.monotonic()
            if node in self._live:
                self._want[node] = max(self._want.get(node, 0.0), now + self.cfg.idle_timeout_s)
                return True
            if now >= deadline or not self.serves(node):
                self._want.pop(node, None)
                return False
            self._want[node] = max(self._want.get(node, 0.0), now + self.cfg.idle_timeout_s)
            if node not in self._busy:
                self._wake.set()
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(0.5, deadline - now))

    # -- connections ------------------------------------------------------------------------

    def _pick(self, now: float) -> list[Candidate]:
        """The sessions to start now: proven addresses first, the node that waited longest
        first; then a claimer of a node with no proven address on air, one at a time, the
        largest backlog among that node's claimers first. Bounded by the node keys."""
        free = self.cfg.max_connections - len(self.sessions)
        if free <= 0:
            return []
        stall = self.cfg.scan_stall_s
        proven: list[tuple[float, Candidate]] = []
        unproven: list[tuple[float, Candidate]] = []
        for node, entry in self.book.nodes.items():
            if node in self._busy:
                continue
            p = entry.proven
            if p is not None and now - p.seen < stall:  # on air: its own word is the one
                wanted = self._want.get(node, 0.0) > now  # the gateway has commands for it
                if (p.backlog > 0 or wanted) and p.retry_at <= now:
                    proven.append((entry.last_session, p))
                continue
            if entry.unproven_retry_at > now:
                continue
            best = None
            for c in entry.unproven.values():
                if c.backlog > 0 and c.retry_at <= now and now - c.seen < stall and (
                        best is None or c.backlog > best.backlog):
                    best = c
            if best is not None:
                unproven.append((entry.last_session, best))
        out = [c for _, c in heapq.nsmallest(free, proven, key=lambda t: t[0])]
        room = min(free - len(out), MAX_UNPROVEN_SESSIONS - len(self._claimer_sessions))
        if room > 0:
            out += [c for _, c in heapq.nsmallest(room, unproven, key=lambda t: t[0])]
        return out

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            for c in self._pick(time.monotonic()):
                addr = c.address
                if not self.book.is_proven(c):
                    self._claimer_sessions.add(addr)
                self.book.nodes[c.node].last_session = time.monotonic()
                self._busy[c.node] = addr
                task = asyncio.create_task(self._session(addr, c), name=f"ble-{addr}")
                self.sessions[addr] = task
                task.add_done_callback(functools.partial(self._session_done, addr, c))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)
            await asyncio.sleep(_MIN_PASS_S)

    def _session_done(self, addr: str, c: Candidate, _task: asyncio.Task[None]) -> None:
        self.sessions.pop(addr, None)
        self._claimer_sessions.discard(addr)
        if self._busy.get(c.node) == addr:
            del self._busy[c.node]
        if self._want.get(c.node, 0.0) <= time.monotonic():
            self._want.pop(c.node, None)  # bounded: only nodes with a hold still running
        self._wake.set()
        self._pulse()

    async def _session(self, addr: str, c: Candidate) -> None:
        node = c.node
        claimer = not self.book.is_proven(c)
        proved = False

        def on_frame(link: NodeSession, ftype: int, body: bytes) -> None:
            nonlocal proved
            if ftype in (protocol.REPLY, protocol.STATUS):
                self.commander.on_frame(ftype, body)  # verified there, under the node key
                return
            # proof is ingest's verdict: a pack of this node's, authentic and new, taken for
            # the queue. Authentic alone proves nothing: the gateway's own start ACK is MACed
            # under the node key too, and a stranger can play it back as DATA (ingest
            # refuses that as `reflected`; docs/security.md). awake: the node keeps its radio
            # on (and this connection) until the ACK, so the commit does not wait for others
            if self.ingest.on_frame(link, ftype, body, awake=True) == node and not proved:
                proved = True
                self._proven(node, addr, c.device)

        def on_ready(s: NodeSession) -> None:
            self._live[node] = s
            self._pulse()

        session = NodeSession(f"{self.name} {addr} {node}", node, self.keys[node.encode()],
                              on_frame, self._reject, on_ready)
        if self._want.get(node, 0.0) > time.monotonic() and not c.backlog:
            self.commander.stats["command_connects"] += 1
        client = BleakClient(c.device, lambda _client: session.lost(),
                             timeout=self.cfg.connect_timeout_s, backend=self.backend.client)
        drained = False
        self.stats["connects"] += 1
        if claimer:
            self.stats["connects_unproven"] += 1
        try:
            async with self._connecting:
                # bounded here too: some stacks never return from a connect to a gone device
                await asyncio.wait_for(client.connect(), self.cfg.connect_timeout_s + 5.0)
            log.info("%s: connected (backlog %d, MTU %d%s)", session.name, c.backlog,
                     client.mtu_size, ", address not proven yet" if claimer else "")
            drained = await session.run(
                client, self.cfg.idle_timeout_s, self.cfg.max_session_s,
                hold=functools.partial(self._hold, node),
                command_max_s=self.cfg.max_command_session_s)
            if session.ended_by == "command_limit":
                self.commander.stats["command_limits"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.stats["session_failures"] += 1
            log.warning("%s: session failed (%s: %s)", session.name, type(e).__name__, e)
        finally:
            if self._live.get(node) is session:
                del self._live[node]
                self._pulse()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5.0)
            self.bytes_in += session.bytes_in
            self.bytes_out += session.bytes_out
            self.stats["frames"] += session.frames
        c.backlog = 0  # until an advert after this session says otherwise
        entry = self.book.nodes[node]
        if claimer and not proved:
            # a claimer that delivered nothing new under the node's key: the node's claimers
            # are tried less and less often while it has no proven address
            entry.unproven_failures += 1
            entry.unproven_retry_at = time.monotonic() + self._backoff(entry.unproven_failures)
        if drained:
            self.stats["drains"] += 1
            c.failures, c.retry_at = 0, 0.0
            log.info("%s: drained (%d frames)", session.name, session.frames)
        else:
            c.failures += 1
            c.retry_at = time.monotonic() + self._backoff(c.failures)

    def _backoff(self, n: int) -> float:
        delay: float = min(self.cfg.backoff_initial_s * 2 ** (n - 1), self.cfg.backoff_max_s)
        return delay * random.uniform(0.5, 1.0)

    async def run(self) -> None:
        tasks = [asyncio.create_task(coro, name=f"{self.name}-{n}") for n, coro in (
            ("scan", self._scan()), ("schedule", self._schedule()),
            ("counters", self.counters.run()))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in [*tasks, *self.sessions.values()]:
                t.cancel()
            for t in [*tasks, *self.sessions.values()]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
