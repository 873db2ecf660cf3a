"""Review finding 5: a BLE advert flood grew the gateway without bound and steered its scheduler.

A node's advert tag is public (SHA-256 of its id, on air). Adverts from random addresses
carrying it grew the link's per-address tables (~430 B per address), the scheduler connected
to the largest advertised backlog first (the real node ranked behind 50,000 strangers), the
status page's address for a node followed whoever claimed it last, and a scheduling pass
sorted every candidate on the event loop.

These tests drive the real BleLink (its advert callback, called with bleak's own
BLEDevice/AdvertisementData objects as the scanner would: 50,000 adverts through the virtual
radio would take minutes) and its real scheduler loop; only the GATT session is replaced by
a recorder, so "first scheduled" is what the scheduler decided. tests/ble/test_gateway.py
(test_advert_flood_does_not_keep_the_real_node_from_its_gateway) floods a gateway draining a
real node on the virtual radio, end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from lantern.agent import bthome
from lantern.agent.ingest import Ingest
from lantern.agent.links.ble import BleLink, node_tag
from lantern.agent.links.ble_config import BleLinkConfig
from lantern.agent.links.ble_session import SERVICE_UUID
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import Store

NODE, OTHER = "SL-0001", "SL-0002"
KEYS = {NODE.encode(): bytes(range(32)), OTHER.encode(): bytes(range(1, 33))}
REAL, REAL_OTHER = "F0:00:00:00:01:01", "F0:00:00:00:01:02"
FLOOD = 50_000
# what the link may keep for 2 nodes, whatever arrives: a few addresses per node, fixed-size
# counters, a few logged sources per kind of rejection
TABLE_CAP = 64
MEMORY_CAP = 1 << 20  # bytes a 50,000-address flood may add (before the fix: ~21 MB)


def lantern(tag: bytes, backlog: int) -> AdvertisementData:
    data = b"\x01" + backlog.to_bytes(2, "little") + tag
    return AdvertisementData(None, {}, {SERVICE_UUID: data}, [SERVICE_UUID], None, -60, ())


def bthome_encrypted(address: str, key: bytes, counter: int, temp_c: float = 21.5) -> bytes:
    """Encrypted BTHome v2 service data as a Lantern node sends it (bindkey from its key)."""
    objects = b"\x02" + struct.pack("<h", round(temp_c * 100))
    ctr = struct.pack("<I", counter)
    nonce = bthome.mac_bytes(address) + b"\xd2\xfc\x41" + ctr
    sealed = AESCCM(bthome.derive_bindkey(key), tag_length=4).encrypt(nonce, objects, None)
    return b"\x41" + sealed[:-4] + ctr + sealed[-4:]


def bthome_ad(data: bytes) -> AdvertisementData:
    return AdvertisementData(None, {}, {bthome.UUID: data}, [], None, -60, ())


def device(address: str) -> BLEDevice:
    return BLEDevice(address, None, None)


def addresses(rng: random.Random, n: int) -> Iterator[str]:
    for _ in range(n):
        yield ":".join(f"{b:02X}" for b in rng.randbytes(6))


class RealNode:
    """The real node's adverts: its Lantern advert and its encrypted BTHome advert, in turn."""

    def __init__(self, node: str, address: str, backlog: int = 5) -> None:
        self.node, self.address, self.backlog = node, address, backlog
        self.key = KEYS[node.encode()]
        self.counter = 100

    def advertise(self, link: BleLink) -> None:
        link._on_advert(device(self.address), lantern(node_tag(self.node), self.backlog))
        self.counter += 1
        link._on_advert(device(self.address),
                        bthome_ad(bthome_encrypted(self.address, self.key, self.counter)))


@contextlib.asynccontextmanager
async def ble_link(tmp_path: Path) -> AsyncIterator[BleLink]:
    async with Store(tmp_path / "queue.db") as store:
        ingest = Ingest(store, KEYS, Metrics())
        await ingest.start()
        yield BleLink(BleLinkConfig(), ingest, KEYS, store, tmp_path)


