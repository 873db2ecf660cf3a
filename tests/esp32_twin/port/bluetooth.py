"""The esp32 port's `bluetooth` (peripheral subset): the board's radio is a virtual controller on
the bumble radio of the tests/ble tier, driven by a CPython bridge (tests/esp32_twin/ble_bridge.py).

Two sockets to the bridge (its path: file `ble`): calls go out on one and wait for their answer;
the stack's events come back on the other, and a task of this VM's asyncio loop hands them to
the handler given to irq(), as the port's scheduler would. A write's value travels with its
event and is kept here, so gatts_read() in the handler answers at once, as NimBLE's buffer does.
"""

import json as _json
import socket as _socket

import _twin

FLAG_READ = 2
FLAG_WRITE_NO_RESPONSE = 4
FLAG_WRITE = 8
FLAG_NOTIFY = 16
FLAG_INDICATE = 32

_AF_UNIX = 1
_ble = None


def _connect(kind):
    s = _socket.socket(_AF_UNIX, _socket.SOCK_STREAM)
    # the bridge's abstract Unix socket: sockaddr_un with a leading NUL, as sim/wire.py does
    s.connect(bytes([_AF_UNIX, 0, 0]) + _twin.read("ble"))
    s.write(kind + b"\n")
    return s


def _enc(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"b": bytes(v).hex()}
    if isinstance(v, UUID):
        return {"u": v._v}
    if isinstance(v, (tuple, list)):
        return [_enc(x) for x in v]
    return v


def _dec(v):
    if isinstance(v, dict):
        return bytes.fromhex(v["b"])
    if isinstance(v, list):
        return tuple(_dec(x) for x in v)
    return v


class UUID:
    def __init__(self, value):
        self._v = value

    def __eq__(self, other):
        return isinstance(other, UUID) and other._v == self._v


class BLE:
    def __new__(cls):
        global _ble
        if _ble is None:
            _ble = super().__new__(cls)
            _ble._setup()
        return _ble

    def __init__(self):
        pass

    def _setup(self):
        self._rpc = _connect(b"rpc")
        self._handler = None
        self._values = {}
        self._pump = None

    def _call(self, op, *args, **kwargs):
        self._rpc.write(_json.dumps([op, _enc(args), _enc(kwargs)]).encode() + b"\n")
        err, ret = _json.loads(self._rpc.readline())
        if err:
            raise OSError(err)
        return _dec(ret)

    def active(self, active=None):
        return self._call("active") if active is None else self._call("active", active)

    def config(self, param=None, **kwargs):
        if param is not None:
            return self._call("config", param)
        return self._call("config", **kwargs)

    def irq(self, handler):
        self._handler = handler
        if self._pump is None:
            import asyncio

            self._pump = asyncio.create_task(self._events())

    async def _events(self):
        import asyncio

        s = _connect(b"events")
        reader = asyncio.StreamReader(s)
        while True:
            line = await reader.readline()
            if not line:
                return  # the bridge went away: the radio is off
            event, data = _json.loads(line)
            data = _dec(data)
            if event == 3:  # _IRQ_GATTS_WRITE: (conn, handle, value) on the wire
                self._values[data[1]] = data[2]
                data = data[:2]
            if self._handler is not None:
                self._handler(event, data)

    def gatts_register_services(self, services_definition):
        return self._call("gatts_register_services", services_definition)

    def gatts_set_buffer(self, value_handle, len, append=False):
        self._call("gatts_set_buffer", value_handle, len, append)

    def gatts_read(self, value_handle):
        return self._values.get(value_handle, b"")

    def gatts_write(self, value_handle, data, send_update=False):
        self._values[value_handle] = bytes(data)
        self._call("gatts_write", value_handle, bytes(data), send_update)

    def gatts_notify(self, conn_handle, value_handle, data=None):
        self._call("gatts_notify", conn_handle, value_handle, None if data is None else bytes(data))

    def gap_advertise(self, interval_us, adv_data=None, *, resp_data=None, connectable=True):
        self._call("gap_advertise", interval_us, adv_data, resp_data=resp_data,
                   connectable=connectable)

    def gap_disconnect(self, conn_handle):
        return self._call("gap_disconnect", conn_handle)
