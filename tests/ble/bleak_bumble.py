"""A bleak backend on bumble, for tests: the gateway's bleak code unchanged on a virtual radio.

`Adapter` is the gateway's HCI adapter: one bumble controller + host on the LocalLink.
`adapter.backend()` gives the (scanner, client) backend classes bound to it, for
`BleakScanner(backend=...)` / `BleakClient(backend=...)`. What BlueZ does for a bleak user is
done here too: the ATT MTU is exchanged on connect and the GATT database is discovered before
`connect()` returns. Faults an adapter shows in the field can be injected: refused scan
starts and connects, and the adapter vanishing (no adverts, no connections) and returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from typing import Any

from bleak.assigned_numbers import CHARACTERISTIC_PROPERTIES
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError
from bumble import core, hci
from bumble.controller import Controller
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt_client import CharacteristicProxy
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

MAX_MTU = 517  # what BlueZ asks for


def _uuid(u: core.UUID) -> str:
    return str(uuidlib.UUID(bytes=u.to_bytes(force_128=True)[::-1]))


def parse_ad(data: bytes) -> AdvertisementData:
    """Raw advertising data → bleak's AdvertisementData (what BlueZ would report)."""
    name = None
    service_data: dict[str, bytes] = {}
    uuids: list[str] = []
    manufacturer: dict[int, bytes] = {}
    tx_power = None
    i = 0
    while i < len(data):
        n = data[i]
        if n == 0 or i + 1 + n > len(data):
            break
        kind, value = data[i + 1], data[i + 2:i + 1 + n]
        i += 1 + n
        if kind in (0x08, 0x09):
            name = value.decode("utf-8", "replace")
        elif kind == 0x16 and len(value) >= 2:
            service_data[_uuid(core.UUID.from_bytes(value[:2]))] = bytes(value[2:])
        elif kind == 0x21 and len(value) >= 16:
            service_data[_uuid(core.UUID.from_bytes(value[:16]))] = bytes(value[16:])
        elif kind in (0x02, 0x03):
            uuids += [_uuid(core.UUID.from_bytes(value[j:j + 2])) for j in range(0, len(value), 2)]
        elif kind in (0x06, 0x07):
            uuids += [_uuid(core.UUID.from_bytes(value[j:j + 16]))
                      for j in range(0, len(value), 16)]
        elif kind == 0xFF and len(value) >= 2:
            manufacturer[int.from_bytes(value[:2], "little")] = bytes(value[2:])
        elif kind == 0x0A and value:
            tx_power = int.from_bytes(value[:1], "little", signed=True)
    return AdvertisementData(name, manufacturer, service_data, uuids, tx_power, -50, ())


class CancellingController(Controller):
    """bumble's controller, with LE Create Connection Cancel as the Core spec has it.

    bumble 0.0.236 answers the cancel and does nothing: the connect request stays pending, so a
    connect to an address nobody advertises (a stranger's, in an advert flood) never ends and
    every later connect is refused (COMMAND_DISALLOWED). A controller drops the request and
    reports LE Connection Complete with Unknown Connection Identifier (Vol 4 Part E 7.8.13).
    """

    def on_hci_le_create_connection_cancel_command(
            self, command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> hci.HCI_StatusReturnParameters:
        pending = self.pending_le_connection
        if pending is None:
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        self.pending_le_connection = None
        failed = hci.HCI_LE_Connection_Complete_Event(
            status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR, connection_handle=0,
            role=hci.Role.CENTRAL, peer_address_type=pending.peer_address_type,
            peer_address=pending.peer_address, connection_interval=0, peripheral_latency=0,
            supervision_timeout=0, central_clock_accuracy=0)
        # sent after the Command Complete that this return value becomes
        asyncio.get_running_loop().call_soon(self.send_hci_packet, failed)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)