def table_sizes(obj: Any, path: str = "link", seen: set[int] | None = None) -> dict[str, int]:
    """The size of every container the link holds, walking into its own helper objects."""
    seen = set() if seen is None else seen
    out: dict[str, int] = {}
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    for name, value in vars(obj).items():
        where = f"{path}.{name}"
        if isinstance(value, (dict, set, list, tuple)):
            out[where] = len(value)
            items = value.values() if isinstance(value, dict) else value
            for i, item in enumerate(items):
                if type(item).__module__.startswith("lantern.agent.links"):
                    for k, v in table_sizes(item, f"{where}[{i}]", seen).items():
                        out[k] = max(out.get(k, 0), v)
                if i >= 8:
                    break
        elif (type(value).__module__.startswith("lantern.agent.links")
              and hasattr(value, "__dict__")):
            out.update(table_sizes(value, where, seen))
    return out


def traced() -> int:
    """Bytes in use (once garbage in reference cycles is collected), but for what this test
    file and tracemalloc allocate themselves (the sizes it records, its snapshots)."""
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, tracemalloc.__file__)])
    return sum(t.size for t in snap.traces)


def check_bounded(link: BleLink) -> dict[str, int]:
    sizes = table_sizes(link)
    over = {k: v for k, v in sizes.items() if v > TABLE_CAP}
    assert not over, f"tables grown by strangers' adverts: {over}"
    return sizes


