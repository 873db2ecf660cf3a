"""The node's UART link: DATA frames out of the outbox, authenticated ACKs back.

The send window (node/window.py) keeps up to `window` frames in flight and resends them until
an ACK names them; this module is the transport: COBS frames with a CRC over a byte stream.
"""

import asyncio
import time

from . import frame
from .window import BAD_ACK, Window, open_ack


class UartLink(Window):
    def __init__(self, stream, node_id, key, outbox, clock, window=4, rto_ms=1000):
        super().__init__("uart", outbox, window, rto_ms)
        self.crc_errors = 0  # also counted in rx_errors: the line-noise share of them
        self._reader = asyncio.StreamReader(stream)
        self._writer = asyncio.StreamWriter(stream, {})
        self._kid = node_id.encode()
        self._key = key
        self._clock = clock
        self.commands = None  # node.commands.Commands, set by the node to answer diagnostics
        self._answers = []  # (frame type, body, after) from commands, sent by _tx

    async def run(self):
        asyncio.create_task(self._rx())
        await self._tx()

    async def _tx_round(self):
        """Answers, then the frames that are due; ms until the next one is."""
        # diagnostic answers go out first and from this task only, so frames never interleave
        while self._answers:
            ftype, body, after = self._answers.pop(0)
            self._writer.write(frame.encode(ftype, body))
            await self._writer.drain()
            if after:
                after()
        return await self._send_due(None)

    async def _transmit(self, conn, data):
        self._writer.write(frame.encode(frame.DATA, data))
        await self._writer.drain()
        return True

    async def _rx(self):
        deframer = frame.Deframer()
        while True:
            try:
                data = await self._reader.read(256)
            except Exception as e:  # noqa: BLE001 - e.g. a UART driver error: keep listening
                self._rx_failed("rx", e, " read")
                await asyncio.sleep_ms(100)
                continue
            if not data:
                await asyncio.sleep_ms(20)
                continue
            try:
                for chunk in deframer.feed(data):
                    # one frame at a time: whatever one does, the frames after it are heard
                    try:
                        self._on_chunk(chunk)
                    except Exception as e:  # noqa: BLE001 - this task must outlive any frame
                        self._rx_failed("rx", e, " frame")
            except Exception as e:  # noqa: BLE001 - the deframer itself, e.g. out of heap
                self._rx_failed("rx", e, " deframer")

    def _on_chunk(self, chunk):
        if chunk is None:
            self.rx_errors += 1
            return
        try:
            ftype, body = frame.decode(chunk)
        except frame.FrameError as e:
            self.rx_errors += 1
            if e.kind == "crc":
                self.crc_errors += 1
            return
        if ftype == frame.ACK:
            self._on_ack(body)
        elif ftype == frame.COMMAND and self.commands is not None:
            self._answers.extend(self.commands.handle(body))
            self._wake.set()

    def _on_ack(self, body):
        try:
            seqs, gw_ms, _ = open_ack(body, self._kid, self._key)
        except BAD_ACK:
            self.bad_acks += 1
            return
        self.last_ack_ms = time.ticks_ms()
        if self._acked(seqs) and isinstance(gw_ms, int):
            self._clock.set_ms(gw_ms)
        self._wake.set()
