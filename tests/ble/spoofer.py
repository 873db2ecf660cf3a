"""A device that claims to be a Lantern node and plays back frames it recorded on air."""

from __future__ import annotations

import asyncio
from typing import Any

from bumble import gatt
from bumble.device import Connection

from lantern.agent.links.ble import node_tag
from lantern.agent.links.ble_session import (
    CTRL_UUID,
    DATA_UUID,
    SERVICE_UUID,
    STATE_UUID,
    segments,
)


class Spoofer:
    """A device that claims to be a Lantern node and plays back frames it recorded on air."""

    def __init__(self, chip: Any, node: str, frames: list[bytes], nonce: bytes = b"") -> None:
        self.chip = chip
        self.node = node
        self.frames = frames
        self.sent = 0
        self.writes = 0
        props = gatt.Characteristic.Properties
        self.data = gatt.Characteristic(DATA_UUID, props.NOTIFY, gatt.Characteristic.READABLE,
                                        b"")
        ctrl = gatt.Characteristic(CTRL_UUID, props.WRITE, gatt.Characteristic.WRITEABLE,
                                   gatt.CharacteristicValue(write=self._on_write))
        state = gatt.Characteristic(STATE_UUID, props.READ | props.NOTIFY,
                                    gatt.Characteristic.READABLE,
                                    bytes((1, len(frames) & 0xFF, len(frames) >> 8)) + nonce)
        chip.device.add_service(gatt.Service(SERVICE_UUID, [self.data, ctrl, state]))

    def _on_write(self, conn: Connection, _value: bytes) -> None:
        self.writes += 1
        if self.writes == 1:
            asyncio.get_running_loop().create_task(self._play(conn))

    async def _play(self, conn: Connection) -> None:
        for body in self.frames:
            for seg in segments(bytes((1,)) + body, conn.att_mtu - 3):
                await self.chip.device.notify_subscriber(conn, self.data, seg, force=True)
            self.sent += 1

    async def advertise(self) -> None:
        n = len(self.frames)
        data = (bytes.fromhex(SERVICE_UUID.replace("-", ""))[::-1]
                + bytes((1, n & 0xFF, n >> 8)) + node_tag(self.node))
        ad = b"\x02\x01\x06" + bytes((len(data) + 1, 0x21)) + data
        await self.chip.device.start_advertising(advertising_data=ad, advertising_interval_min=50,
                                                 advertising_interval_max=50)
