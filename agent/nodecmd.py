"""The gateway's command channel to its nodes: COMMAND out, REPLY / STATUS back, per link.

docs/protocol.md ("Diagnostics") is the wire format; the technician's tool
(tools/field/nodelink.py) speaks it with the same functions, defined here once. A link
(serial, or a BLE connection) owns one `Channel`: the link hands it every REPLY and STATUS
it reads, the channel hands the link sealed COMMAND bodies to send *behind* ACKs.

Counters: a node obeys a COMMAND only if its counter is above every one it obeyed before.
The gateway takes max(now in Unix ms, last + 1), as the tool does, so the two never trip
each other for long, and persists a high-water mark per node (`Counters`) before it uses a
counter, so a restarted gateway never sends one the node has seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2

from . import protocol
from .errors import FrameError, LanternError

log = logging.getLogger("lantern.nodecmd")

PROTOCOL = 1
OP_STATUS, OP_SELF_TEST, OP_SET_INTERVAL, OP_SYNC_TIME = 1, 2, 3, 4
OP_REBOOT, OP_CLEAR_FAULTS, OP_IDENTIFY, OP_LATEST = 5, 6, 7, 8
OP_UPDATE_OFFER, OP_UPDATE_CHUNK, OP_UPDATE_APPLY, OP_UPDATE_ABORT = 9, 10, 11, 12
OP_REKEY, OP_REKEY_COMMIT, OP_CONFIG = 14, 15, 16  # docs/fleet.md (agent/fleetops.py)
OK, E_OP, E_ARG, E_FAIL, E_BIG, E_REFUSED = 0, 1, 2, 3, 4, 5
CODES = {OK: "ok", E_OP: "unknown operation", E_ARG: "bad argument", E_FAIL: "the action failed",
         E_BIG: "answer too large for one frame", E_REFUSED: "refused"}
REASONS = {0: "probe", 1: "malformed command", 2: "bad MAC: the key does not match this node",
           3: "replayed command counter"}
R_PROBE, R_MALFORMED, R_BAD_MAC, R_REPLAY = 0, 1, 2, 3
ALG = 4  # HMAC 256/64
TAG_LEN = 8
MAX_OUTSTANDING = 4  # commands in flight per node (docs: the node answers them in order)
RESERVE = 1000  # counters persisted ahead of use: one write per second of commands at most
COUNTER_FILE = "cmd_counters.json"


# ---------------------------------------------------------------- wire (shared with nodelink)


def aad(ftype: int) -> bytes:
    return bytes((ftype,))


def seal(key: bytes, kid: bytes, counter: int, payload: bytes, ftype: int) -> bytes:
    """COSE_Mac0 with external AAD = the frame type byte (a COMMAND, REPLY or STATUS body)."""
    pbstr = cbor2.dumps({1: ALG, 4: kid, 6: protocol.piv(counter)}, canonical=True)
    structure = cbor2.dumps(["MAC0", pbstr, aad(ftype), payload])
    tag = hmac.new(key, structure, hashlib.sha256).digest()[:TAG_LEN]
    return bytes(cbor2.dumps(cbor2.CBORTag(17, [pbstr, {}, payload, tag])))


def unseal(key: bytes | None, body: bytes, ftype: int) -> tuple[str, int, Any]:
    """(node id, counter, decoded payload); with key None nothing is verified."""
    m = protocol.parse_mac0(body)
    if m.protected.get(1) != ALG or len(m.tag) != TAG_LEN:
        raise FrameError("cose", "diagnostic frames use HMAC 256/64 only")
    if key is not None:
        structure = cbor2.dumps(["MAC0", m.protected_bytes, aad(ftype), m.payload])
        want = hmac.new(key, structure, hashlib.sha256).digest()[:TAG_LEN]
        if not hmac.compare_digest(want, m.tag):
            raise FrameError("mac", "bad tag")
    return m.kid.decode("utf-8", "replace"), m.seq, protocol._loads(m.payload)


def command_body(key: bytes, node_id: str, counter: int, op: int,
                 args: dict[int, Any] | None = None) -> bytes:
    payload = cbor2.dumps({1: op, 2: args or {}}, canonical=True)
    return seal(key, node_id.encode(), counter, payload, protocol.COMMAND)


def command_frame(key: bytes, node_id: str, counter: int, op: int,
                  args: dict[int, Any] | None = None) -> bytes:
    return protocol.encode_frame(protocol.COMMAND, command_body(key, node_id, counter, op, args))


@dataclass(frozen=True)
class Identity:
    """What a node's STATUS says about it (verified only when we hold its key)."""

    node_id: str
    firmware: str
    board: str
    floor: int
    reason: int
    protocol: int
    verified: bool
    upd: dict[str, Any] | None = None  # the update state, from nodes that report it
    # from a full STATUS (docs/fleet.md): None where the node did not say
    config_version: int | None = None
    key_version: int | None = None
    held: int | None = None  # samples held unsealed, waiting for the time


