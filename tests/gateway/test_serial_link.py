"""The serial link (agent/links/serial.py) on a real pty: it stops reading while the ingest
is behind, so the line pushes back, and reads again once the ingest has caught up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import time
import tty
from collections.abc import Callable

from lantern.agent.links.serial import SerialLink


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def test_reading_stops_while_intake_is_closed_and_resumes() -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    intake = asyncio.Event()
    intake.set()
    got: list[bytes] = []

    def on_data(link: SerialLink, data: bytes) -> None:
        got.append(data)
        intake.clear()  # as the ingest does when too many frames wait for a commit

    link = SerialLink(os.ttyname(slave), 115200, on_data, intake)
    task = asyncio.create_task(link.run())
    try:
        await until(lambda: link.connected)
        os.write(master, b"first")
        await until(lambda: bool(got))
        assert got == [b"first"] and link.pauses == 1
        os.write(master, b"second")
        assert link._ser is not None
        fd = link._ser.fileno()
        # the bytes are waiting on the line; a registered reader would run on the next turn
        assert select.select([fd], [], [], 20.0)[0] == [fd]
        for _ in range(5):
            await asyncio.sleep(0)
        assert got == [b"first"]
        link.send(b"ack")  # writing goes on meanwhile (ACKs of what is committed)
        link.send(b"s")
        await until(lambda: select.select([master], [], [], 0)[0] == [master])
        assert os.read(master, 100) == b"acks"
        intake.set()
        await until(lambda: len(got) == 2)
        assert got[1] == b"second" and link.pauses == 2
        intake.set()
        os.write(master, b"third")
        await until(lambda: len(got) == 3)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for fd in (master, slave):
            os.close(fd)
