"""The fleet registry: every node the gateway knows, as one record (docs/fleet.md).

id, pole, location, board, firmware version, key id (and how many keys it has had), config
version, and a state: provisioned (a key, no frame yet), active, silent (no frame for three
intervals), revoked. Kept in `state_dir/registry.sqlite` (0600), beside the queue but not in
it. SQLite, not a JSON file, because two writers share it: the running gateway (last seen,
firmware) and `lantern gateway nodes import|revoke`. Each change is its own transaction under
SQLite's file lock, touching its own rows; a JSON file would be rewritten whole by whichever
writer came last, and could lose the other's node.

A key the registry has retired (replaced by re-provisioning) or a revoked node's key is never
handed to ingest again: `KeyView` refuses it, so frames recorded before a wipe stay refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import load_keys
from .errors import ConfigError, LanternError
from .ngsi import NodeMeta

log = logging.getLogger("lantern.registry")

REGISTRY_FILE = "registry.sqlite"
SILENT_INTERVALS = 3  # no frame for this many sampling intervals: silent
SEEN_WRITE_S = 60.0  # a node's last-seen time is written at most this often (SD-card wear)
STATES = ("provisioned", "active", "silent", "revoked")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, pole TEXT NOT NULL DEFAULT '', lat REAL, lon REAL,
    board TEXT NOT NULL DEFAULT '', firmware TEXT, key_id TEXT,
    config_version INTEGER NOT NULL DEFAULT 0, interval_s REAL NOT NULL DEFAULT 60,
    provisioned REAL, last_seen REAL, revoked REAL, revoked_why TEXT);
CREATE TABLE IF NOT EXISTS retired (
    node TEXT NOT NULL, key_id TEXT NOT NULL, at REAL NOT NULL, why TEXT NOT NULL,
    PRIMARY KEY (node, key_id));
"""


class RegistryError(LanternError):
    """A registry change refused (a clash, an unknown node); the message says why and how."""


def key_id(key: bytes) -> str:
    """A key's public name (16 hex digits), as the node and the key file comments name it."""
    return hashlib.sha256(b"lantern key id v1" + key).digest()[:8].hex()


