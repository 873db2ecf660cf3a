"""From link bytes to committed, acknowledged frames.

chunk → frame (COBS, CRC) → COSE_Mac0 (known node, MAC) → replay window (the node key's) →
the pack's CBOR checked, its array head read → group commit to SQLite → ACK. A frame is
acknowledged only after the transaction holding it commits; anything malformed or forged is
counted by kind and logged once per source, and a frame we fail on ourselves (`internal`)
never costs the frames around it. The pack is resolved into SenML on its way upstream
(agent/resolved.py), off this path: one that does not resolve then becomes a dead letter,
counted and logged here too.
While too many frames wait for a commit, `intake` is cleared and links stop reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Protocol

from . import protocol
from .errors import AuthError, FrameError
from .metrics import Metrics
from .store import Accepted, Store, Window

log = logging.getLogger("lantern.ingest")

MAX_SEQS_PER_ACK = 32
# Frames waiting for a commit (queued and in the running one) at which links stop reading,
# and below which they read again: a burst is bounded in memory, and the line pushes back.
INTAKE_HIGH = 1024
INTAKE_LOW = 256
# How long frames wait behind an older one refused at the disk cap: a node resends within
# 30 s (its longest backoff) plus jitter; one that never does (evicted it) must not block.
HOLD_MAX_S = 75.0


class Link(Protocol):
    name: str

    def send(self, data: bytes) -> None: ...


class Ingest:
    def __init__(self, store: Store, keys: dict[bytes, bytes], metrics: Metrics) -> None:
        self.store = store
        self.keys = keys
        self.metrics = metrics
        self.windows: dict[str, Window] = {}
        self._pending: list[tuple[Link, Accepted]] = []
        self._pending_ids: set[tuple[str, int]] = set()
        self._wake = asyncio.Event()
        self._deframers: dict[str, protocol.Deframer] = {}
        self._logged: set[tuple[str, str]] = set()
        self.committed = asyncio.Event()  # set after each commit, for the forwarder
        self._store_failing = 0  # commits failed in a row (disk full, read-only): logged once
        self._held: dict[str, tuple[set[int], float]] = {}  # node → (refused seqs, when last)
        self.listeners: list[asyncio.Event] = []  # one per forwarder: each clears its own
        self._node_keys: dict[bytes, protocol.NodeKey] = {}
        self._committing = 0  # frames in the commit under way
        self.intake = asyncio.Event()  # set: links may read; cleared at INTAKE_HIGH
        self.intake.set()

    async def start(self) -> None:
        self.windows = await self.store.windows()
        self.store.on_dead_letter = self._dead_letter
        adopt = {}
        for node, w in self.windows.items():
            nk = self._node_key(node.encode())
            if nk is None:
                continue
            if not w.key:  # kept before windows had a key (layout 2): it is this key's
                w.key = adopt[node] = nk.key_id
            elif w.key != nk.key_id:
                self._window(node, nk)
        if adopt:
            await self.store.adopt_keys(adopt)

    def _window(self, node: str, nk: protocol.NodeKey) -> Window:
        """The node's replay window under its configured key; a new key starts a new one.

        A node provisioned again (a wiped node gets a new key) counts from the start: its
        frames would be refused as replays of the old key's. Frames made with the old key no
        longer verify, so a fresh window opens no replay.
        """
        w = self.windows.get(node)
        if w is not None and w.key == nk.key_id:
            return w
        if w is not None:
            self.metrics.window_restarts += 1
            log.info("node %s: key changed, replay window restarted", node)
        w = self.windows[node] = Window(key=nk.key_id)
        return w

    def _dead_letter(self, node: str, seq: int, kind: str, detail: str) -> None:
        """A committed pack that did not resolve: kept as a dead letter by the store."""
        self.metrics.dead_letters += 1
        self._reject(f"node {node}", kind, f"seq {seq} (acknowledged, kept as a dead letter): "
                     f"{detail}")

    def _node_key(self, kid: bytes) -> protocol.NodeKey | None:
        nk = self._node_keys.get(kid)
        if nk is None:
            key = self.keys.get(kid)
            if key is None:
                return None
            nk = self._node_keys[kid] = protocol.NodeKey(key, kid)
        return nk

    def _reject(self, source: str, kind: str, detail: str) -> None:
        self.metrics.frames_rejected[kind] += 1
        if (source, kind) not in self._logged:
            self._logged.add((source, kind))
            log.warning("%s: rejected frame (%s): %s; further ones are only counted",
                        source, kind, detail)

    def on_data(self, link: Link, data: bytes) -> None:
        """Feed bytes from a link; called on the event loop, never blocks."""
        deframer = self._deframers.setdefault(link.name, protocol.Deframer())
        for chunk in deframer.feed(data):
            if chunk is None:
                self._reject(link.name, "oversize", "no delimiter within the frame limit")
                continue
            try:
                self._on_chunk(link, chunk)
            except FrameError as e:  # AuthError included
                self._reject(link.name, e.kind, str(e))
            except Exception as e:
                self._internal(link.name, e)

    def _internal(self, source: str, e: Exception) -> None:
        """A frame we failed on (a bug of ours, not the peer's fault): count it, log its
        traceback once, and go on with the next one; the frames around it are not lost."""
        self.metrics.frames_rejected["internal"] += 1
        if (source, "internal") not in self._logged:
            self._logged.add((source, "internal"))
            log.error("%s: a frame could not be handled (%r); it is not acknowledged, so the "
                      "node sends it again. This is a bug: please report it with this traceback",
                      source, e, exc_info=e)

    def on_frame(self, link: Link, ftype: int, body: bytes) -> None:
        """Feed one frame (type, body) from a link that frames by itself (BLE: no COBS/CRC)."""
        try:
            self._on_frame(link, ftype, body)
        except FrameError as e:  # AuthError included
            self._reject(link.name, e.kind, str(e))
        except Exception as e:
            self._internal(link.name, e)

    def _on_chunk(self, link: Link, chunk: bytes) -> None:
        ftype, body = protocol.decode_frame(chunk)
        self._on_frame(link, ftype, body)

    def _on_frame(self, link: Link, ftype: int, body: bytes) -> None:
        if ftype != protocol.DATA:
            raise FrameError("unexpected", f"frame type 0x{ftype:02x} from a node")
        m = protocol.parse_mac0(body)
        nk = self._node_key(m.kid)
        if nk is None:
            raise AuthError("unknown_node", f"no key for node {m.kid.decode('utf-8', 'replace')!r}")
        nk.verify(m)
        node = nk.node
        seq = m.seq
        metrics = self.metrics
        metrics.frames_received[node] += 1
        if (node, seq) in self._pending_ids:
            metrics.duplicates[node] += 1
            return  # its ACK goes out with the commit already under way
        window = self.windows.get(node)
        if window is None or window.key != nk.key_id:
            window = self._window(node, nk)
        seen = window.seen(seq)
        if seen is None:
            raise FrameError("replay", f"{link.name} node {node}: seq {seq} is older than the "
                             "replay window")
        if seen:
            # Committed before and the node did not hear our ACK: acknowledge again.
            metrics.duplicates[node] += 1
            self._ack(link, node, [seq])
            return
        if self._held or self.store.cap.paused:
            self._hold(f"{link.name} node {node}", node, seq)
        try:
            n = protocol.pack_size(m.payload)
        except FrameError as e:
            # Authentic but unusable: keep it as a dead letter and acknowledge it, or the
            # node would resend it forever and block its outbox.
            self._reject(f"{link.name} node {node}", e.kind, str(e))
            self.metrics.dead_letters += 1
            acc = Accepted(node, seq, body, None, str(e))  # "kind: detail"
        else:
            acc = Accepted(node, seq, body, None, pack=m.payload, n=n)
        # only a frame taken (authentic and new) says the node is alive: a replayed or
        # repeated one could be anybody's recording (docs/gateway.md, "last seen")
        metrics.seen(node, link.name, seq)
        self._pending.append((link, acc))
        self._pending_ids.add((node, seq))
        self._wake.set()
        if len(self._pending) + self._committing >= INTAKE_HIGH:
            self.intake.clear()

    def _hold(self, source: str, node: str, seq: int) -> None:
        """Refuse new frames while the queue is at its cap (policy pause_intake).

        Not acknowledged, the node keeps them and resends. Once refused, a frame must come
        back before anything newer from its node is taken (for HOLD_MAX_S at most), so the
        node's readings still reach the queue, and upstream, in order.
        """
        held, since = self._held.get(node, (set(), 0.0))
        if self.store.cap.paused:
            held.add(seq)
            self._held[node] = (held, time.monotonic())
            raise FrameError("queue_full", f"{source}: seq {seq} not taken, the queue is at its "
                             "disk cap (policy pause_intake)")
        if not held:
            return
        if time.monotonic() - since > HOLD_MAX_S:
            del self._held[node]  # never came back (the node gave them up): stop waiting
            return
        older = min(held)
        if older < seq:
            held.add(seq)  # (waiting for order does not extend the wait)
            raise FrameError("queue_full", f"{source}: seq {seq} waits for seq {older}, "
                             "refused while the queue was full, to keep readings in order")
        held.discard(seq)
        self._held[node] = (held, time.monotonic())  # progress: the wait starts again
        if not held:
            del self._held[node]

    def _ack(self, link: Link, node: str, seqs: list[int]) -> None:
        nk = self._node_key(node.encode())
        assert nk is not None  # only frames verified with its key are acknowledged
        now_ms = time.time_ns() // 1_000_000
        for i in range(0, len(seqs), MAX_SEQS_PER_ACK):
            link.send(nk.ack(seqs[i:i + MAX_SEQS_PER_ACK], now_ms))
            self.metrics.acks_sent += 1

    async def run(self) -> None:
        """Group-commit whatever is pending, then acknowledge it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            self._committing = len(batch)
            windows = {n: Window(w.high, w.bits, w.key) for n, w in self.windows.items()}
            for _, acc in batch:
                windows.setdefault(acc.node, Window()).mark(acc.seq)
            try:
                await self.store.commit([acc for _, acc in batch], windows)
            except Exception as e:
                self._committing = 0
                self._open_intake()
                self.metrics.store_errors += 1
                if self._store_failing == 0:
                    log.error("store %s: commit failed (%s); frames are not acknowledged, so the "
                              "nodes keep them and resend; check free space and that the state "
                              "directory is writable (retrying every second)",
                              self.store.path, e)
                self._store_failing += 1
                for _, acc in batch:
                    self._pending_ids.discard((acc.node, acc.seq))
                await asyncio.sleep(1.0)
                continue
            self._committing = 0
            self._open_intake()
            self.metrics.commits += 1
            self.metrics.evictions = self.store.cap.evicted
            if self._store_failing:
                log.warning("store %s: commits work again after %d failed attempts",
                            self.store.path, self._store_failing)
                self._store_failing = 0
            self.windows.update(windows)
            by_link: dict[int, Link] = {}
            grouped: defaultdict[tuple[int, str], list[int]] = defaultdict(list)
            for link, acc in batch:
                self._pending_ids.discard((acc.node, acc.seq))
                self.metrics.readings_stored += acc.readings
                by_link[id(link)] = link
                grouped[(id(link), acc.node)].append(acc.seq)
            for (lid, node), seqs in grouped.items():
                self._ack(by_link[lid], node, seqs)
            self.committed.set()
            for ev in self.listeners:
                ev.set()

    def _open_intake(self) -> None:
        if not self.intake.is_set() and len(self._pending) < INTAKE_LOW:
            self.intake.set()
