"""A small aioble-like layer over MicroPython's `bluetooth.BLE`, peripheral role only.

The BLE stack calls `_irq` from its own context (a scheduled callback on ESP32): it only
records what happened and sets a ThreadSafeFlag; the link's asyncio task does the work. The
`bluetooth` module is handed in by the HAL, so nothing here imports hardware modules.
"""

import asyncio

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_IRQ_CENTRAL_CONNECT = const(1)
_IRQ_CENTRAL_DISCONNECT = const(2)
_IRQ_GATTS_WRITE = const(3)
_IRQ_MTU_EXCHANGED = const(21)

FLAG_READ = const(0x0002)
FLAG_WRITE = const(0x0008)
FLAG_NOTIFY = const(0x0010)

ATT_DEFAULT_MTU = const(23)
_MAX_QUEUED_WRITES = const(16)  # writes waiting for the task; more means a misbehaving peer
_NOTIFY_TRIES = const(50)  # ~1 s of waiting for a free TX buffer before giving up

# Events handed from the IRQ to the task
CONNECT = const(1)
DISCONNECT = const(2)
WRITE = const(3)


class Connection:
    """A central connected to us: its handle, address, negotiated ATT MTU and nonce."""

    def __init__(self, handle, addr):
        self.handle = handle
        self.addr = addr
        self.mtu = ATT_DEFAULT_MTU
        self.connected = True
        self.nonce = None  # set by the link: binds a drain's start to this connection


class Peripheral:
    def __init__(self, bt, mtu=247, name=None):
        self._bt = bt
        ble = bt.BLE()
        ble.active(True)
        # our preferred ATT MTU: the central asks, the stack answers min(its, ours)
        ble.config(mtu=mtu)
        if name:
            ble.config(gap_name=name)
        ble.irq(self._irq)
        self.ble = ble
        self.connections = {}
        self._events = []
        self._flag = asyncio.ThreadSafeFlag()
        self.lost_writes = 0
        self.notify_retries = 0

    def mac(self):
        """Our address, 6 bytes in display order."""
        return bytes(self.ble.config("mac")[1])

    def register(self, service_uuid, chars):
        """Register one service; chars is ((uuid, flags), ...); returns their value handles."""
        bt = self._bt
        defs = ((bt.UUID(service_uuid), tuple((bt.UUID(u), f) for u, f in chars)),)
        return self.ble.gatts_register_services(defs)[0]

    def set_buffer(self, value_handle, size):
        """Incoming writes longer than the buffer (20 bytes by default) would be truncated."""
        self.ble.gatts_set_buffer(value_handle, size, False)

    def write_local(self, value_handle, data):
        self.ble.gatts_write(value_handle, data)

    def advertise(self, adv_data, interval_us, connectable=True):
        self.ble.gap_advertise(interval_us, adv_data, connectable=connectable)

    def stop_advertising(self):
        self.ble.gap_advertise(None)

    def disconnect(self, handle):
        try:
            self.ble.gap_disconnect(handle)
        except OSError:
            pass

    def _irq(self, event, data):
        if event == _IRQ_CENTRAL_CONNECT:
            conn = Connection(data[0], bytes(data[2]))
            self.connections[conn.handle] = conn
            self._events.append((CONNECT, conn, None))
        elif event == _IRQ_CENTRAL_DISCONNECT:
            conn = self.connections.pop(data[0], None)
            if conn is not None:
                conn.connected = False
                self._events.append((DISCONNECT, conn, None))
        elif event == _IRQ_GATTS_WRITE:
            conn = self.connections.get(data[0])
            if conn is None:
                return
            # read now: the next write to the same handle overwrites the stack's buffer
            if len(self._events) < _MAX_QUEUED_WRITES:
                self._events.append((WRITE, conn, (data[1], bytes(self.ble.gatts_read(data[1])))))
            else:
                self.lost_writes += 1
        elif event == _IRQ_MTU_EXCHANGED:
            conn = self.connections.get(data[0])
            if conn is not None:
                conn.mtu = data[1]
        else:
            return
        self._flag.set()

    async def events(self):
        """Wait for, then return, the (kind, connection, detail) events since the last call."""
        while not self._events:
            await self._flag.wait()
        out = self._events
        self._events = []
        return out

    async def notify(self, conn, value_handle, data):
        """Send one notification; True once the stack took it, False if the link went away."""
        for _ in range(_NOTIFY_TRIES):
            if not conn.connected:
                return False
            try:
                self.ble.gatts_notify(conn.handle, value_handle, data)
                return True
            except OSError:
                # no free TX buffer (NimBLE: ENOMEM) while the radio catches up
                self.notify_retries += 1
                await asyncio.sleep_ms(20)
        return False
