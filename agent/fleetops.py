"""The fleet's live operations: key rotation and group settings, run by the gateway (docs/fleet.md).

Key rotation (`lantern gateway rekey`): REKEY (op 14) with an ephemeral X25519 public key →
the node's public key → both derive the next key (HKDF-SHA256 over the shared secret, salted
with the current key: an eavesdropper holding the old key cannot follow) → the registry keeps
it as the node's next key → COMMIT (op 15) → the node seals with it from the sequence its
answer names. The old key stays good for DATA frames below that sequence (the node's outbox);
frames that verify under the next key before the COMMIT answer came promote it too.

Group settings (`lantern gateway group set`): OP_CONFIG (op 16) to every node of the group on
an older config version, when the gateway next hears from it; the version it reports, or its
refusal, kept in the registry.

Both run when the gateway hears from a node (a DATA frame taken), at most once per
`retry_s` per node, one operation per node at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import nodecmd, protocol
from .errors import AuthError, ConfigError, LanternError
from .nodecmd import OK, OP_CONFIG, OP_REKEY, OP_REKEY_COMMIT

if TYPE_CHECKING:
    from .metrics import Metrics
    from .registry import Fleet

log = logging.getLogger("lantern.fleetops")

INFO = b"lantern rekey v1"
RETRY_S = 30.0  # a node's operation that failed is tried again this long after, when heard
COMMAND_TIMEOUT_S = 5.0

# the settings a node takes (firmware/node/commands.py validates them again)
SENSORS = ("temperature", "humidity", "sound")
RANGES: dict[str, tuple[float, float, bool]] = {  # key → (low, high, whole number)
    "interval_ms": (1000, 86_400_000, True), "kappa": (0.0, 1.5, False),
    "max_untimed": (0, 4096, True), "window": (1, 8, True)}


def derive(shared: bytes, current: bytes, node_id: str, version: int) -> bytes:
    """The next key: HKDF-SHA256 (RFC 5869), IKM the X25519 secret, salt the current key,
    info "lantern rekey v1" ‖ node id ‖ version (4 bytes big-endian), as long as the current
    key. ValueError for an all-zero secret (a low-order public key)."""
    # `cryptography` (~6 MB resident) loads with the first rotation, not with the gateway
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if shared == bytes(len(shared)):
        raise ValueError("all-zero X25519 secret (a low-order public key)")
    info = INFO + node_id.encode() + version.to_bytes(4, "big")
    return HKDF(SHA256(), len(current), current, info).derive(shared)


def _number(v: Any) -> bool:
    return type(v) in (int, float)


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Group settings as a node takes them; ConfigError naming the first bad one."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if k == "offsets":
            if not isinstance(v, dict) or not v:
                raise ConfigError("offsets: expected a map of sensor to offset, e.g. "
                                  "offsets.temperature=-0.4")
            top = 20  # firmware/node/netcfg.py OFFSET_MAX: what every node takes
            for name, off in v.items():
                if name not in SENSORS:
                    raise ConfigError(f"offsets.{name}: expected a number for one of "
                                      f"{', '.join(SENSORS)}, got {off!r}")
                if not _number(off) or not -top <= off <= top:  # (refuses nan and inf too)
                    raise ConfigError(f"offsets.{name}: expected a number from {-top} to "
                                      f"{top}, got {off!r}")
        elif k in RANGES:
            lo, hi, whole = RANGES[k]
            if not _number(v) or (whole and type(v) is not int) or not lo <= v <= hi:
                raise ConfigError(f"{k}: expected {'a whole number' if whole else 'a number'} "
                                  f"from {lo:g} to {hi:g}, got {v!r}")
        else:
            raise ConfigError(f"{k}: not a setting nodes take (known: "
                              f"{', '.join(sorted([*RANGES, 'offsets']))})")
        out[k] = v
    return out


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """["interval_ms=60000", "offsets.temperature=-0.4"] → settings; ConfigError if malformed."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"{item!r}: expected key=value")
        try:
            value: Any = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{key}: {text!r} is not a number") from None
        head, dot, sub = key.partition(".")
        if dot:
            out.setdefault(head, {})[sub] = value
        else:
            out[key] = value
    return out