async def first_scheduled(link: BleLink, n: int = 1) -> list[tuple[str, str]]:
    """The sessions the link's real scheduler starts first: (address, node), in order."""
    started: list[tuple[str, str]] = []
    enough = asyncio.Event()
    hold = asyncio.Event()  # sessions never end here: each keeps its connection slot

    async def session(addr: str, c: Any) -> None:
        started.append((addr, c.node))
        if len(started) >= n:
            enough.set()
        await hold.wait()

    link._session = session  # type: ignore[method-assign]
    task = asyncio.create_task(link._schedule())
    try:
        await asyncio.wait_for(enough.wait(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for t in list(link.sessions.values()):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
    return started


def flood(link: BleLink, rng: random.Random, n: int, real: list[RealNode], every: int = 5000,
          tag: bytes = node_tag(NODE)) -> None:
    """n adverts from random addresses carrying `tag` and the largest backlog there is; the
    real nodes keep advertising in between, as they do on air."""
    big = lantern(tag, 0xFFFF)
    for i, addr in enumerate(addresses(rng, n)):
        link._on_advert(device(addr), big)
        if i % every == 0:
            for r in real:
                r.advertise(link)


@pytest.mark.parametrize("first_seen", ["before", "during"])
async def test_tag_flood_memory_bounded_and_real_node_drained_first(
        tmp_path: Path, first_seen: str) -> None:
    rng = random.Random(5)
    real = RealNode(NODE, REAL)
    async with ble_link(tmp_path) as link:
        if first_seen == "before":
            real.advertise(link)
        tracemalloc.start()
        try:
            base = traced()
            flood(link, rng, FLOOD, [real] if first_seen == "during" else [])
            real.advertise(link)
            grown = traced() - base
        finally:
            tracemalloc.stop()
        print(f"\n{FLOOD} flooding addresses (real node first seen {first_seen}): "
              f"+{grown / 1024:.1f} KiB traced; tables {table_sizes(link)}")
        assert grown < MEMORY_CAP, f"{FLOOD} strangers' adverts grew the link by {grown} bytes"
        check_bounded(link)
        # the status page shows the address that proved itself, not the last one claiming
        assert link.snapshot()["nodes"][NODE]["address"] == REAL
        assert await first_scheduled(link) == [(REAL, NODE)]


async def test_status_address_is_never_a_claimers(tmp_path: Path) -> None:
    """Before any proof, a node has no address on the status page; a claim sets none."""
    async with ble_link(tmp_path) as link:
        liar = "DE:AD:BE:EF:00:01"
        link._on_advert(device(liar), lantern(node_tag(NODE), 9))
        assert link.snapshot()["nodes"].get(NODE, {}).get("address") != liar
        real = RealNode(NODE, REAL)
        real.advertise(link)
        link._on_advert(device(liar), lantern(node_tag(NODE), 9))
        assert link.snapshot()["nodes"][NODE]["address"] == REAL
        # a plaintext or forged BTHome advert from the liar proves nothing
        forged = bthome_encrypted(liar, bytes(32), 10_000)
        link._on_advert(device(liar), bthome_ad(forged))
        assert link.snapshot()["nodes"][NODE]["address"] == REAL
        # the real node's recorded advert played back from the liar's address fails its MIC
        # (the nonce holds the address it was sealed for)
        recorded = bthome_encrypted(REAL, real.key, 10_001)
        link._on_advert(device(liar), bthome_ad(recorded))
        assert link.snapshot()["nodes"][NODE]["address"] == REAL


async def test_backlog_claims_do_not_order_nodes(tmp_path: Path) -> None:
    """Two proven nodes: an advertised backlog orders nothing between them (only who waited
    longest does), and strangers claiming a backlog for either are not tried while the proven
    address is there."""
    async with ble_link(tmp_path) as link:
        small, large = RealNode(NODE, REAL, backlog=1), RealNode(OTHER, REAL_OTHER, 60_000)
        small.advertise(link)
        large.advertise(link)
        flood(link, random.Random(7), 2000, [small, large], every=500, tag=node_tag(OTHER))
        got = await first_scheduled(link, 2)
        assert sorted(got) == [(REAL, NODE), (REAL_OTHER, OTHER)]


async def test_third_party_and_foreign_lantern_flood(tmp_path: Path) -> None:
    """Other people's BTHome devices (plain and encrypted) and Lantern-looking adverts naming
    no node of ours, from 50,000 addresses each: counted, nothing kept."""
    rng = random.Random(9)
    real = RealNode(NODE, REAL)
    async with ble_link(tmp_path) as link:
        real.advertise(link)
        before = dict(link.stats)
        tracemalloc.start()
        try:
            base = traced()
            for i, addr in enumerate(addresses(rng, FLOOD)):
                kind = i % 4
                if kind == 0:  # someone's plain BTHome thermometer
                    data = b"\x40\x00" + bytes((i & 0xFF,)) + b"\x02" + rng.randbytes(2)
                elif kind == 1:  # someone's encrypted one (a key we do not have)
                    data = b"\x41" + rng.randbytes(14)
                if kind < 2:
                    link._on_advert(device(addr), bthome_ad(data))
                elif kind == 2:  # a Lantern advert for a node that is not ours
                    link._on_advert(device(addr), lantern(rng.randbytes(4), 0xFFFF))
                else:  # Lantern-looking garbage
                    garbage = b"\x02" + rng.randbytes(i % 9)
                    bad = AdvertisementData(None, {}, {SERVICE_UUID: garbage}, [], None, -60, ())
                    link._on_advert(device(addr), bad)
                if i % 5000 == 0:
                    real.advertise(link)
            grown = traced() - base
        finally:
            tracemalloc.stop()
        print(f"\n{FLOOD} foreign adverts: +{grown / 1024:.1f} KiB traced")
        assert grown < MEMORY_CAP
        check_bounded(link)
        d = {k: link.stats[k] - before.get(k, 0) for k in link.stats}
        assert d["adverts_foreign"] == FLOOD // 2
        assert d["rejected_unknown_node"] == FLOOD // 4
        assert d["rejected_lantern_advert"] == FLOOD // 4
        assert link.snapshot()["nodes"][NODE]["address"] == REAL
        assert await first_scheduled(link) == [(REAL, NODE)]


async def test_state_plateaus_over_rounds_of_floods(tmp_path: Path) -> None:
    """Long-running hostile traffic: round after round of fresh flooding addresses, the link's
    tables keep the same sizes and its memory stops growing after the first round."""
    rng = random.Random(11)
    real, other = RealNode(NODE, REAL), RealNode(OTHER, REAL_OTHER)
    async with ble_link(tmp_path) as link:
        real.advertise(link)
        other.advertise(link)
        tracemalloc.start()
        try:
            base = traced()
            rounds: list[int] = []
            sizes: list[dict[str, int]] = []
            for _ in range(4):
                flood(link, rng, FLOOD // 2, [real, other], tag=node_tag(NODE))
                flood(link, rng, FLOOD // 2, [real, other], tag=node_tag(OTHER))
                rounds.append(traced() - base)
                sizes.append(check_bounded(link))
        finally:
            tracemalloc.stop()
        print("\nafter each round of", FLOOD, "adverts:",
              ", ".join(f"+{g / 1024:.1f} KiB" for g in rounds))
        assert all(s == sizes[0] for s in sizes), sizes
        # after the first round, nothing more (a few hundred bytes of interpreter noise)
        assert rounds[-1] - rounds[0] < 2048, rounds
        assert await first_scheduled(link, 2) in ([(REAL, NODE), (REAL_OTHER, OTHER)],
                                                  [(REAL_OTHER, OTHER), (REAL, NODE)])
