"""What the gateway does with adverts: which address is whose, replay checks, third-party readings.

Which address is whose (AddressBook): a node's Lantern advert names it by a public tag, so a
claim proves nothing. An address earns trust for a node by authenticating — a GATT session
that delivered a new frame verified under the node's key, or an encrypted BTHome advert that
verifies under the node's bindkey with a counter newer than any seen. Every table here is
bounded by the number of node keys, whatever strangers on the radio send: per node, the one
proven address and the few addresses that claimed it most recently (the oldest claimer is
evicted, counted in `address_evictions`).

Lantern nodes' adverts are informational (their readings arrive authenticated over GATT), but
an encrypted advert carries a 32-bit counter that must only grow: a counter at or below the
highest accepted one is a replay (a repeat of the very same advert, which radios send many
times, is a duplicate and ignored quietly). Unlike BTHome receivers that accept any counter
below 100 after a "reset", nothing here forgets: the highest counters are kept on disk, and
nodes never reuse one (node/link_ble.py reserves them in flash).

Third-party BTHome sensors named in the configuration become readings, handed to ingest
(`Ingest.take`), the queue's one writer: committed with their replay window in the same
transaction, under the same pause-intake as the nodes' frames (node `bthome:<name>`, sequence
= the encryption counter; plain adverts get gateway-assigned sequence numbers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bleak.backends.device import BLEDevice

from .. import bthome
from ..errors import FrameError
from ..ingest import Ingest, Maker
from ..queue.store import Accepted
from .ble_config import BleDeviceConfig

log = logging.getLogger("lantern.link.ble")


UNPROVEN_PER_NODE = 4  # claimers kept per node, most recent first (docs/ble.md "Trust")


@dataclass(eq=False)
class Candidate:
    """An address that advertised a node's tag, and what its latest Lantern advert said."""

    node: str
    address: str
    device: BLEDevice
    backlog: int = 0
    seen: float = 0.0  # monotonic time of its latest Lantern advert
    rssi: int = 0
    failures: int = 0  # sessions in a row that failed; backoff until retry_at
    retry_at: float = 0.0


@dataclass(eq=False)
class NodeAddresses:
    """One node's addresses: the proven one, and the latest few that only claimed it."""

    proven: Candidate | None = None
    unproven: OrderedDict[str, Candidate] = field(default_factory=OrderedDict)
    unproven_failures: int = 0  # sessions to unproven claimers that proved nothing, in a row
    unproven_retry_at: float = 0.0
    last_session: float = 0.0  # monotonic; the node waiting longest is connected first
    claimed_at: float = float("-inf")  # latest Lantern advert naming it, from any address


class AddressBook:
    """Addresses by node (bounded by the node keys), and the trust each has earned."""

    def __init__(self, nodes: Iterable[str], stats: Counter[str]) -> None:
        self.nodes = {n: NodeAddresses() for n in nodes}
        self._index: dict[str, Candidate] = {}  # address → its entry (proven or not)
        self.stats = stats

    def __len__(self) -> int:
        return len(self._index)

    def get(self, address: str) -> Candidate | None:
        return self._index.get(address)

    def is_proven(self, c: Candidate) -> bool:
        return self.nodes[c.node].proven is c

    def claim(self, node: str, address: str, device: BLEDevice, now: float) -> Candidate:
        """A Lantern advert from `address` names `node`: its entry, created if need be."""
        entry = self.nodes[node]
        entry.claimed_at = now
        c = self._index.get(address)
        if c is not None and c.node == node:
            if entry.proven is not c:
                entry.unproven.move_to_end(address)
        else:
            if c is not None:
                if self.is_proven(c):
                    # a proven address naming another node: only a proof moves it
                    self.stats["address_conflicts"] += 1
                    return c
                self._drop(c)
            c = self._index[address] = Candidate(node, address, device)
            entry.unproven[address] = c
            if len(entry.unproven) > UNPROVEN_PER_NODE:
                _, old = entry.unproven.popitem(last=False)
                del self._index[old.address]
                self.stats["address_evictions"] += 1
        c.device = device
        return c

    def prove(self, node: str, address: str, device: BLEDevice) -> Candidate:
        """`address` authenticated as `node`: it becomes the node's one proven address."""
        entry = self.nodes[node]
        c = self._index.get(address)
        if c is not None and entry.proven is c:
            c.device = device
            return c
        if c is not None:
            self._drop(c)
        if c is None or c.node != node:
            c = Candidate(node, address, device)
        old = entry.proven
        if old is not None:
            del self._index[old.address]
        entry.proven = self._index[address] = c
        entry.unproven_failures, entry.unproven_retry_at = 0, 0.0
        c.device = device
        self.stats["addresses_proven"] += 1
        return c

    def forget(self, c: Candidate) -> None:
        """Drop an unproven claimer (it failed a check no real node fails)."""
        if not self.is_proven(c) and self._index.get(c.address) is c:
            self._drop(c)

    def _drop(self, c: Candidate) -> None:
        entry = self.nodes[c.node]
        if entry.proven is c:
            entry.proven = None
        else:
            entry.unproven.pop(c.address, None)
        del self._index[c.address]