class FleetOps:
    """Rotations and group settings of a running gateway: `heard` after each tick of the
    fleet task, `other_key` asked by ingest for a frame its key does not verify."""

    def __init__(self, fleet: Fleet, links: list[Any], metrics: Metrics,
                 forget: Callable[[bytes], None], retry_s: float = RETRY_S) -> None:
        self.fleet = fleet
        self.links = links
        self.metrics = metrics
        self.forget = forget
        self.retry_s = retry_s
        self.next_keys: dict[bytes, bytes] = {}  # shared with every link's Channel
        self._prev: dict[bytes, protocol.NodeKey] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._tried: dict[str, float] = {}  # node → monotonic time of its last attempt
        self._heard: dict[str, float] = {}  # node → last_seen acted on
        for rot in (fleet.registry.rotation(n.id) for n in fleet.registry.records()):
            if rot is not None and rot.next is not None:  # agreed before a restart
                self.next_keys[rot.node.encode()] = rot.next
        for link in links:
            ch = getattr(link, "commander", None)
            if isinstance(ch, nodecmd.Channel):
                ch.next_keys = self.next_keys

    # ---- ingest's hook

    def other_key(self, m: protocol.Mac0) -> protocol.NodeKey | None:
        """The key a DATA frame its node's key did not verify may be sealed with: the previous
        one below the first sequence of the current, else the next one (promoted by it)."""
        node = m.kid.decode("utf-8", "replace")
        rot = self.fleet.registry.rotation(node)
        if rot is None:
            return None
        if rot.prev is not None and rot.first_new is not None and m.seq < rot.first_new:
            nk = self._prev.get(m.kid)
            if nk is None or nk.key_id != protocol.key_id(rot.prev):
                nk = self._prev[m.kid] = protocol.NodeKey(rot.prev, m.kid)
            return nk
        nxt = self.next_keys.get(m.kid)
        if nxt is None or rot.next_version is None:
            return None
        nk = protocol.NodeKey(nxt, m.kid)
        try:
            nk.verify(m)
        except AuthError:
            return None
        self.metrics.rekeys["promoted"] += 1
        log.info("node %s: a frame under its next key (seq %d): key version %d in use",
                 node, m.seq, rot.next_version)
        self._switch(node, rot.next_version, nxt, m.seq)
        return nk

    def _switch(self, node: str, version: int, new: bytes, first_new: int) -> None:
        """The node seals with `new` from `first_new` (or before): keys switched now, the
        registry written (blocking, once per rotation: a few milliseconds)."""
        kid = node.encode()
        old = self.fleet.link_keys.get(kid)
        if old is not None and old != new:
            self.fleet.registry.rekey_done(node, version, old, first_new)
            dict.__setitem__(self.fleet.ingest_keys, kid, new)
            self.fleet.link_keys[kid] = new
            self.forget(kid)
        else:  # switched before (promoted by a frame): the exact first sequence now
            self.fleet.registry.rekey_done(node, version, new, first_new)
        self.next_keys.pop(kid, None)

    # ---- the work, when a node is heard

    def heard(self, seen: Mapping[str, float]) -> None:
        """Start what each node heard since the last call needs (one task per node)."""
        now = time.monotonic()
        reg = self.fleet.registry
        for node, t in seen.items():
            if t == self._heard.get(node) or node in self._busy:
                continue
            if now - self._tried.get(node, -self.retry_s) < self.retry_s:
                continue
            r = reg.get(node)
            if r is None or r.revoked is not None:
                continue
            rot = reg.rotation(node)
            rekey = rot is not None and rot.requested is not None
            if not rekey and not (r.config_want is not None and r.config_refused is None
                                  and r.config_version < r.config_want):
                continue
            self._heard[node] = t
            self._tried[node] = now
            task = asyncio.create_task(self._work(node, rekey), name=f"fleet {node}")
            self._busy[node] = task
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        for node, t in list(self._busy.items()):
            if t is task:
                del self._busy[node]

    async def idle(self) -> None:
        """Wait for the operations under way (tests, shutdown)."""
        while self._busy:
            await asyncio.gather(*self._busy.values(), return_exceptions=True)

    def close(self) -> None:
        for task in self._busy.values():
            task.cancel()

    async def _work(self, node: str, rekey: bool) -> None:
        try:
            ch = nodecmd.route(self.links, node, getattr(self.metrics.nodes.get(node),
                                                         "link", None))
            if rekey:
                await self.rotate(node, ch)
            r = self.fleet.registry.get(node)
            if r is not None and r.config_want is not None and r.config_version < r.config_want:
                await self.configure(node, ch)
        except (LanternError, ValueError) as e:
            log.warning("node %s: %s; tried again when heard, %g s from now at the earliest",
                        node, e, self.retry_s)
        except Exception as e:  # a bug of ours: said, and the gateway goes on
            log.error("node %s: fleet operation failed (%r); please report this", node, e,
                      exc_info=e)

    async def rotate(self, node: str, ch: nodecmd.Channel) -> str:
        """One live key rotation; the outcome ("done", or why not)."""
        reg = self.fleet.registry
        kid = node.encode()
        current = self.fleet.link_keys.get(kid)
        rot, r = reg.rotation(node), reg.get(node)
        if current is None or r is None:
            raise LanternError(f"node {node}: no key")
        ident = ch.identity(node)
        have = max(rot.version if rot else 0, (ident.key_version or 0) if ident else 0)
        if rot is not None and rot.next is not None and (rot.next_version or 0) > have:
            version, nxt = rot.next_version or 0, rot.next  # agreed before; commit it
        else:
            version = have + 1
            agreed = await self._agree(node, ch, current, version, r.key_id or "")
            if agreed is None:
                return "refused"
            nxt = agreed
        self.next_keys[kid] = nxt
        try:
            code, res = await ch.command(node, OP_REKEY_COMMIT, {2: version},
                                         COMMAND_TIMEOUT_S)
        except nodecmd.CommandError:
            self.metrics.rekeys["failed"] += 1
            await asyncio.to_thread(reg.rekey_outcome, node, f"v{version}: no COMMIT answer")
            raise
        if code != OK or not isinstance(res, dict) or type(res.get(3)) is not int:
            why = _why(code, res)
            self.metrics.rekeys["refused"] += 1
            self.next_keys.pop(kid, None)
            await asyncio.to_thread(reg.rekey_outcome, node, f"v{version}: COMMIT {why}", True,
                                    True)
            log.warning("node %s: key version %d not committed (%s); agreed again when heard",
                        node, version, why)
            return why
        await asyncio.to_thread(self._switch, node, version, nxt, res[3])
        self.metrics.rekeys["done"] += 1
        log.info("node %s: key version %d in use from seq %d", node, version, res[3])
        return "done"

    async def _agree(self, node: str, ch: nodecmd.Channel, current: bytes, version: int,
                     base: str) -> bytes | None:
        """REKEY: the next key, kept in the registry; None if the node refused."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import (
            X25519PrivateKey,
            X25519PublicKey,
        )

        reg = self.fleet.registry
        priv = X25519PrivateKey.generate()
        pub = priv.public_key().public_bytes_raw()
        try:
            code, res = await ch.command(node, OP_REKEY, {1: pub, 2: version}, COMMAND_TIMEOUT_S)
        except nodecmd.CommandError:
            self.metrics.rekeys["failed"] += 1
            await asyncio.to_thread(reg.rekey_outcome, node, f"v{version}: no REKEY answer")
            raise
        peer = res.get(1) if isinstance(res, dict) else None
        if code != OK or not isinstance(peer, bytes) or len(peer) != 32 or res.get(2) != version:
            why = _why(code, res) if code != OK else "a malformed REKEY answer"
            self.metrics.rekeys["refused"] += 1
            await asyncio.to_thread(reg.rekey_outcome, node, f"v{version}: {why}", False)
            log.warning("node %s: key rotation refused (%s)", node, why)
            return None
        try:
            nxt = derive(priv.exchange(X25519PublicKey.from_public_bytes(peer)), current, node,
                         version)
        except ValueError as e:  # a low-order point: never a key
            self.metrics.rekeys["refused"] += 1
            await asyncio.to_thread(reg.rekey_outcome, node, f"v{version}: {e}", False)
            return None
        await asyncio.to_thread(reg.rekey_next, node, version, nxt, base)
        return nxt

    async def configure(self, node: str, ch: nodecmd.Channel) -> str:
        """Its group's settings to one node; the outcome ("applied", or why not)."""
        reg = self.fleet.registry
        r = reg.get(node)
        g = reg.group(r.group) if r is not None else None
        if g is None:
            return "no group"
        try:
            code, res = await ch.command(node, OP_CONFIG, {1: g.version, 2: g.settings},
                                         COMMAND_TIMEOUT_S)
        except nodecmd.CommandError:
            self.metrics.config_pushes["failed"] += 1
            raise
        got = res.get(1) if isinstance(res, dict) else None
        if code == OK and type(got) is int:
            self.metrics.config_pushes["applied"] += 1
            await asyncio.to_thread(reg.config_reported, node, got)
            log.info("node %s: group %s settings version %d (the node reports %d)", node,
                     g.name, g.version, got)
            return "applied"
        why = _why(code, res)
        self.metrics.config_pushes["refused"] += 1
        await asyncio.to_thread(reg.config_reported, node, r.config_version if r else 0,
                                f"v{g.version}: {why}")
        log.warning("node %s: group %s settings version %d refused (%s)", node, g.name,
                    g.version, why)
        return why

    def drift(self) -> int:
        return sum(r.config_drift for r in self.fleet.registry.records())


def _why(code: int, res: Any) -> str:
    detail = res.get("error") if isinstance(res, dict) else None
    return nodecmd.CODES.get(code, f"code {code}") + (f": {detail}" if detail else "")
