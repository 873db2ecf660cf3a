"""`lantern diag node --ble`: COMMAND / REPLY / STATUS frames over the Lantern GATT service.

The node's CTRL characteristic takes `type | body` messages cut into segments, its DATA
characteristic notifies answers the same way (docs/ble.md). This transport turns them into
the UART's framing and back, so a NodeSession works unchanged over either link. It never
writes an ACK: the node only drains its outbox to a key holder that asks with one. The node
keeps a central that is not draining it for `pull_timeout_ms` after its last accepted command
(10 s by default); a dropped connection is reported as such, not as a silent node.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.agent.links.ble import node_tag
from lantern.agent.links.ble_session import (
    CTRL_UUID,
    DATA_UUID,
    SERVICE_UUID,
    Reassembler,
    segments,
)
from lantern.tools.field.nodelink import DiagError

ADDRESS = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")  # \Z: "$" lets "\n" follow


class BleTransport:
    """One GATT connection to the node named by address or node id (its advert's tag)."""

    def __init__(self, target: str, scan_s: float = 15.0, backend: tuple[Any, Any] | None = None
                 ) -> None:
        self.target = target
        self.name = f"BLE {target}"
        self.scan_s = scan_s
        self.rssi: int | None = None
        self.address: str | None = None
        self._scanner_backend: Any = backend[0] if backend else None
        self._client_backend: Any = backend[1] if backend else None
        self._client: BleakClient | None = None
        self._q: asyncio.Queue[bytes] = asyncio.Queue()
        self._rx = Reassembler()
        self._deframer = protocol.Deframer()
        self._writes: asyncio.Queue[bytes] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._gone = asyncio.Event()
        self._why = ""

    def _matches(self, device: BLEDevice, adv: AdvertisementData) -> bool:
        if ADDRESS.match(self.target):
            return device.address.upper() == self.target.upper()
        data = adv.service_data.get(SERVICE_UUID)
        return data is not None and len(data) >= 7 and bytes(data[3:7]) == node_tag(self.target)

    async def open(self) -> None:
        found: asyncio.Future[BLEDevice] = asyncio.get_running_loop().create_future()

        def seen(device: BLEDevice, adv: AdvertisementData) -> None:
            if not found.done() and self._matches(device, adv):
                self.rssi = adv.rssi
                found.set_result(device)

        kw = {"backend": self._scanner_backend} if self._scanner_backend else {}
        scanner = BleakScanner(detection_callback=seen, **kw)
        try:
            await scanner.start()
        except (OSError, BleakError) as e:  # no BlueZ / D-Bus here, adapter off or missing
            raise DiagError(f"Bluetooth is not usable on this machine ({type(e).__name__}: "
                            f"{e}): is BlueZ installed and running (`systemctl status "
                            "bluetooth`), and an adapter present and on (`bluetoothctl show`)?"
                            ) from None
        try:
            device = await asyncio.wait_for(found, self.scan_s)
        except TimeoutError:
            raise DiagError(f"no Lantern node {self.target} heard over BLE in {self.scan_s:g} s: "
                            "is it powered and within range? is its link configured for BLE? "
                            "is Bluetooth on here (`bluetoothctl show`)?") from None
        finally:
            await scanner.stop()
        self.address = device.address
        self.name = f"BLE {self.target} ({device.address}, RSSI {self.rssi} dBm)"
        kw = {"backend": self._client_backend} if self._client_backend else {}
        client = BleakClient(device, disconnected_callback=self._dropped, **kw)
        try:
            # bumble (tests) can hang on a vanished peer: always bound the connect
            await asyncio.wait_for(client.connect(), 20)
            await client.start_notify(DATA_UUID, self._notified)
        except (TimeoutError, OSError, Exception) as e:
            with contextlib.suppress(Exception):
                await client.disconnect()
            raise DiagError(f"{self.name}: could not connect ({type(e).__name__}: {e}); "
                            "another central (the gateway) may hold its only connection") from None
        self._client = client
        self._writer = asyncio.create_task(self._write_loop())

    def _dropped(self, _client: BleakClient | None = None, why: str = "") -> None:
        if not self._gone.is_set():
            self._why = why or (
                f"{self.name}: the node dropped the connection (it lets a central that drains "
                "nothing stay for its pull_timeout_ms, 10 s by default, after each accepted "
                "command; or it went out of range or rebooted): run the command again")
            self._gone.set()

    def _notified(self, _char: Any, seg: bytearray) -> None:
        try:
            msg = self._rx.feed(bytes(seg))
        except FrameError:
            return  # a broken message: the session times out and asks again
        if msg:
            self._q.put_nowait(protocol.encode_frame(msg[0], msg[1:]))

    def send(self, data: bytes) -> None:
        """UART-framed bytes from the session: each frame becomes one segmented message."""
        if self._gone.is_set():
            raise DiagError(self._why)
        for chunk in self._deframer.feed(data):
            if chunk is None:
                continue
            ftype, body = protocol.decode_frame(chunk)
            if ftype == protocol.ACK:
                raise DiagError("a diagnostic tool never acknowledges")  # see module docstring
            self._writes.put_nowait(bytes((ftype,)) + body)

    async def _write_loop(self) -> None:
        assert self._client is not None
        size = max(self._client.mtu_size - 3, 20)
        while True:
            msg = await self._writes.get()
            try:
                for seg in segments(msg, size):
                    await self._client.write_gatt_char(CTRL_UUID, seg, response=True)
            except Exception as e:  # said by the next recv, not lost in a timeout
                if self._client.is_connected:
                    self._dropped(why=f"{self.name}: a write to the node failed "
                                  f"({type(e).__name__}: {e})")
                else:
                    self._dropped()
                return

    async def recv(self, timeout: float) -> bytes:
        if self._q.empty() and self._gone.is_set():
            raise DiagError(self._why)
        get = asyncio.ensure_future(self._q.get())
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({get, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        if self._gone.is_set():
            raise DiagError(self._why)
        raise TimeoutError

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), 10)
            self._client = None
