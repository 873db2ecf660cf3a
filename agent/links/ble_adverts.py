"""What the gateway does with BTHome adverts: replay checks, latest values, third-party readings.

Lantern nodes' adverts are informational (their readings arrive authenticated over GATT), but
an encrypted advert carries a 32-bit counter that must only grow: a counter at or below the
highest accepted one is a replay (a repeat of the very same advert, which radios send many
times, is a duplicate and ignored quietly). Unlike BTHome receivers that accept any counter
below 100 after a "reset", nothing here forgets: the highest counters are kept on disk, and
nodes never reuse one (node/link_ble.py reserves them in flash).

Third-party BTHome sensors named in the configuration become readings, committed to the
queue with their replay window in the same transaction (node `bthome:<name>`, sequence =
the encryption counter; plain adverts get gateway-assigned sequence numbers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import bthome
from ..config import BleDeviceConfig
from ..errors import FrameError
from ..store import Accepted, Store, Window

log = logging.getLogger("lantern.link.ble")


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


class ThirdParty:
    """Configured BTHome sensors → readings in the queue, group-committed."""

    def __init__(self, devices: tuple[BleDeviceConfig, ...], store: Store, repeat_s: float,
                 stats: Counter[str], wake: Callable[[], None], metrics: Any) -> None:
        self.devices = {d.address.upper(): _DeviceState(d) for d in devices}
        self.store = store
        self.repeat_s = repeat_s
        self.stats = stats
        self._wake_sinks = wake
        self._metrics = metrics
        self.windows: dict[str, Window] = {}
        self._pending: list[Accepted] = []
        self._pending_seqs: set[tuple[str, int]] = set()
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self.windows = {n: w for n, w in (await self.store.windows()).items()
                        if n.startswith("bthome:")}

    def handles(self, address: str) -> bool:
        return address.upper() in self.devices

    def on_advert(self, address: str, data: bytes) -> None:
        """One advert's service data; raises FrameError for a rejected one."""
        st = self.devices[address.upper()]
        cfg = st.cfg
        node = f"bthome:{cfg.name}"
        adv = bthome.decode(data, bthome.mac_bytes(address), cfg.bindkey)
        now = time.time()
        w = self.windows.setdefault(node, Window())
        high = max([w.high, *(s for n, s in self._pending_seqs if n == node)])
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
        st.last_data, st.last_at = data, now
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
        if not records:
            self.stats["advert_empty"] += 1
            return
        self._pending.append(Accepted(node, seq, data, records))
        self._pending_seqs.add((node, seq))
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._pending = self._pending, []
            windows = {n: Window(w.high, w.bits) for n, w in self.windows.items()}
            for acc in batch:
                windows.setdefault(acc.node, Window()).mark(acc.seq)
            try:
                await self.store.commit(batch, windows)
            except Exception as e:
                # adverts repeat: the next one carries the same values; nothing to resend
                self.stats["store_errors"] += 1
                log.error("store: commit of %d third-party adverts failed (%s)", len(batch), e)
                await asyncio.sleep(1.0)
                continue
            finally:
                for acc in batch:
                    self._pending_seqs.discard((acc.node, acc.seq))
            self.windows.update(windows)
            n = sum(len(acc.records or ()) for acc in batch)
            self.stats["third_party_readings"] += n
            with contextlib.suppress(AttributeError):
                self._metrics.readings_stored += n
            self._wake_sinks()
