"""MicroPython's `bluetooth` module (peripheral subset) on a bumble virtual controller.

The firmware's BLE code (node/ble.py, node/link_ble.py) runs on CPython against this, on the
same virtual radio (bumble LocalLink) as the gateway. What it imitates, as documented for
MicroPython 1.25 and its NimBLE port: `BLE()` is one object per chip; IRQs carry
(conn_handle, addr_type, addr) / (conn_handle, value_handle) / (conn_handle, mtu); a write
buffer holds 20 bytes until gatts_set_buffer enlarges it (longer writes are truncated);
gatts_notify sends whether or not the peer subscribed, and raises OSError(ENOMEM) while the
stack's TX buffers are full. The chip is chosen by the running asyncio task's context (see
`Chip.start`), so several nodes can share one process and one radio.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from bumble import gatt
from bumble.controller import Controller
from bumble.core import UUID as BumbleUUID
from bumble.device import AdvertisingType, Connection, Device
from bumble.hci import Address, Role
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

log = logging.getLogger("tests.ble.bluetooth")

FLAG_BROADCAST = 0x0001
FLAG_READ = 0x0002
FLAG_WRITE_NO_RESPONSE = 0x0004
FLAG_WRITE = 0x0008
FLAG_NOTIFY = 0x0010
FLAG_INDICATE = 0x0020

_IRQ_CENTRAL_CONNECT = 1
_IRQ_CENTRAL_DISCONNECT = 2
_IRQ_GATTS_WRITE = 3
_IRQ_MTU_EXCHANGED = 21

DEFAULT_WRITE_BUFFER = 20  # MicroPython's default gatts buffer
TX_BUFFERS = 8  # notifications the stack holds before gatts_notify raises ENOMEM

_current: contextvars.ContextVar[Chip] = contextvars.ContextVar("bluetooth_chip")


class UUID:
    def __init__(self, value: int | str | bytes) -> None:
        if isinstance(value, int):
            self._u = BumbleUUID.from_16_bits(value)
        else:
            self._u = BumbleUUID(value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UUID) and self._u == other._u

    def __hash__(self) -> int:
        return hash(self._u)

    def __repr__(self) -> str:
        return f"UUID({str(self._u)!r})"


class Chip:
    """One virtual BLE controller + host on the radio: what a node's ESP32 radio is here."""

    def __init__(self, link: LocalLink, address: str) -> None:
        self.address = address
        self.controller = Controller(f"node-{address}", link=link)
        self.device = Device(address=Address(address),
                             host=Host(self.controller, AsyncPipeSink(self.controller)))
        self.ble: BLE | None = None
        self.link = link
        self.tasks: set[asyncio.Task[Any]] = set()  # everything the firmware runs on this chip

    async def power_on(self) -> None:
        await self.device.power_on()

    def start(self, coro_fn: Callable[[], Coroutine[Any, Any, Any]],
              name: str | None = None) -> asyncio.Task[Any]:
        """Run firmware code as a task for which `bluetooth.BLE()` is this chip."""
        ctx = contextvars.copy_context()
        ctx.run(_current.set, self)
        return asyncio.get_running_loop().create_task(coro_fn(), name=name, context=ctx)

    def power_cut(self) -> None:
        """The node loses power: its code stops wherever it is and its radio goes silent.

        Connections are not closed: the peer finds out by its own timeouts, as on air.
        """
        for t in list(self.tasks):
            t.cancel()
        c = self.controller
        c.le_legacy_advertiser.stop()
        for adv in c.advertising_sets.values():
            adv.stop()
        c.send_advertising_pdu = lambda _packet: None  # type: ignore[method-assign]
        if c in self.link.controllers:
            self.link.remove_controller(c)