def parse_status(body: bytes, key: bytes | None) -> Identity:
    node, floor, p = unseal(None, body, protocol.STATUS)
    verified = False
    if key is not None:
        unseal(key, body, protocol.STATUS)  # raises FrameError("mac") on the wrong key
        verified = True
    if not isinstance(p, dict):
        raise FrameError("cbor", "STATUS payload is not a map")
    reason, proto = p.get(5, 0), p.get(6, 0)
    if type(reason) is not int or type(proto) is not int:  # before any MAC: anyone can send it
        raise FrameError("cbor", "STATUS reason and protocol must be integers")
    upd = p.get("upd")
    counts = [v if type(v) is int and v >= 0 else None
              for v in (p.get("config_version"), p.get("key_version"), p.get("held"))]
    return Identity(str(p.get(1, node)), str(p.get(2, "?")), str(p.get(3, "?")), floor,
                    reason, proto, verified, upd if isinstance(upd, dict) else None, *counts)


# ---------------------------------------------------------------- errors


class CommandError(LanternError):
    """A command that got no usable answer; `node` and `op` say which."""

    def __init__(self, node: str, op: int, msg: str) -> None:
        super().__init__(f"node {node}: {msg}")
        self.node = node
        self.op = op


class CommandTimeout(CommandError):
    """No REPLY within the timeout, after every retry."""


class LinkDown(CommandError):
    """The link that reaches the node is not connected now."""


class NoRoute(LanternError):
    """No link of this gateway reaches the node (`node`)."""

    def __init__(self, node: str) -> None:
        super().__init__(f"node {node}: no link has heard from it; is it powered and on one "
                         "of this gateway's links?")
        self.node = node


# ---------------------------------------------------------------- counters


class Counters:
    """The last command counter per node, persisted ahead of use (mode 0600, atomic).

    Persisted is a high-water mark `RESERVE` above the counter handed out; a restart starts
    above it. The file is shared by every link of one gateway (a node may move links).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[str, int] = {}
        self._saved: dict[str, int] = {}
        self._lock = asyncio.Lock()
        try:
            self._saved = _parse_counters(json.loads(path.read_text()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            # without it a counter might be reused: refuse to guess; say what to do
            raise LanternError(f"{path}: unreadable ({e}); delete it to count from the "
                               "current time again (nodes then refuse commands only until "
                               "their floor is learnt)") from None
        self.last = dict(self._saved)

    def learn(self, node: str, floor: int) -> None:
        """The node's floor, as its STATUS says: counters go on above it."""
        if floor > self.last.get(node, 0):
            self.last[node] = floor

    async def next(self, node: str) -> int:
        """A counter above every one used for `node`, on disk before it is returned."""
        async with self._lock:
            c = max(time.time_ns() // 1_000_000, self.last.get(node, 0) + 1)
            self.last[node] = c
            if c > self._saved.get(node, 0):
                snapshot = {**self._saved, node: c + RESERVE}
                await asyncio.to_thread(self._write, snapshot)
                self._saved = snapshot
            return c

    def _write(self, data: dict[str, int]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _parse_counters(data: Any) -> dict[str, int]:
    """{node id: counter} from the counter file's JSON; ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a map of node id to counter, got {type(data).__name__}")
    for node, v in data.items():
        if type(v) is not int or v < 0:  # a null, a list, a map, a bool, a string
            raise ValueError(f"{node}: {json.dumps(v)[:40]} is not a counter")
    return {str(k): v for k, v in data.items()}


_COUNTERS: dict[Path, Counters] = {}


def counters_for(state_dir: Path) -> Counters:
    """The one Counters of a gateway's state directory (shared by all its links)."""
    path = (state_dir / COUNTER_FILE).absolute()
    c = _COUNTERS.get(path)
    if c is None:
        c = _COUNTERS[path] = Counters(path)
    return c


# ---------------------------------------------------------------- the channel


@dataclass
class _Pending:
    node: str
    op: int
    counter: int
    answer: asyncio.Future[tuple[int, Any] | int]  # (code, result) or R_REPLAY


@dataclass
class _Node:
    sem: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_OUTSTANDING))
    order: asyncio.Lock = field(default_factory=asyncio.Lock)  # counters leave in order
    pending: dict[int, _Pending] = field(default_factory=dict)  # counter → command
    heard: float = 0.0  # monotonic time of the last authentic REPLY or STATUS
    identity: Identity | None = None
    other_key: bool = False  # a STATUS said the node holds another key
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a new authentic STATUS