@dataclass(frozen=True)
class NodeRecord:
    id: str
    pole: str = ""
    lat: float | None = None
    lon: float | None = None
    board: str = ""
    firmware: str | None = None
    key_id: str | None = None
    key_version: int = 1  # keys the node has had: retired ones + the current one
    config_version: int = 0
    interval_s: float = 60.0
    provisioned: float | None = None
    last_seen: float | None = None
    revoked: float | None = None
    revoked_why: str | None = None
    retired: tuple[str, ...] = ()  # key ids retired for this node

    def state(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.last_seen is None:
            return "provisioned"
        return "active" if now - self.last_seen <= SILENT_INTERVALS * self.interval_s \
            else "silent"

    def row(self, now: float) -> dict[str, object]:
        """The record as /api/nodes and the CSV export give it."""
        return {"id": self.id, "pole": self.pole, "lat": self.lat, "lon": self.lon,
                "board": self.board, "firmware": self.firmware, "key_id": self.key_id,
                "key_version": self.key_version, "config_version": self.config_version,
                "state": self.state(now), "last_seen": self.last_seen,
                "revoked": self.revoked, "revoked_why": self.revoked_why}


CSV_FIELDS = ("id", "pole", "lat", "lon", "board", "firmware", "key_id", "key_version",
              "config_version", "state", "last_seen", "revoked", "revoked_why")


class Registry:
    """The registry file. Blocking (sqlite): the gateway calls it through asyncio.to_thread;
    `records`, `refusal` and `revoked` answer from memory (`refresh` reloads it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():  # 0600 from the start: it names keys (by id) and places
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        self._db = sqlite3.connect(path, timeout=10, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._version = -1
        self._records: dict[str, NodeRecord] = {}
        self._written: dict[str, float] = {}  # node → last_seen last written
        self.refresh()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE: no lost update)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> bool:
        """Reload the records if anyone (this process or another) changed the file."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version and not force:
            return False
        self._version = version
        retired: dict[str, list[str]] = {}
        for node, kid in self._db.execute("SELECT node, key_id FROM retired ORDER BY at"):
            retired.setdefault(node, []).append(kid)
        cols = ("id", "pole", "lat", "lon", "board", "firmware", "key_id", "config_version",
                "interval_s", "provisioned", "last_seen", "revoked", "revoked_why")
        recs = {}
        for row in self._db.execute(f"SELECT {', '.join(cols)} FROM nodes ORDER BY id"):
            r = NodeRecord(**dict(zip(cols, row, strict=True)))
            old = tuple(retired.get(r.id, ()))
            recs[r.id] = replace(r, retired=old, key_version=len(old) + 1)
        self._records = recs
        return True

    # ---- reads (memory)

    def records(self) -> list[NodeRecord]:
        return list(self._records.values())

    def get(self, node: str) -> NodeRecord | None:
        return self._records.get(node)

    def revoked(self, node: str) -> bool:
        r = self._records.get(node)
        return r is not None and r.revoked is not None

    def refusal(self, node: str, key: bytes) -> str | None:
        """Why frames of `node` under `key` are refused ("revoked", "retired"), or None."""
        r = self._records.get(node)
        if r is None:
            return None
        if r.revoked is not None:
            return "revoked"
        kid = key_id(key)
        if kid in r.retired and kid != r.key_id:
            return "retired"
        return None

    # ---- writes

    def sync_keys(self, keys: Mapping[bytes, bytes], now: float | None = None) -> list[str]:
        """Records for the key file's nodes: a new node is provisioned; a key the record does
        not know becomes its key (the old one retired), unless it was retired before (a key
        file restored from a backup: refused by `refusal`). What changed, one line each."""
        now = time.time() if now is None else now
        out = []
        with self._tx() as db:
            for kid_bytes, key in keys.items():
                node, kid = kid_bytes.decode(), key_id(key)
                r = self._records.get(node)
                if r is None:
                    db.execute("INSERT INTO nodes (id, key_id, provisioned) VALUES (?, ?, ?)",
                               (node, kid, now))
                    out.append(f"{node}: added (key {kid})")
                elif r.key_id != kid and kid not in r.retired:
                    self._rekey(db, r, kid, "replaced in the key file", now)
                    out.append(f"{node}: key {kid} replaces {r.key_id} (retired)")
        return out

    @staticmethod
    def _rekey(db: sqlite3.Connection, r: NodeRecord, kid: str, why: str, now: float) -> None:
        if r.key_id:
            db.execute("INSERT OR IGNORE INTO retired VALUES (?, ?, ?, ?)",
                       (r.id, r.key_id, now, why))
        # a new key is a new node as far as revocation goes: re-provisioning un-revokes
        db.execute("UPDATE nodes SET key_id = ?, provisioned = ?, revoked = NULL, "
                   "revoked_why = NULL, last_seen = NULL WHERE id = ?", (kid, now, r.id))

    def provisioned(self, node: str, kid: str, pole: str = "", lat: float | None = None,
                    lon: float | None = None, board: str = "", interval_s: float = 60.0,
                    now: float | None = None) -> None:
        """A node (re-)provisioned with key `kid`: its record made or updated, an old key
        retired. RegistryError if `kid` was retired for it (a stale fragment)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            r = self._records.get(node)
            if r is not None and kid in r.retired:
                raise RegistryError(f"{node}: key {kid} was retired on this gateway (the node "
                                    "was provisioned again since): an old fragment? provision "
                                    "the node again for a new key")
            if r is None:
                db.execute("INSERT INTO nodes (id, key_id, provisioned) VALUES (?, ?, ?)",
                           (node, kid, now))
            elif r.key_id != kid:
                self._rekey(db, r, kid, "re-provisioned", now)
            db.execute("UPDATE nodes SET pole = ?, lat = ?, lon = ?, board = ?, interval_s = ? "
                       "WHERE id = ?", (pole, lat, lon, board, interval_s, node))

    def revoke(self, node: str, why: str = "", now: float | None = None) -> NodeRecord:
        now = time.time() if now is None else now
        with self._tx() as db:
            if node not in self._records:
                raise RegistryError(f"no node {node!r} in {self.path} (`lantern gateway nodes` "
                                    "lists them)")
            db.execute("UPDATE nodes SET revoked = coalesce(revoked, ?), revoked_why = ? "
                       "WHERE id = ?", (now, why or "revoked by the operator", node))
        return self._records[node]

    def observe(self, seen: Mapping[str, float], firmware: Mapping[str, str],
                meta: Mapping[str, tuple[str, float | None, float | None, float]] = {}
                ) -> None:
        """What the gateway learnt: frames taken (last seen, written at most every
        SEEN_WRITE_S per node), firmware versions, and the [nodes] table's place and interval
        (pole, lat, lon, interval_s) where the config sets them."""
        changes: list[tuple[str, tuple[object, ...]]] = []
        for node, t in seen.items():
            r = self._records.get(node)
            if r is not None and t - self._written.get(node, r.last_seen or 0.0) >= SEEN_WRITE_S:
                changes.append(("UPDATE nodes SET last_seen = max(coalesce(last_seen, 0), ?) "
                                "WHERE id = ?", (t, node)))
                self._written[node] = t
        for node, fw in firmware.items():
            r = self._records.get(node)
            if r is not None and r.firmware != fw:
                changes.append(("UPDATE nodes SET firmware = ? WHERE id = ?", (fw, node)))
        for node, (pole, lat, lon, interval) in meta.items():
            r = self._records.get(node)
            if r is not None and (r.pole, r.lat, r.lon, r.interval_s) != (
                    pole or r.pole, lat if lat is not None else r.lat,
                    lon if lon is not None else r.lon, interval):
                changes.append(("UPDATE nodes SET pole = ?, lat = ?, lon = ?, interval_s = ? "
                                "WHERE id = ?", (pole or r.pole, r.lat if lat is None else lat,
                                                 r.lon if lon is None else lon, interval, node)))
        if changes:
            with self._tx() as db:
                for sql, args in changes:
                    db.execute(sql, args)

    def live(self, seen: Mapping[str, float]) -> list[NodeRecord]:
        """The records with this run's last-seen times (fresher than the file's)."""
        return [replace(r, last_seen=max(r.last_seen or 0.0, seen[r.id]))
                if r.id in seen else r for r in self._records.values()]


class KeyView(dict[bytes, bytes]):
    """The node keys ingest verifies with: the key file's (its contents), minus a revoked
    node's and a key the registry retired: a refused key is absent (None, KeyError, not
    `in`). Ingest asks `Fleet.refused` first on every frame (its `refused` hook), so such a
    frame is counted by its reason ("revoked", "retired") before any key is looked up."""

    def __init__(self, keys: Mapping[bytes, bytes], registry: Registry) -> None:
        super().__init__(keys)
        self.registry = registry

    def _check(self, kid: bytes, key: bytes) -> bool:
        return self.registry.refusal(kid.decode("utf-8", "replace"), key) is None

    def get(self, kid: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        key = super().get(kid)
        return key if key is not None and self._check(kid, key) else default

    def __getitem__(self, kid: bytes) -> bytes:
        key = self.get(kid)
        if key is None:
            raise KeyError(kid)
        return key

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, bytes) and self.get(kid) is not None

    def replace_all(self, keys: Mapping[bytes, bytes]) -> None:
        """The key file read again (a node imported while the gateway runs)."""
        self.clear()
        self.update(keys)


WATCH_EVERY_S = 2.0


class Fleet:
    """The registry in a running gateway: the key views handed to ingest and the links, the
    nodes' places for the sinks and the API, and a task (`run`) that keeps them current —
    the key file read again when it changes (`lantern gateway nodes import`), revocations
    and re-keys applied, what the gateway learnt written, Device entities pushed upstream."""

    def __init__(self, registry: Registry, keys_file: Path, keys: dict[bytes, bytes],
                 config_nodes: Mapping[str, NodeMeta], node_ids: list[str]) -> None:
        self.registry = registry
        self.keys_file = keys_file
        self.ingest_keys = KeyView(keys, registry)
        # the links' keys stay whole: a link looks a node's key up where a missing one is a
        # bug (a BLE session, a command's reply); what a revoked node sends is refused at ingest
        self.link_keys: dict[bytes, bytes] = dict(keys)
        self.config_nodes = config_nodes
        self.node_ids = node_ids  # the gateway's list of keyed nodes, extended in place
        self.nodes_meta: dict[str, NodeMeta] = {}  # registry places, [nodes] winning
        self._mtime = self._stat()
        self._refusals: dict[str, tuple[str | None, str | None]] = {}
        self._pushed: dict[str, tuple[object, ...]] = {}
        self._failing: set[str] = set()  # what is logged once until it works again

    def refused(self, kid: bytes) -> str | None:
        """Why ingest must refuse frames of `kid` now ("revoked", "retired"), or None: for an
        ingest that asks on every frame (its `refused` hook, when it has one)."""
        key = dict.get(self.ingest_keys, kid)
        return None if key is None else self.registry.refusal(kid.decode("utf-8", "replace"),
                                                             key)

    def _stat(self) -> float | None:
        try:
            return self.keys_file.stat().st_mtime_ns
        except OSError:
            return None

    async def start(self) -> None:
        for line in await asyncio.to_thread(self.registry.sync_keys, dict(self.ingest_keys)):
            log.info("registry: %s", line)
        self._places()
        self._refusals = self._now_refused()
        for node, (why, _) in self._refusals.items():
            if why:
                log.warning("registry: node %s is %s: its frames are refused", node, why)

    def _places(self) -> None:
        for r in self.registry.records():
            self.nodes_meta[r.id] = self.config_nodes.get(r.id) or NodeMeta(
                pole=r.pole, lat=r.lat, lon=r.lon, interval_s=r.interval_s)
        for node, meta in self.config_nodes.items():
            self.nodes_meta[node] = meta
        for kid in self.ingest_keys:
            if kid.decode() not in self.node_ids:
                self.node_ids.append(kid.decode())

    def _now_refused(self) -> dict[str, tuple[str | None, str | None]]:
        out = {}
        for kid, key in dict.items(self.ingest_keys):
            node = kid.decode()
            r = self.registry.get(node)
            out[node] = (self.registry.refusal(node, key), r.key_id if r else None)
        return out

    def _once(self, what: str, e: BaseException | None) -> None:
        if e is None:
            if what in self._failing:
                self._failing.discard(what)
                log.info("registry: %s works again", what)
        elif what not in self._failing:
            self._failing.add(what)
            log.error("registry: %s failed (%s); tried again every %g s", what, e,
                      WATCH_EVERY_S)

    async def tick(self, seen: Mapping[str, float], firmware: Mapping[str, str],
                   forget: Callable[[bytes], None] | None, sinks: list[Any]) -> None:
        mtime = self._stat()
        if mtime != self._mtime:
            try:
                keys = await asyncio.to_thread(load_keys, self.keys_file)
                for line in await asyncio.to_thread(self.registry.sync_keys, keys):
                    log.info("registry: %s", line)
            except (ConfigError, sqlite3.Error) as e:
                self._once(f"reading {self.keys_file}", e)
            else:
                self._mtime = mtime
                self._once(f"reading {self.keys_file}", None)
                self.ingest_keys.replace_all(keys)
                self.link_keys.clear()
                self.link_keys.update(keys)
        meta = {n: (m.pole, m.lat, m.lon, m.interval_s) for n, m in self.config_nodes.items()}
        try:
            await asyncio.to_thread(self.registry.observe, seen, dict(firmware), meta)
            await asyncio.to_thread(self.registry.refresh)
            self._once(f"writing {self.registry.path}", None)
        except sqlite3.Error as e:
            self._once(f"writing {self.registry.path}", e)
        self._places()
        now_refused = self._now_refused()
        for node, state in now_refused.items():
            before = self._refusals.get(node)
            if before == state:
                continue
            why, kid = state
            log.warning("registry: node %s: %s", node, f"its frames are refused ({why})"
                        if why else f"key {kid} in use")
            if before is not None and before[1] != kid:  # a new key: ingest reads it again
                if forget is not None:
                    forget(node.encode())
                else:
                    log.warning("registry: node %s: ingest keeps the key it read at the "
                                "node's first frame until the gateway restarts", node)
        self._refusals = now_refused
        await self._push(seen, sinks)

    async def _push(self, seen: Mapping[str, float], sinks: list[Any]) -> None:
        """Device entities of the records whose state, firmware, key or place changed."""
        pushers = [s for s in sinks if hasattr(s, "push_devices")]
        if not pushers:
            return
        now = time.time()
        recs = self.registry.live(seen)
        prints = {r.id: (r.state(now), r.firmware, r.key_id, r.lat, r.lon, r.board)
                  for r in recs}
        changed = [r for r in recs if self._pushed.get(r.id) != prints[r.id]]
        if not changed:
            return
        for sink in pushers:
            try:
                await sink.push_devices(changed, now)
            except Exception as e:  # the broker down, or refusing: tried at the next change
                self._once(f"Device entities to {sink.name}", e)
                return
            self._once(f"Device entities to {sink.name}", None)
        for r in changed:
            self._pushed[r.id] = prints[r.id]

    async def run(self, seen: Callable[[], Mapping[str, float]], firmware: Mapping[str, str],
                  forget: Callable[[bytes], None] | None, sinks: list[Any]) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                await self.tick(seen(), firmware, forget, sinks)
            except Exception as e:  # a bug of ours: said once, the gateway goes on
                self._once("the registry task", e)