def track_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Make every task created by firmware code (or by the stack on its behalf) belong to its
    chip, so a power cut can stop them all. Chip.start's context names the chip."""

    def factory(loop: asyncio.AbstractEventLoop, coro: Any,
                context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, context=context)
        chip = (context.get(_current) if context is not None else _current.get(None))
        if chip is not None:
            chip.tasks.add(task)
            task.add_done_callback(chip.tasks.discard)
        return task

    loop.set_task_factory(factory)


class BLE:
    def __new__(cls) -> BLE:
        chip = _current.get(None)
        if chip is None:
            raise OSError(errno.ENODEV, "no virtual chip for this task (use Chip.start)")
        if chip.ble is None:
            obj = super().__new__(cls)
            obj._setup(chip)
            chip.ble = obj
        return chip.ble

    def _setup(self, chip: Chip) -> None:
        self._chip = chip
        self._dev = chip.device
        self._active = False
        self._handler: Callable[[int, tuple[Any, ...]], None] | None = None
        self._values: dict[int, bytes] = {}
        self._bufsize: dict[int, int] = {}
        self._chars: dict[int, gatt.Characteristic[Any]] = {}
        self._conns: dict[int, Connection] = {}
        self._mtu = 23
        self._name = "MPY BTSTACK"
        self._ops: asyncio.Queue[Coroutine[Any, Any, Any]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._queued_notifies = 0
        self._dev.on(Device.EVENT_CONNECTION, self._on_connection)

    # -- the stack's own work, in order, off the caller's path (as a real controller) ------

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._worker is not None and self._worker.done():
            # the stack went away (the test is ending) while the firmware still runs: nothing
            # will run this, and unawaited it would warn in whichever test collects it
            coro.close()
            return
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        self._ops.put_nowait(coro)

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        try:
            while True:
                coro = await self._ops.get()
                try:
                    await coro
                except Exception as e:  # a real stack reports these as events too
                    log.debug("%s: stack operation failed: %r", self._chip.address, e)
                if me.cancelling():
                    return  # some bumble operations swallow the cancellation: honour it here
        finally:
            # the stack is going away (the test's loop ends): operations still queued never
            # ran, and must be closed, or each warns "coroutine was never awaited" at exit
            while not self._ops.empty():
                self._ops.get_nowait().close()

    def _irq(self, event: int, data: tuple[Any, ...]) -> None:
        if self._handler is not None:
            self._handler(event, data)

    # -- API -------------------------------------------------------------------------------

    def active(self, flag: bool | None = None) -> bool:
        if flag is not None:
            self._active = bool(flag)
        return self._active

    def config(self, *names: str, **values: Any) -> Any:
        for k, v in values.items():
            if k == "mtu":
                self._mtu = int(v)
                self._dev.gatt_server.max_mtu = int(v)
            elif k == "gap_name":
                self._name = v.decode() if isinstance(v, bytes) else str(v)
            else:
                raise ValueError(f"unknown config param {k!r}")
        if names:
            (name,) = names
            if name == "mac":
                return (1, bytes.fromhex(self._chip.address.replace(":", "")))
            if name == "mtu":
                return self._mtu
            if name == "gap_name":
                return self._name.encode()
            raise ValueError(f"unknown config param {name!r}")
        return None

    def irq(self, handler: Callable[[int, tuple[Any, ...]], None]) -> None:
        self._handler = handler

    def gatts_register_services(self, services: Any) -> tuple[tuple[int, ...], ...]:
        out = []
        for service_uuid, chars in services:
            made = []
            for char_uuid, flags, *_ in chars:
                made.append(self._characteristic(char_uuid, flags))
            self._dev.add_service(gatt.Service(service_uuid._u, made))
            handles = tuple(c.handle for c in made)
            for c in made:
                self._chars[c.handle] = c
                self._values.setdefault(c.handle, b"")
                self._bufsize.setdefault(c.handle, DEFAULT_WRITE_BUFFER)
            out.append(handles)
        return tuple(out)

    def _characteristic(self, uuid: UUID, flags: int) -> gatt.Characteristic[Any]:
        props = gatt.Characteristic.Properties(flags & 0xFF)
        perms = gatt.Characteristic.Permissions(0)
        if flags & FLAG_READ:
            perms |= gatt.Characteristic.READABLE
        if flags & (FLAG_WRITE | FLAG_WRITE_NO_RESPONSE):
            perms |= gatt.Characteristic.WRITEABLE
        holder: list[gatt.Characteristic[Any]] = []

        def read(_conn: Connection) -> bytes:
            return self._values.get(holder[0].handle, b"")

        def write(conn: Connection, value: bytes) -> None:
            h = holder[0].handle
            # the stack keeps only what fits the buffer: longer writes arrive truncated
            self._values[h] = bytes(value[: self._bufsize.get(h, DEFAULT_WRITE_BUFFER)])
            self._irq(_IRQ_GATTS_WRITE, (conn.handle, h))

        char = gatt.Characteristic(uuid._u, props, perms, gatt.CharacteristicValue(read, write))
        holder.append(char)
        return char

    def gatts_read(self, value_handle: int) -> bytes:
        return self._values[value_handle]

    def gatts_write(self, value_handle: int, data: bytes, send_update: bool = False) -> None:
        self._values[value_handle] = bytes(data)

    def gatts_set_buffer(self, value_handle: int, length: int, append: bool = False) -> None:
        self._bufsize[value_handle] = int(length)

    def gatts_notify(self, conn_handle: int, value_handle: int, data: bytes | None = None) -> None:
        conn = self._conns.get(conn_handle)
        if conn is None:
            raise OSError(errno.ENOTCONN, "not connected")
        if self._queued_notifies >= TX_BUFFERS:
            raise OSError(errno.ENOMEM, "no TX buffer")
        value = self._values[value_handle] if data is None else bytes(data)
        self._queued_notifies += 1
        self._submit(self._notify(conn, self._chars[value_handle], value))

    async def _notify(self, conn: Connection, char: gatt.Characteristic[Any], value: bytes) -> None:
        try:
            # force: MicroPython's gatts_notify does not check the peer's CCCD either
            await self._dev.notify_subscriber(conn, char, value, force=True)
        finally:
            self._queued_notifies -= 1

    def gap_advertise(self, interval_us: int | None, adv_data: bytes | None = None, *,
                      resp_data: bytes | None = None, connectable: bool = True) -> None:
        if interval_us is None:
            self._submit(self._dev.stop_advertising())
            return
        kind = (AdvertisingType.UNDIRECTED_CONNECTABLE_SCANNABLE if connectable
                else AdvertisingType.UNDIRECTED)
        ms = interval_us / 1000
        self._submit(self._dev.start_advertising(
            advertising_type=kind, advertising_data=adv_data, scan_response_data=resp_data,
            advertising_interval_min=ms, advertising_interval_max=ms))

    def gap_disconnect(self, conn_handle: int) -> bool:
        conn = self._conns.get(conn_handle)
        if conn is None:
            return False
        self._submit(conn.disconnect())
        return True

    # -- events from the controller ---------------------------------------------------------

    def _on_connection(self, conn: Connection) -> None:
        if conn.role != Role.PERIPHERAL:
            return
        h = conn.handle
        self._conns[h] = conn
        addr = bytes.fromhex(str(conn.peer_address).split("/")[0].replace(":", ""))

        def gone(_reason: int) -> None:
            self._conns.pop(h, None)
            self._irq(_IRQ_CENTRAL_DISCONNECT, (h, 1, addr))

        conn.on(Connection.EVENT_DISCONNECTION, gone)
        conn.on(Connection.EVENT_CONNECTION_ATT_MTU_UPDATE,
                lambda: self._irq(_IRQ_MTU_EXCHANGED, (h, conn.att_mtu)))
        self._irq(_IRQ_CENTRAL_CONNECT, (h, 1, addr))