Sender = Callable[[int, bytes], None]  # (frame type, body): the link frames and queues it
# (node, frame type, body): a link with one connection per node (BLE); node None = every
# node it is connected to now (a probe)
NodeSender = Callable[[str | None, int, bytes], None]
Reach = Callable[[str], Awaitable[bool]]  # open (or wait for) a connection to the node


class Channel:
    """Commands to the nodes one link reaches; REPLY / STATUS from them (`on_frame`).

    `send(ftype, body)` queues a frame on the link, behind any ACK; `ready(node)` says whether
    the link can reach that node now. A link that connects to one node at a time (BLE) passes
    `send_to(node, ftype, body)` instead, and `reach(node)`, awaited before each command:
    it connects to the node if need be and says whether it could.
    """

    def __init__(self, name: str, send: Sender | None, keys: dict[bytes, bytes],
                 counters: Counters, ready: Callable[[str], bool] | None = None, *,
                 send_to: NodeSender | None = None, reach: Reach | None = None) -> None:
        if send_to is None:
            if send is None:
                raise ValueError("a channel needs send or send_to")
            one: Sender = send
            send_to = lambda _node, ftype, body: one(ftype, body)  # noqa: E731
        self.name = name
        self._send_to = send_to
        self.keys = keys
        self.counters = counters
        self._ready = ready or (lambda _node: True)
        self._reach = reach
        self._nodes: dict[str, _Node] = {}
        # a node's next key while a key rotation commits (agent/fleetops.py): its answers
        # may already be sealed with it
        self.next_keys: dict[bytes, bytes] = {}
        self.stats: Counter[str] = Counter()  # commands, replies, retries, timeouts, refused…

    def _node(self, node: str) -> _Node:
        n = self._nodes.get(node)
        if n is None:
            n = self._nodes[node] = _Node()
        return n

    def heard_from(self, node: str) -> float:
        """Monotonic time of the node's last authentic answer here, 0.0 if never."""
        n = self._nodes.get(node)
        return n.heard if n else 0.0

    def identity(self, node: str) -> Identity | None:
        n = self._nodes.get(node)
        return n.identity if n else None

    def waiting(self, node: str) -> int:
        """Commands to `node` sent and not answered yet (a connection holds on for them)."""
        n = self._nodes.get(node)
        return sum(1 for p in n.pending.values() if not p.answer.done()) if n else 0

    async def command(self, node_id: str, op: int, args: dict[int, Any] | None = None,
                      timeout: float = 5.0, *, retries: int = 2) -> tuple[int, Any]:
        """(result code, result) of one authenticated command.

        Sent again with a fresh counter after a timeout or a refused counter (a tool went
        ahead), up to `retries` times. Raises LinkDown or CommandTimeout. A STATUS never
        refuses a command: only one saying "replayed" names a counter (the node's floor).
        """
        key = self.keys.get(node_id.encode())
        if key is None:
            raise CommandError(node_id, op, "no key for it in keys.toml")
        n = self._node(node_id)
        async with n.sem:
            tries = 0
            while True:
                if not self._ready(node_id):
                    raise LinkDown(node_id, op, f"{self.name} is not connected to it now")
                if self._reach is not None and not await self._reach(node_id):
                    raise LinkDown(node_id, op, f"{self.name} could not connect to it now")
                fut: asyncio.Future[tuple[int, Any] | int] = (
                    asyncio.get_running_loop().create_future())
                async with n.order:  # counters reach the line in the order they were taken
                    counter = await self.counters.next(node_id)
                    n.pending[counter] = _Pending(node_id, op, counter, fut)
                    self._send_to(node_id, protocol.COMMAND,
                                  command_body(key, node_id, counter, op, args))
                self.stats["commands"] += 1
                try:
                    answer = await asyncio.wait_for(fut, timeout)
                except TimeoutError:
                    answer = None
                finally:
                    n.pending.pop(counter, None)
                if isinstance(answer, tuple):
                    return answer
                tries += 1  # no answer, or a STATUS saying our counter was below its floor
                if tries > retries:
                    self.stats["timeouts"] += 1
                    hint = ("; the node said our key is not its key (provisioned again?)"
                            if n.other_key else "")
                    raise CommandTimeout(node_id, op, f"no answer to op {op} on {self.name} "
                                         f"({tries} tries, {timeout:g} s each){hint}")
                self.stats["retries"] += 1

    def on_frame(self, ftype: int, body: bytes) -> None:
        """A REPLY or STATUS read by the link; anything wrong with it is counted, not raised."""
        try:
            if ftype == protocol.REPLY:
                self._on_reply(body)
            elif ftype == protocol.STATUS:
                self._on_status(body)
            else:
                self.stats["unexpected"] += 1
        except FrameError as e:
            self.stats[f"bad_{e.kind}"] += 1
            if self.stats[f"bad_{e.kind}"] == 1:
                log.warning("%s: answer refused (%s); further ones are only counted",
                            self.name, e)

    def _on_reply(self, body: bytes) -> None:
        node, counter, _ = unseal(None, body, protocol.REPLY)
        key = self.keys.get(node.encode())
        if key is None:
            raise FrameError("unknown_node", f"REPLY from {node!r}")
        _, _, payload = self._unseal(node, key, body, protocol.REPLY)
        n = self._node(node)
        n.heard = time.monotonic()
        p = n.pending.get(counter)
        if p is None or p.answer.done():
            self.stats["late_replies"] += 1  # its command timed out and was sent again
            return
        if not isinstance(payload, dict) or type(payload.get(2)) is not int:
            raise FrameError("cbor", "REPLY payload is not {1: op, 2: code, 3: result}")
        self.stats["replies"] += 1
        p.answer.set_result((payload[2], payload.get(3)))

    def _unseal(self, node: str, key: bytes, body: bytes, ftype: int) -> tuple[str, int, Any]:
        """unseal under the node's key, else under its next key (a rotation committing)."""
        try:
            return unseal(key, body, ftype)
        except FrameError as e:
            nxt = self.next_keys.get(node.encode())
            if e.kind != "mac" or nxt is None:
                raise
            return unseal(nxt, body, ftype)

    def _on_status(self, body: bytes) -> None:
        ident = parse_status(body, None)
        key = self.keys.get(ident.node_id.encode())
        if key is None:
            raise FrameError("unknown_node", f"STATUS from {ident.node_id!r}")
        n = self._node(ident.node_id)
        if ident.reason == R_BAD_MAC:
            n.other_key = True  # not verifiable (the node holds another key): only noted
            self.stats["status_other_key"] += 1
            return
        self._unseal(ident.node_id, key, body, protocol.STATUS)  # FrameError("mac") if neither
        ident = replace(ident, verified=True)
        n.heard = time.monotonic()
        n.other_key = False
        n.identity = ident
        self.stats["status"] += 1
        n.changed.set()
        if ident.reason == R_MALFORMED:
            # The node could not read some COMMAND, so its STATUS names no counter (its
            # Partial IV is the node's floor). Ours are sealed here and always well formed:
            # this one answers someone else's junk, which anyone on the line can send. It
            # refuses none of ours; they get their REPLY, or time out and are sent again.
            self.stats["status_malformed"] += 1
            if self.stats["status_malformed"] == 1:
                log.warning("%s: node %s could not read a COMMAND that was not ours (junk "
                            "on the line?); further ones are only counted", self.name,
                            ident.node_id)
        elif ident.reason == R_REPLAY:
            self.counters.learn(ident.node_id, ident.floor)
            # the node answers in order: the refusal is the oldest command still waiting
            # at or below the floor it names
            for c in sorted(n.pending):
                p = n.pending[c]
                if not p.answer.done() and c <= ident.floor:
                    p.answer.set_result(ident.reason)
                    break

    async def next_status(self, node_id: str, timeout: float) -> Identity | None:
        """The node's next authentic STATUS (a probe answer, or one it sends at boot)."""
        n = self._node(node_id)
        n.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(n.changed.wait(), timeout)
            return n.identity
        return None

    def probe(self, node: str | None = None) -> None:
        """Ask whoever is on the link who they are (an empty COMMAND; answered by a STATUS);
        on a link with a connection per node, `node` or every node connected now."""
        self._send_to(node, protocol.COMMAND, b"")


def route(links: Iterable[Any], node_id: str, seen_on: str | None = None) -> Channel:
    """The channel of the link that reaches `node_id`: the one it answered on last, else the
    one its last DATA frame came on (`seen_on`: Metrics.nodes[node].link, a link's name or a
    BLE session's, which starts with its link's). Raises NoRoute."""
    best: tuple[float, Channel] | None = None
    for link in links:
        ch = getattr(link, "commander", None)
        if not isinstance(ch, Channel):
            continue
        if hasattr(link, "serves") and not link.serves(node_id):
            continue
        heard = ch.heard_from(node_id)
        if heard and (best is None or heard > best[0]):
            best = (heard, ch)
        elif best is None and seen_on is not None and (
                seen_on == link.name or seen_on.startswith(link.name + " ")):
            best = (0.0, ch)
    if best is None:
        raise NoRoute(node_id)
    return best[1]
