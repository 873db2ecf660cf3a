"""The twin board's radio: a virtual controller on the tests/ble tier's bumble radio, driven by
the `bluetooth` model in the MicroPython VM (tests/esp32_twin/port/bluetooth.py).

The VM opens two connections to the bridge's abstract Unix socket: "rpc" (each line a call,
answered by a line [errno, result]) and "events" (each line [event, data], the stack's IRQs).
Calls are run on the BLE tier's `bluetooth.BLE` imitation of MicroPython's API over bumble
(tests/ble/upy/bluetooth.py), so the twin's radio behaves as the one the BLE tier tests.
Each boot (a new "rpc" connection) powers on a fresh controller at the board's address; the
VM going away (deep sleep, reset, power cut) cuts its power: adverts stop, connections drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from tests.ble import harness as ble_tier

bluetooth = ble_tier.bluetooth  # the BLE tier's MicroPython API over bumble (tests/ble/upy)

log = logging.getLogger("tests.esp32_twin.ble_bridge")
_IRQ_GATTS_WRITE = 3


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        return bytes.fromhex(v["b"]) if "b" in v else bluetooth.UUID(v["u"])
    if isinstance(v, list):
        return tuple(_dec(x) for x in v)
    return v


def _enc(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return {"b": bytes(v).hex()}
    if isinstance(v, tuple | list):
        return [_enc(x) for x in v]
    return v


class BleBridge:
    def __init__(self, link: Any, address: str, name: str) -> None:
        self.link = link
        self.address = address
        self.name = name
        self.chip: Any = None
        self.boots = 0
        self.calls = 0
        self._events: asyncio.StreamWriter | None = None
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        bluetooth.track_tasks(asyncio.get_running_loop())
        self._server = await asyncio.start_unix_server(self._client, path="\0" + self.name)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind = (await reader.readline()).strip()
        if kind == b"events":
            self._events = writer
            return
        await self._power_off()
        self.boots += 1
        self.chip = bluetooth.Chip(self.link, self.address)
        await self.chip.power_on()
        done = asyncio.Event()

        async def serve() -> None:
            ble = bluetooth.BLE()
            ble.irq(self._forward)
            try:
                while line := await reader.readline():
                    op, args, kwargs = json.loads(line)
                    self.calls += 1
                    try:
                        ret, err = getattr(ble, op)(*_dec(args), **{
                            k: _dec(v) for k, v in kwargs.items()}), 0
                    except OSError as e:
                        ret, err = None, e.errno or 5
                    writer.write(json.dumps([err, _enc(ret)]).encode() + b"\n")
            finally:
                done.set()

        self.chip.start(serve, name=f"bridge-{self.address}")
        await done.wait()  # the VM went away: its radio loses power
        await self._power_off()
        writer.close()

    def _forward(self, event: int, data: tuple[Any, ...]) -> None:
        if event == _IRQ_GATTS_WRITE and self.chip is not None and self.chip.ble is not None:
            data = (*data, self.chip.ble.gatts_read(data[1]))
        if self._events is not None and not self._events.is_closing():
            self._events.write(json.dumps([event, _enc(data)]).encode() + b"\n")

    async def _power_off(self) -> None:
        if self.chip is None:
            return
        tasks = list(self.chip.tasks)
        self.chip.power_cut()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 5)
        self.chip = None
        if self._events is not None:
            self._events.close()
            self._events = None

    async def close(self) -> None:
        await self._power_off()
        if self._server is not None:
            self._server.close()
