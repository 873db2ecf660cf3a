"""A GATT session ends when it should, even if the cancel meant for its writer is lost."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from lantern.agent.errors import FrameError
from lantern.agent.links.ble_session import NodeSession


class Char:
    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.max_write_without_response_size = 20  # the smallest ATT MTU: many segments


class Services:
    def get_characteristic(self, uuid: str) -> Char:
        return Char(uuid)


class LosingClient:
    """Stands in for BleakClient where a write's response and the writer's cancel coincide.

    CPython 3.11's `asyncio.wait_for` (under bumble's GATT requests) then returns the response
    and drops the cancel (bpo-42130); here every cancel that hits a write is dropped that way,
    so the test does not depend on winning a race.
    """

    def __init__(self) -> None:
        self.services = Services()
        self.writes = 0
        self.lost_cancels = 0
        self.delay = 0.2

    async def start_notify(self, _char: Char, _callback: Any) -> None:
        return None

    async def read_gatt_char(self, _char: Char) -> bytearray:
        return bytearray(b"\x01\x05\x00" + bytes(8))  # STATE: 5 frames, the nonce

    async def write_gatt_char(self, _char: Char, _data: bytes, response: bool) -> None:
        assert response
        self.writes += 1
        try:
            await asyncio.sleep(self.delay)  # the write's round trip
        except asyncio.CancelledError:
            self.lost_cancels += 1  # the response was in: wait_for returns it instead


def writers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "") == "NodeSession._writer"]


def session() -> NodeSession:
    def on_frame(_s: NodeSession, _t: int, _b: bytes) -> None:
        raise AssertionError("no frame was sent")

    def on_reject(_name: str, e: FrameError) -> None:
        raise AssertionError(e)

    return NodeSession("test", "SL-0001", secrets.token_bytes(32), on_frame, on_reject)


async def test_session_limit_ends_the_session_though_the_writer_lost_its_cancel() -> None:
    s, client = session(), LosingClient()
    # the start message takes a few writes of 0.2 s each: the 0.1 s limit falls in the first
    run = asyncio.create_task(s.run(client, idle_s=5, max_s=0.1))  # type: ignore[arg-type]
    await asyncio.wait({run}, timeout=10)
    assert run.done(), "the session waits for its writer (it used to, forever)"
    assert run.result() is False
    assert client.lost_cancels == 1  # the cancel did hit a write, and was lost
    assert client.writes == 1  # and the writer stopped before the next segment
    assert not writers()


async def test_an_idle_writer_is_stopped_too() -> None:
    s, client = session(), LosingClient()
    client.delay = 0.0
    run = asyncio.create_task(s.run(client, idle_s=5, max_s=0.3))  # type: ignore[arg-type]
    await asyncio.wait({run}, timeout=10)
    assert run.done() and run.result() is False
    assert client.lost_cancels == 0 and client.writes >= 2  # the start message went out whole
    assert not writers()