class Adapter:
    """The gateway's radio on the virtual link, with fault injection."""

    def __init__(self, link: LocalLink, address: str = "F0:00:00:00:00:99") -> None:
        self.link = link
        self.controller = CancellingController("gateway", link=link)
        self.device = Device(address=Address(address),
                             host=Host(self.controller, AsyncPipeSink(self.controller)))
        self._powered = False
        self.fail_scan_starts = 0  # refuse this many scanner starts (e.g. BlueZ NotReady)
        self.fail_connects = 0  # refuse this many connects
        self.present = True
        self.scan_starts = 0
        self.connects = 0
        self.max_concurrent = 0  # most connections this adapter held at once
        self._open: set[int] = set()

    async def power_on(self) -> None:
        if not self._powered:
            await self.device.power_on()
            self._powered = True

    def vanish(self) -> None:
        """The adapter goes away (USB unplugged, firmware crash): nothing on air reaches us."""
        self.present = False
        if self.controller in self.link.controllers:
            self.link.remove_controller(self.controller)

    def come_back(self) -> None:
        self.present = True
        self.link.add_controller(self.controller)

    def backend(self) -> tuple[type[BaseBleakScanner], type[BaseBleakClient]]:
        adapter = self
        return (type("BumbleScanner", (BumbleScanner,), {"adapter": adapter}),
                type("BumbleClient", (BumbleClient,), {"adapter": adapter}))