class CounterBook:
    """Highest accepted advert counter per Lantern node, persisted (write-behind, ≤ 1 s)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.high: dict[str, int] = {}
        self._dirty = asyncio.Event()
        try:
            data = json.loads(path.read_text())
            self.high = {str(k): int(v) for k, v in data.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as e:
            # losing this file would reopen the replay hole: refuse to guess, say what to do
            raise FrameError("state", f"{path}: unreadable ({e}); restore it from backup, or "
                             "delete it to accept the next counter of every node") from None

    def check(self, node: str, counter: int) -> bool | None:
        """True: new (recorded); False: the same advert again; None: a replay."""
        last = self.high.get(node, -1)
        if counter > last:
            self.high[node] = counter
            self._dirty.set()
            return True
        return False if counter == last else None

    def _write(self, data: dict[str, int]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def run(self) -> None:
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                await asyncio.to_thread(self._write, dict(self.high))
                await asyncio.sleep(1.0)
        finally:
            if self._dirty.is_set():
                self._write(dict(self.high))


@dataclass
class _DeviceState:
    cfg: BleDeviceConfig
    last_data: bytes = b""
    last_at: float = 0.0


class ThirdParty(Maker):
    """Configured BTHome sensors → readings, queued by ingest (the queue's one writer)."""

    def __init__(self, devices: tuple[BleDeviceConfig, ...], ingest: Ingest, repeat_s: float,
                 stats: Counter[str], name: str) -> None:
        self.devices = {d.address.upper(): _DeviceState(d) for d in devices}
        self.ingest = ingest
        self.repeat_s = repeat_s
        self.stats = stats
        self.name = name
        self._pending_seqs: set[tuple[str, int]] = set()  # taken, not yet committed
        self._by_node = {f"bthome:{d.cfg.name}": d for d in self.devices.values()}
        self._failing = 0  # failed commits in a row: the first is logged, the rest counted

    def handles(self, address: str) -> bool:
        return address.upper() in self.devices

    def on_advert(self, address: str, data: bytes) -> None:
        """One advert's service data; raises FrameError for a rejected one (queue_full: the
        queue is at its disk cap, and it is taken when it comes again)."""
        st = self.devices[address.upper()]
        cfg = st.cfg
        node = f"bthome:{cfg.name}"
        adv = bthome.decode(data, bthome.mac_bytes(address), cfg.bindkey)
        now = time.time()
        w = self.ingest.windows.get(node)  # (loaded from the queue by Ingest.start)
        high = max([w.high if w is not None else -1,
                    *(s for n, s in self._pending_seqs if n == node)])
        if adv.encrypted:
            assert adv.counter is not None
            seq = adv.counter
            if seq == high:
                self.stats["advert_duplicates"] += 1  # the same advert, repeated on air
                return
            if seq < high:
                # counters only grow: an older one is a recording played back
                raise FrameError("advert_replay", f"{node}: counter {seq} < {high}")
        else:
            if cfg.bindkey is not None:
                raise FrameError("advert_plain", f"{node}: plaintext advert, bindkey configured")
            if data == st.last_data and now - st.last_at < self.repeat_s:
                self.stats["advert_duplicates"] += 1
                return
            seq = max(high, 0) + 1
        records: list[dict[str, Any]] = []
        names: Counter[str] = Counter()
        for r in adv.readings:
            names[r.name] += 1
            name = r.name if names[r.name] == 1 else f"{r.name}_{names[r.name]}"
            rec: dict[str, Any] = {"n": f"urn:dev:bthome:{cfg.name}:{name}", "t": now}
            if r.unit:
                rec["u"] = r.unit
            rec["vb" if isinstance(r.value, bool) else "v"] = r.value
            rec["id"] = f"{node}:{seq}:{len(records)}"
            records.append(rec)
        if records:
            # pause-intake applies (FrameError queue_full): not taken, not marked as seen
            self.ingest.take(self, Accepted(node, seq, data, records))
            self._pending_seqs.add((node, seq))
        st.last_data, st.last_at = data, now
        if not records:
            self.stats["advert_empty"] += 1

    def stored(self, frames: list[Accepted]) -> None:
        for acc in frames:
            self._pending_seqs.discard((acc.node, acc.seq))
        self.stats["third_party_readings"] += sum(len(acc.records or ()) for acc in frames)
        if self._failing:
            log.info("store: third-party adverts committed again (after %d failed commits)",
                     self._failing)
            self._failing = 0

    def lost(self, frames: list[Accepted], e: BaseException) -> None:
        # Adverts repeat: the next one carries the same values, so nothing is resent — as long
        # as that repeat is not taken for a duplicate of what was lost.
        for acc in frames:
            self._pending_seqs.discard((acc.node, acc.seq))
            st = self._by_node.get(acc.node)
            if st is not None and st.last_data == acc.cose:
                st.last_data = b""
        self.stats["store_errors"] += 1
        self._failing += 1
        if self._failing == 1:  # a full disk fails every commit: one line, the rest counted
            log.error("store: commit of %d third-party adverts failed (%s); they are taken "
                      "again when they repeat; later failures are counted in store_errors "
                      "until a commit succeeds", len(frames), e)
