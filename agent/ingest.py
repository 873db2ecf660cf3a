"""From link bytes to committed, acknowledged frames.

chunk → frame (COBS, CRC) → COSE_Mac0 (known node, MAC) → replay window (the node key's) →
the pack's CBOR checked, its array head read → group commit to SQLite → ACK. A frame is
acknowledged only after the transaction holding it commits; anything malformed or forged is
counted by kind and logged once per source, and a frame we fail on ourselves (`internal`)
never costs the frames around it. The pack is resolved into SenML in the forward stage
(agent/queue/), off this path: one that does not resolve then becomes a dead letter,
counted and logged here too.
Ingest is the queue's one writer: readings the gateway makes itself (third-party BTHome
adverts, `take`) are committed by the same group commit, under the same pause-intake.
While too many frames wait for a commit, `intake` is cleared and links stop reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Protocol

from . import protocol
from .errors import AuthError, FrameError
from .metrics import Metrics
from .queue.store import WINDOW, Accepted, Store, Window
from .timesync import TimeSync

log = logging.getLogger("lantern.ingest")

MAX_SEQS_PER_ACK = 32
# Frames waiting for a commit (queued and in the running one) at which links stop reading,
# and below which they read again: a burst is bounded in memory, and the line pushes back.
INTAKE_HIGH = 1024
INTAKE_LOW = 256
# How long frames wait behind an older one refused at the disk cap: a node resends within
# 30 s (its longest backoff) plus jitter; one that never does (evicted it) must not block.
HOLD_MAX_S = 75.0
# Refused sequences remembered per node, from its oldest refused one up: a node's frames in
# flight never span the replay window (docs/protocol.md), so a bitmap of that size holds
# every one an honest node can have out at once.
HOLD_SPAN = WINDOW
_HOLD_MASK = (1 << HOLD_SPAN) - 1
# Group commit over a bounded window (issue 22, SD-card wear; [queue] commit_window_ms): the
# first frame waiting for a commit holds it open up to the window, so one fsync (and the pages
# it writes) carries every frame that came meanwhile. Nodes keep their frames until the ACK
# and resend on their own timer: a later ACK costs latency and repeats on the link, never
# data. An ACK still goes only after its frames are on disk. The window closes early when
# COMMIT_FRAMES wait, or when a frame comes from a node whose previous frame came less than a
# window ago: that node is draining a backlog or samples fast, and waiting would cost it the
# whole window per send window (4 frames on UART) — a backlog would drain at a few frames per
# window, and a fast node's readings would reach upstream a window later. So the window only
# holds frames of slow nodes (a street's: one a minute), where it saves the most. It never
# holds a frame whose node waits awake for the ACK (`on_frame(..., awake=True)`: a BLE
# session, where a battery node keeps its radio on until the ACK and its wake time is its
# power): such a frame commits at once, with whatever else waits. 0: commit at once (the
# frames that came during the previous commit share the next one). This default is for an
# Ingest made without configuration (tests, tools); the gateway sets `commit_window_s`
# ([queue] commit_window_ms).
COMMIT_WINDOW_S = 0.0
COMMIT_FRAMES = 256
# Sources logged per kind of rejection; after them, only counted. A BLE session's name holds
# the peer's address, which a stranger picks at will: what is remembered stays bounded.
LOG_SOURCES = 32


class Link(Protocol):
    name: str

    def send(self, data: bytes) -> None: ...


class Maker:
    """Where readings the gateway makes itself come from (third-party BTHome adverts).

    Queued like a node's frames, but nobody is acknowledged: the maker is told which were
    stored, and which a failed commit lost (adverts repeat; nothing is sent again).
    """

    name: str

    def stored(self, frames: list[Accepted]) -> None:
        """These were committed."""

    def lost(self, frames: list[Accepted], e: BaseException) -> None:
        """These were not: their commit failed."""


Source = Link | Maker  # what a pending frame came from


class Ingest:
    def __init__(self, store: Store, keys: dict[bytes, bytes], metrics: Metrics) -> None:
        self.store = store
        self.keys = keys
        self.metrics = metrics
        self.windows: dict[str, Window] = {}  # node → the window of its key in use
        # the windows of a node's other keys (one per key it had: few, an operator's doing)
        self._stored: dict[tuple[str, bytes], Window] = {}
        self._pending: list[tuple[Source, Accepted]] = []
        # (node, seq) → the key its frame verified under (protocol.key_id; a maker's: the
        # key of the node's window, b"" for none): the commit marks that key's window
        self._pending_ids: dict[tuple[str, int], bytes] = {}
        self._wake = asyncio.Event()
        self._full = asyncio.Event()  # the window closes early (COMMIT_FRAMES, a fast node)
        self._taken_at: dict[str, float] = {}  # node → when its last frame was taken
        # the group-commit window in seconds ([queue] commit_window_ms); None: COMMIT_WINDOW_S
        self.commit_window_s: float | None = None
        self._since = 0.0  # when the oldest frame waiting for a commit came (monotonic)
        self._deframers: dict[str, protocol.Deframer] = {}
        self._logged: dict[str, set[str]] = {}  # kind → sources logged (≤ LOG_SOURCES + 1)
        self.committed = asyncio.Event()  # set after each commit, for the forwarder
        self._store_failing = 0  # commits failed in a row (disk full, read-only): logged once
        self._held: dict[str, tuple[int, float]] = {}  # node → (oldest refused seq, when)
        self._refused: dict[str, int] = {}  # node → bit i: oldest + i refused, not back yet
        self.listeners: list[asyncio.Event] = []  # one per forwarder: each clears its own
        self._node_keys: dict[bytes, protocol.NodeKey] = {}
        # the fleet registry's verdict on a node id, asked on every frame so that a
        # revocation applies at once ("revoked", "retired" or None: agent/registry.py)
        self.refused: Callable[[bytes], str | None] = lambda kid: None
        # a rotating node's other key (its next one, or the old one below the first sequence
        # the new key seals): the fleet's live operations set it (agent/fleetops.py)
        self.other_key: Callable[[protocol.Mac0], protocol.NodeKey | None] = lambda m: None
        self._committing = 0  # frames in the commit under way
        self.intake = asyncio.Event()  # set: links may read; cleared at INTAKE_HIGH
        self.intake.set()
        # the gateway's clock (agent/timesync.py): ACKs carry the time only while it is
        # synchronised; None: always (tests, tools)
        self.clock: TimeSync | None = None

    async def start(self) -> None:
        stored = await self.store.key_windows()
        self.store.on_dead_letter = self._dead_letter
        self._stored = {}
        for (node, key), w in stored.items():
            if self._node_key(node.encode()) is not None:
                self._stored[(node, key)] = w
            elif not key:  # a third-party sensor's (take): kept under no key
                self.windows[node] = w
        adopt = {}
        for node in sorted({node for node, _ in self._stored}):
            nk = self._node_key(node.encode())
            assert nk is not None
            legacy = self._stored.pop((node, b""), None)
            if legacy is not None and (node, nk.key_id) not in self._stored:
                # kept before windows had a key (layout 2): it is the key's configured now
                legacy.key = adopt[node] = nk.key_id
                self._stored[(node, nk.key_id)] = legacy
            self._window(node, nk)
        if adopt:
            await self.store.adopt_keys(adopt)

    def _window(self, node: str, nk: protocol.NodeKey) -> Window:
        """The node's replay window under its configured key: a key seen before gets its own
        window back, a new key a new one.

        A node provisioned again (a wiped node gets a new key) counts on from a new start; its
        frames could be refused as replays of the old key's. The old key's window is kept,
        not dropped: if that key is ever configured again (a keys file restored from a
        backup, a retired line brought back), its recorded frames are still replays.
        """
        w = self.windows.get(node)
        if w is not None and w.key == nk.key_id:
            return w
        if w is not None:  # (keys are read at start only: not reached in the gateway)
            self._stored[(node, w.key)] = w
        own = self._stored.pop((node, nk.key_id), None)
        others = [o for (n, _), o in self._stored.items() if n == node]
        if own is not None:
            if any(o.high > own.high for o in others):
                log.info("node %s: key %s is back; its own replay window is kept (nothing up "
                         "to seq %d is taken again)", node, nk.key_id.hex(), own.high)
            self.windows[node] = own
            return own
        if others:
            self.metrics.window_restarts += 1
            log.info("node %s: key changed, replay window restarted", node)
        w = self.windows[node] = Window(key=nk.key_id)
        return w

    def _other_window(self, node: str, key: bytes) -> Window:
        """The node's replay window under `key`, which need not be its configured one (a
        rotating node's old or next key): found or made, never made the node's current."""
        w = self._key_window(node, key)
        if w is None:
            w = self._stored[(node, key)] = Window(key=key)
        return w

    def _key_window(self, node: str, key: bytes) -> Window | None:
        """The node's replay window under `key`, current or kept, if it has one."""
        w = self.windows.get(node)
        if w is not None and w.key == key:
            return w
        return self._stored.get((node, key))

    def _set_window(self, node: str, w: Window) -> None:
        """Put a committed copy of the window of `w.key` where that key's window lives: the
        node's current one if it is that key's (or it has none), else the kept ones."""
        cur = self.windows.get(node)
        if cur is None or cur.key == w.key:
            self.windows[node] = w
        else:
            self._stored[(node, w.key)] = w

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

    def _first(self, source: str, kind: str) -> str | None:
        """How a log line about (source, kind) ends, if it is the first: None if not, or if
        LOG_SOURCES sources were logged for that kind already (only counted from then on)."""
        logged = self._logged.setdefault(kind, set())
        if source in logged or len(logged) > LOG_SOURCES:
            return None
        logged.add(source)
        if len(logged) > LOG_SOURCES:
            return ("further ones, from any source, are only counted "
                    "(lantern_frames_rejected_total)")
        return "further ones are only counted"

    def _reject(self, source: str, kind: str, detail: str) -> None:
        self.metrics.frames_rejected[kind] += 1
        end = self._first(source, kind)
        if end is not None:
            log.warning("%s: rejected frame (%s): %s; %s", source, kind, detail, end)

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
        if self._first(source, "internal") is not None:
            log.error("%s: a frame could not be handled (%r); it is not acknowledged, so the "
                      "node sends it again. This is a bug: please report it with this traceback",
                      source, e, exc_info=e)

    def on_frame(self, link: Link, ftype: int, body: bytes, *, awake: bool = False
                 ) -> str | None:
        """Feed one frame (type, body) from a link that frames by itself (BLE: no COBS/CRC).

        awake: the node waits for the ACK with its radio on (a BLE session), so the frame is
        committed at once rather than held for the group-commit window.
        The node whose pack was taken (authentic, new, a pack: on its way to a commit), or
        None (refused, a duplicate, a dead letter): only the former proves who sent it.
        """
        try:
            return self._on_frame(link, ftype, body, awake)
        except FrameError as e:  # AuthError included
            self._reject(link.name, e.kind, str(e))
        except Exception as e:
            self._internal(link.name, e)
        return None

    def _on_chunk(self, link: Link, chunk: bytes) -> None:
        ftype, body = protocol.decode_frame(chunk)
        self._on_frame(link, ftype, body)

    def _on_frame(self, link: Link, ftype: int, body: bytes, awake: bool = False
                  ) -> str | None:
        if ftype != protocol.DATA:
            raise FrameError("unexpected", f"frame type 0x{ftype:02x} from a node")
        m = protocol.parse_mac0(body)
        if (why := self.refused(m.kid)) is not None:
            raise AuthError(why, f"node {m.kid.decode('utf-8', 'replace')!r}: {why} in the "
                            "fleet registry")
        nk = self._node_key(m.kid)
        if nk is None:
            raise AuthError("unknown_node", f"no key for node {m.kid.decode('utf-8', 'replace')!r}")
        configured = nk
        try:
            nk.verify(m)
        except AuthError:
            if (other := self.other_key(m)) is None:
                raise
            other.verify(m)
            nk = other
        node = nk.node
        if m.payload[:1] and m.payload[0] >> 5 == 5:
            # A map where a pack (an array) belongs: the shape of the gateway's own ACKs, which
            # carry the same MAC under the node key, played back as DATA (docs/security.md,
            # radio attacker). Not the node's: never kept, acknowledged or marked as seen.
            raise FrameError("reflected", f"{link.name} node {node}: seq {m.seq} holds a map, "
                             "not a pack (one of the gateway's ACKs played back?)")
        seq = m.seq
        metrics = self.metrics
        metrics.frames_received[node] += 1
        if (node, seq) in self._pending_ids:
            metrics.duplicates[node] += 1
            return None  # its ACK goes out with the commit already under way
        window = self.windows.get(node)
        if window is None or window.key != nk.key_id:
            if nk is configured:
                window = self._window(node, nk)
            else:
                # the rotating node's other key (agent/fleetops.py): its frames are checked
                # against, and marked in, that key's own window; the node's current window
                # stays (a replayed old frame must not make the old key's current)
                window = self._other_window(node, nk.key_id)
        seen = window.seen(seq)
        if seen is None:
            raise FrameError("replay", f"{link.name} node {node}: seq {seq} is older than the "
                             "replay window")
        if seen:
            # Committed before and the node did not hear our ACK: acknowledge again.
            metrics.duplicates[node] += 1
            self._ack(link, node, [seq])
            return None
        if self._held or self.store.cap.paused:
            self._hold(f"{link.name} node {node}", node, seq)
        try:
            n = protocol.pack_size(m.payload)
        except FrameError as e:
            # Authentic but unusable: keep it as a dead letter and acknowledge it, or the
            # node would resend it forever and block its outbox. Counted once committed
            # (run): a commit that fails (disk full) brings it back, and it is one frame.
            acc = Accepted(node, seq, body, None, str(e))  # "kind: detail"
        else:
            acc = Accepted(node, seq, body, None, pack=m.payload, n=n)
        # only a frame taken (authentic and new) says the node is alive: a replayed or
        # repeated one could be anybody's recording (docs/gateway.md, "last seen")
        metrics.seen(node, link.name, seq)
        self._queue(link, acc, awake, nk.key_id)
        if len(self._pending) + self._committing >= INTAKE_HIGH:
            self.intake.clear()
        return node if acc.pack is not None else None

    def take(self, maker: Maker, acc: Accepted) -> None:
        """Queue readings the gateway made (`acc.records`) with the next group commit.

        FrameError queue_full while the queue is at its disk cap (policy pause_intake): not
        taken, as a node's frame is not. Nothing waits for order here: an advert is not sent
        again, and the sequence is the maker's to check against `windows` (its own pending
        ones included).
        """
        if self.store.cap.paused:
            raise FrameError("queue_full", f"{acc.node}: seq {acc.seq} not taken, the queue is "
                             "at its disk cap (policy pause_intake)")
        self._queue(maker, acc)
        if len(self._pending) + self._committing >= INTAKE_HIGH:
            self.intake.clear()

    def _queue(self, source: Source, acc: Accepted, awake: bool = False,
               key: bytes | None = None) -> None:
        """A frame for the next group commit (at once if its node waits awake for it), to be
        marked in the window of `key` (None: the node's current window's)."""
        now = time.monotonic()
        if not self._pending:
            self._since = now
        self._pending.append((source, acc))
        if key is None:
            w = self.windows.get(acc.node)
            key = b"" if w is None else w.key
        self._pending_ids[(acc.node, acc.seq)] = key
        self._wake.set()
        last = self._taken_at.get(acc.node)
        self._taken_at[acc.node] = now
        if awake or len(self._pending) >= COMMIT_FRAMES or (last is not None
                                                            and now - last < self.window_s):
            self._full.set()  # full, a node that is not slow or awake for it: commit now

    @property
    def window_s(self) -> float:
        """The group-commit window in use, in seconds."""
        return COMMIT_WINDOW_S if self.commit_window_s is None else self.commit_window_s

    async def _hold_open(self, window: float) -> None:
        """Hold the commit open until `window` after its oldest frame came, unless it is full
        or a node is not slow (the frames' ACKs are that much later; nothing else waits)."""
        left = self._since + window - time.monotonic()
        if left <= 0 or self._full.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._full.wait(), left)

    def _hold(self, source: str, node: str, seq: int) -> None:
        """Refuse new frames while the queue is at its cap (policy pause_intake).

        Not acknowledged, the node keeps them and resends. Once refused, a frame must come
        back before anything newer from its node is taken (for HOLD_MAX_S at most), so the
        node's readings still reach the queue, and upstream, in order. A node resends each
        frame on its own timer, so they come back in any order: every refused sequence is
        remembered until it is back — as a bitmap from the oldest one up (HOLD_SPAN), so a
        node refused for hours costs two integers, not one entry per frame. One further up
        (only a node breaking the in-flight rule sends it) waits until the rest are back.
        """
        now = time.monotonic()
        if self.store.cap.paused:
            self._refuse(node, seq, now)
            raise FrameError("queue_full", f"{source}: seq {seq} not taken, the queue is at its "
                             "disk cap (policy pause_intake)")
        held = self._held.get(node)
        if held is None:
            return
        oldest, since = held
        if now - since > HOLD_MAX_S:
            self._release(node)  # never came back (the node gave them up): stop waiting
            return
        if oldest < seq:
            self._refuse(node, seq, since)  # (waiting for order does not extend the wait)
            raise FrameError("queue_full", f"{source}: seq {seq} waits for seq {oldest}, "
                             "refused while the queue was full, to keep readings in order")
        if oldest == seq:  # back: next, the oldest of those still out
            bits = self._refused[node] >> 1
            if not bits:
                self._release(node)
                return
            skip = (bits & -bits).bit_length() - 1
            self._refused[node] = bits >> skip
            oldest += 1 + skip
        self._held[node] = (oldest, now)  # progress: the wait starts again

    def _refuse(self, node: str, seq: int, since: float) -> None:
        """Remember seq as refused: it must come back before anything newer is taken."""
        held = self._held.get(node)
        if held is None:
            oldest, bits = seq, 1
        else:
            oldest, bits = held[0], self._refused[node]
            if seq < oldest:
                oldest, bits = seq, (bits << (oldest - seq) | 1) & _HOLD_MASK
            elif seq - oldest < HOLD_SPAN:
                bits |= 1 << (seq - oldest)
        self._held[node] = (oldest, since)
        self._refused[node] = bits

    def _release(self, node: str) -> None:
        del self._held[node]
        del self._refused[node]

    def forget(self, kid: bytes) -> None:
        """Read the node's key again at its next frame (replaced while running)."""
        self._node_keys.pop(kid, None)

    def _ack(self, link: Link, node: str, seqs: list[int]) -> None:
        nk = self._node_key(node.encode())
        if nk is None:  # revoked or re-keyed since its frames were verified: no ACK
            return
        now_ms = time.time_ns() // 1_000_000
        for i in range(0, len(seqs), MAX_SEQS_PER_ACK):
            part = seqs[i:i + MAX_SEQS_PER_ACK]
            link.send(nk.ack(part, now_ms) if self.clock is None else self.clock.ack(nk, part))
            self.metrics.acks_sent += 1

    async def run(self) -> None:
        """Group-commit whatever is pending, then acknowledge it."""
        while True:
            await self._wake.wait()
            window = self.window_s
            if window > 0:
                await self._hold_open(window)
            self._wake.clear()
            self._full.clear()
            batch, self._pending = self._pending, []
            self._committing = len(batch)
            try:
                done = await self._commit(batch)
            except Exception as e:
                self._committing = 0
                self._open_intake()
                if isinstance(e, sqlite3.Error):
                    self._store_failed(e)
                else:  # (_commit handles what the store raises: this is a bug of ours)
                    self._internal(f"store {self.store.path}", e)
                self._give_back(batch, e)
                await asyncio.sleep(1.0)
                continue
            self._committing = 0
            self._open_intake()
            self.metrics.commits += 1
            self.metrics.evictions = self.store.cap.evicted
            self.metrics.dead_letters_dropped = self.store.cap.dead_dropped
            if self._store_failing:
                log.warning("store %s: commits work again after %d failed attempts",
                            self.store.path, self._store_failing)
                self._store_failing = 0
                self.metrics.commit_error = None
            by_link: dict[int, Link] = {}
            grouped: defaultdict[tuple[int, str], list[int]] = defaultdict(list)
            for _, acc in batch:
                self._pending_ids.pop((acc.node, acc.seq), None)
            made: list[tuple[Maker, Accepted]] = []
            for link, acc in done:
                self.metrics.readings_stored += acc.readings
                if isinstance(link, Maker):
                    made.append((link, acc))
                    continue
                if acc.pack is None and acc.records is None:
                    # counted here, once committed: a failed commit brings the frame back
                    self.metrics.dead_letters += 1
                    kind = acc.reason.partition(":")[0]
                    self._reject(f"{link.name} node {acc.node}", kind,
                                 f"seq {acc.seq} (acknowledged, kept as a dead letter): "
                                 f"{acc.reason}")
                by_link[id(link)] = link
                grouped[(id(link), acc.node)].append(acc.seq)
            for (lid, node), seqs in grouped.items():
                self._ack(by_link[lid], node, seqs)
            self._tell(made)
            self.committed.set()
            for ev in self.listeners:
                ev.set()

    async def _commit(self, batch: list[tuple[Source, Accepted]]
                      ) -> list[tuple[Source, Accepted]]:
        """Commit a group of frames with their nodes' windows; the frames committed.

        Each frame is marked in the window of the key it verified under. A store commit
        carries one window per node, so the frames of a node under a second key (a rotating
        node's old or next one, in the same group as its current key's: seldom) go in a
        further commit right after.
        sqlite3.Error (disk full, read-only, I/O): none was (or, in a further commit, those of
        the commits before are acknowledged and the rest given back), and the nodes resend
        them. Any other error is ours, tied to some frame (a bug): the frames are then
        committed one by one, so one frame the gateway fails on never costs the others their
        ACK.
        """
        # only the windows this commit moves are copied (a street's commit holds a few of its
        # nodes; copying every window made it O(nodes) per frame)
        rounds: list[tuple[list[tuple[Source, Accepted]], dict[str, Window]]] = []
        for item in batch:
            acc = item[1]
            key = self._key_of(acc)
            # the first commit without a window of this node under another key
            part, windows = next(((p, ws) for p, ws in rounds
                                  if (o := ws.get(acc.node)) is None or o.key == key),
                                 ([], {}))
            if not part:
                rounds.append((part, windows))
            w = windows.get(acc.node)
            if w is None:
                old = self._key_window(acc.node, key)
                w = windows[acc.node] = (Window(key=key) if old is None
                                         else Window(old.high, old.bits, old.key))
            w.mark(acc.seq)
            part.append(item)
        done: list[tuple[Source, Accepted]] = []
        for i, (part, windows) in enumerate(rounds):
            try:
                await self.store.commit([acc for _, acc in part], windows)
            except sqlite3.Error as e:
                if not done:
                    raise
                # the disk now: those committed are acknowledged, the rest come back
                self.metrics.store_errors += 1
                self._give_back([item for p, _ in rounds[i:] for item in p], e)
                return done
            except Exception as e:
                source = f"store {self.store.path}"
                if self._first(source, "internal") is not None:
                    log.error("%s: a group commit of %d frames failed on something other than "
                              "the disk (%r); committing them one by one, so only a frame that "
                              "fails alone is refused. This is a bug: please report it with "
                              "this traceback", source, len(part), e, exc_info=e)
                return await self._one_by_one([item for p, _ in rounds[i:] for item in p],
                                              done)
            for node, w in windows.items():
                self._set_window(node, w)
            done += part
        return done

    def _key_of(self, acc: Accepted) -> bytes:
        """The key whose window a pending frame is marked in."""
        key = self._pending_ids.get((acc.node, acc.seq))
        if key is None:  # (not pending: only a bug of ours) the node's current window's
            w = self.windows.get(acc.node)
            key = b"" if w is None else w.key
        return key

    async def _one_by_one(self, batch: list[tuple[Source, Accepted]],
                          done: list[tuple[Source, Accepted]]
                          ) -> list[tuple[Source, Accepted]]:
        """Commit each frame alone; `done`: those committed before, extended and returned."""
        for i, (link, acc) in enumerate(batch):
            key = self._key_of(acc)
            w = self._key_window(acc.node, key) or Window(key=key)
            trial = Window(w.high, w.bits, w.key)
            trial.mark(acc.seq)
            try:
                await self.store.commit([acc], {acc.node: trial})
            except sqlite3.Error as e:
                if not done:
                    raise
                # the disk now: those committed are acknowledged, the rest come back
                self.metrics.store_errors += 1
                self._give_back(batch[i:], e)
                break
            except Exception as e:
                self._internal(f"{link.name} node {acc.node}", e)  # counted, not acknowledged
                if isinstance(link, Maker):
                    self._tell([(link, acc)], e)
                continue
            self._set_window(acc.node, trial)
            done.append((link, acc))
        return done

    def _give_back(self, batch: list[tuple[Source, Accepted]], e: BaseException) -> None:
        """Frames whose commit failed are not acknowledged: their nodes send them again. Until
        they are back, nothing newer from those nodes is taken — and what was taken meanwhile
        is given back too (not acknowledged either), or it would reach the queue first.
        Readings the gateway made are lost (their maker is told): nothing sends them again."""
        made = [(src, acc) for src, acc in batch if isinstance(src, Maker)]
        if made:
            batch = [(src, acc) for src, acc in batch if not isinstance(src, Maker)]
            for _, acc in made:
                self._pending_ids.pop((acc.node, acc.seq), None)
            self._tell(made, e)
        nodes = {acc.node for _, acc in batch}
        later = [(link, acc) for link, acc in self._pending if acc.node in nodes]
        if later:
            self._pending = [(link, acc) for link, acc in self._pending
                             if acc.node not in nodes]
        now = time.monotonic()
        for _, acc in [*batch, *later]:
            self._pending_ids.pop((acc.node, acc.seq), None)
            self._refuse(acc.node, acc.seq, now)

    @staticmethod
    def _tell(made: list[tuple[Maker, Accepted]], e: BaseException | None = None) -> None:
        """Tell each maker which of its readings were stored (e None) or lost."""
        by_maker: dict[int, tuple[Maker, list[Accepted]]] = {}
        for src, acc in made:
            by_maker.setdefault(id(src), (src, []))[1].append(acc)
        for maker, frames in by_maker.values():
            if e is None:
                maker.stored(frames)
            else:
                maker.lost(frames, e)

    def _store_failed(self, e: sqlite3.Error) -> None:
        self.metrics.store_errors += 1
        self.metrics.commit_error = str(e)
        if self._store_failing == 0:
            log.error("store %s: commit failed (%s); frames are not acknowledged, so the "
                      "nodes keep them and resend; check free space and that the state "
                      "directory is writable (retrying every second)", self.store.path, e)
        self._store_failing += 1

    def _open_intake(self) -> None:
        if not self.intake.is_set() and len(self._pending) < INTAKE_LOW:
            self.intake.set()