class BumbleScanner(BaseBleakScanner):
    adapter: Adapter

    def __init__(self, detection_callback: Any, service_uuids: list[str] | None,
                 scanning_mode: str = "active", **kwargs: Any) -> None:
        super().__init__(detection_callback, service_uuids)
        self._active = scanning_mode == "active"
        self._scanning = False

    async def start(self) -> None:
        a = self.adapter
        if a.fail_scan_starts > 0:
            a.fail_scan_starts -= 1
            raise BleakError("org.bluez.Error.NotReady: Resource Not Ready")
        if not a.present:
            raise BleakError("org.bluez.Error.NotReady: adapter hci0 not present")
        await a.power_on()
        self.seen_devices = {}
        a.device.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
        await a.device.start_scanning(active=self._active, filter_duplicates=False)
        self._scanning = True
        a.scan_starts += 1

    async def stop(self) -> None:
        a = self.adapter
        a.device.remove_listener(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
        if self._scanning:
            self._scanning = False
            await a.device.stop_scanning()

    def _on_advertisement(self, adv: Advertisement) -> None:
        data = parse_ad(adv.data_bytes)
        data = data._replace(rssi=adv.rssi, platform_data=(adv,))
        address = str(adv.address).split("/")[0]
        device = self.create_or_update_device(address, address, data.local_name, adv.address,
                                              data)
        if self.is_allowed_uuid(data.service_uuids or list(data.service_data)):
            self.call_detection_callbacks(device, data)


class BumbleClient(BaseBleakClient):
    adapter: Adapter

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(address_or_ble_device,
                         disconnected_callback=kwargs.pop("disconnected_callback", None),
                         timeout=kwargs.pop("timeout", 10.0))
        self._conn: Connection | None = None
        self._peer: Peer | None = None
        self._proxies: dict[int, CharacteristicProxy[bytes]] = {}

    @property
    def name(self) -> str:
        return self.address

    @property
    def mtu_size(self) -> int:
        return self._conn.att_mtu if self._conn is not None else 23

    @property
    def is_connected(self) -> bool:
        return self._conn is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        a = self.adapter
        if a.fail_connects > 0:
            a.fail_connects -= 1
            raise BleakError("org.bluez.Error.Failed: le-connection-abort-by-local")
        if not a.present:
            raise BleakError("org.bluez.Error.NotReady: adapter hci0 not present")
        await a.power_on()
        try:
            # bumble cancels the request after the timeout (CancellingController ends it);
            # bounded here too, as the gateway bounds it
            conn = await asyncio.wait_for(
                a.device.connect(Address(self.address), timeout=self._timeout),
                self._timeout + 5.0)
        except (TimeoutError, core.BaseBumbleError) as e:
            raise BleakError(f"connect to {self.address} failed: {e!r}") from e
        if a.device.connections.get(conn.handle) is not conn:
            # already gone: the link failed to be established (Disconnection Complete 0x3E)
            raise BleakError(f"connect to {self.address} failed: device disconnected")
        self._conn = conn
        a.connects += 1
        a._open.add(id(conn))
        a.max_concurrent = max(a.max_concurrent, len(a._open))
        conn.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        try:
            peer = Peer(conn)
            await peer.request_mtu(MAX_MTU)
            await peer.discover_services()
            services = BleakGATTServiceCollection()
            for s in peer.services:
                bs = BleakGATTService(s, s.handle, _uuid(s.uuid))
                services.add_service(bs)
                for c in await s.discover_characteristics():
                    props = [name for bit, name in CHARACTERISTIC_PROPERTIES.items()
                             if c.properties & bit]
                    bc = BleakGATTCharacteristic(c, c.handle, _uuid(c.uuid), props,
                                                 lambda: self.mtu_size - 3, bs)
                    services.add_characteristic(bc)
                    self._proxies[c.handle] = c
                    for d in await peer.discover_descriptors(c):
                        services.add_descriptor(BleakGATTDescriptor(d, d.handle, _uuid(d.type),
                                                                    bc))
            self._peer = peer
            self.services = services
        except asyncio.CancelledError:
            # bumble cancels the pending GATT request when the link drops (as a node that
            # missed the connect request makes it): that is a failed connect, as BlueZ
            # reports it; only a cancel of this task itself goes on as a cancel
            task = asyncio.current_task()
            if self._conn is conn or (task is not None and task.cancelling()):
                raise
            raise BleakError(f"failed to discover services on {self.address}, "
                             "device disconnected") from None
        except (core.BaseBumbleError, TimeoutError) as e:
            await self.disconnect()
            raise BleakError(f"GATT setup with {self.address} failed: {e!r}") from e

    def _on_disconnection(self, _reason: int) -> None:
        conn, self._conn = self._conn, None
        self.adapter._open.discard(id(conn))
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    async def disconnect(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._disconnected_callback = None  # bleak calls it for unsolicited disconnects only
        with contextlib.suppress(core.BaseBumbleError, TimeoutError):
            await asyncio.wait_for(conn.disconnect(), 5.0)
        self.adapter._open.discard(id(conn))
        self._conn = None

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    async def unpair(self) -> None:
        raise NotImplementedError

    def _proxy(self, characteristic: BleakGATTCharacteristic) -> CharacteristicProxy[bytes]:
        if self._conn is None:
            raise BleakError("Not connected")
        return self._proxies[characteristic.handle]

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, *,
                             use_cached: bool = False, **kwargs: Any) -> bytearray:
        try:
            return bytearray(await self._proxy(characteristic).read_value())
        except core.BaseBumbleError as e:
            raise BleakError(f"read failed: {e!r}") from e

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, *,
                                   use_cached: bool = False, **kwargs: Any) -> bytearray:
        raise NotImplementedError

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any,
                              response: bool) -> None:
        try:
            await self._proxy(characteristic).write_value(bytes(data), with_response=response)
        except core.BaseBumbleError as e:
            raise BleakError(f"write failed: {e!r}") from e

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        raise NotImplementedError

    async def start_notify(self, characteristic: BleakGATTCharacteristic,
                           callback: NotifyCallback, **kwargs: Any) -> None:
        try:
            await self._proxy(characteristic).subscribe(lambda v: callback(bytearray(v)))
        except core.BaseBumbleError as e:
            raise BleakError(f"subscribe failed: {e!r}") from e

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        try:
            await self._proxy(characteristic).unsubscribe()
        except core.BaseBumbleError as e:
            raise BleakError(f"unsubscribe failed: {e!r}") from e
