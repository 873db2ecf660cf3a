"""Second review: the gateway's BLE side (AddressBook, proofs, sessions) against a stranger.

These drive the real BleLink (advert callback, scheduler, session, ingest) as
tests/adversarial/test_ble_flood.py does; only bleak's client is replaced, by a stranger's
GATT server written here (StrangerClient), so what the gateway writes and what it concludes
from the answers is the real code's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from lantern.agent.ingest import Ingest
from lantern.agent.links import ble as ble_mod
from lantern.agent.links.ble import BleLink, node_tag
from lantern.agent.links.ble_config import BleLinkConfig
from lantern.agent.links.ble_session import (
    CTRL_UUID,
    DATA_UUID,
    SEG_MORE,
    SERVICE_UUID,
    STATE_UUID,
    segments,
)
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import Store

pytestmark = pytest.mark.adversarial

NODE = "SL-0001"
KEYS = {NODE.encode(): bytes(range(32))}
STRANGER = "DE:AD:BE:EF:00:01"


def lantern(tag: bytes, backlog: int) -> AdvertisementData:
    data = b"\x01" + backlog.to_bytes(2, "little") + tag
    return AdvertisementData(None, {}, {SERVICE_UUID: data}, [SERVICE_UUID], None, -60, ())


class _Char:
    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.max_write_without_response_size = 244


class _Services:
    def __init__(self) -> None:
        self.chars = {u: _Char(u) for u in (DATA_UUID, CTRL_UUID, STATE_UUID)}

    def get_characteristic(self, uuid: str) -> _Char | None:
        return self.chars.get(uuid)


class StrangerClient:
    """A stranger's GATT server as the gateway's BleakClient sees it: it has no key. It serves
    a STATE with a backlog and a nonce, and plays whatever the gateway writes to CTRL back on
    DATA with the DATA type byte (an echo: it needs to understand nothing)."""

    instances: list[StrangerClient] = []

    def __init__(self, device: BLEDevice, disconnected_callback: Any = None,
                 **kwargs: Any) -> None:  # BleakClient's own signature
        self.device = device
        self.services = _Services()
        self.mtu_size = 247
        self._notify: dict[str, Any] = {}
        self._buf = bytearray()
        self.written: list[bytes] = []
        self.echoed = 0
        StrangerClient.instances.append(self)

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    async def start_notify(self, char: _Char, cb: Any) -> None:
        self._notify[char.uuid] = cb

    async def read_gatt_char(self, char: _Char) -> bytearray:
        return bytearray(b"\x01\x05\x00" + bytes(8))  # version 1, backlog 5, a nonce

    async def write_gatt_char(self, char: _Char, seg: bytes, response: bool = True) -> None:
        self._buf += seg[1:]
        if seg[0] & SEG_MORE:
            return
        msg, self._buf = bytes(self._buf), bytearray()
        self.written.append(msg)
        if msg[:1] == b"\x02":  # an ACK (the start ACK): back it goes, as a DATA frame
            echo = b"\x01" + msg[1:]
            for s in segments(echo, 244):
                self._notify[DATA_UUID](self.services.chars[DATA_UUID], bytearray(s))
            self.echoed += 1
            # and now "drained", so the session ends at once
            self._notify[STATE_UUID](self.services.chars[STATE_UUID],
                                     bytearray(b"\x01\x00\x00" + bytes(8)))


@contextlib.asynccontextmanager
async def ble_link(tmp_path: Path) -> AsyncIterator[BleLink]:
    async with Store(tmp_path / "queue.db") as store:
        ingest = Ingest(store, KEYS, Metrics())
        await ingest.start()
        yield BleLink(BleLinkConfig(), ingest, KEYS, store, tmp_path)


async def test_echoed_start_ack_proves_a_strangers_address(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's start ACK is a COSE_Mac0 under the node key with the same layout and the
    same (empty) external AAD as a DATA frame, Partial IV 0. A stranger claiming a node that has
    no proven address on air (a node not yet heard since the gateway started, one with plain or
    no BTHome adverts, one that has not delivered a frame to this gateway yet) is connected as a
    claimer, is written a start ACK, and notifies it straight back as DATA: the gateway (before
    the fix: BleLink._fresh_frame) found it authentic and new, and the stranger's address
    became the node's proven address, shown on the status page; ingest kept the echo as a dead
    letter under the node's name. An echo of what the gateway itself wrote must prove nothing,
    and is refused (`reflected`), never kept."""
    StrangerClient.instances.clear()
    monkeypatch.setattr(ble_mod, "BleakClient", StrangerClient)
    async with ble_link(tmp_path) as link:
        # the stranger advertises the node's public tag with a backlog: a claimer
        link._on_advert(BLEDevice(STRANGER, None, None), lantern(node_tag(NODE), 5))
        sched = asyncio.create_task(link._schedule())
        try:
            for _ in range(100):
                await asyncio.sleep(0.05)
                if StrangerClient.instances and StrangerClient.instances[0].echoed \
                        and not link.sessions:
                    break
        finally:
            sched.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sched
        assert StrangerClient.instances and StrangerClient.instances[0].echoed, \
            "the gateway never wrote a start ACK to the claimer"
        c = link.book.get(STRANGER)
        shown = link.snapshot()["nodes"].get(NODE, {}).get("address")
        assert shown != STRANGER and not (c is not None and link.book.is_proven(c)), (
            f"a keyless stranger echoing the gateway's own start ACK proved itself as {NODE}: "
            f"status page address {shown}, stats {dict(link.stats)}, dead letters "
            f"{link.ingest.metrics.dead_letters}")
        m = link.ingest.metrics
        assert (m.dead_letters, m.frames_rejected["reflected"]) == (0, 1)
        assert not m.frames_received and NODE not in m.nodes  # not "seen", not counted as its
