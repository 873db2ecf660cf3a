"""Finding 2: unauthenticated bytes must not deafen a node (the real firmware, on MicroPython).

A security review fed a node ACK frames whose bodies were CBOR allocation bombs (indefinite
strings of ~1000 empty chunks, deep and wide arrays, maps keyed by NaN, huge declared
lengths). The node decoded them before checking their MAC, ran out of heap at the board's
size, and the MemoryError ended the UART link's receive task: the node kept sampling but never
heard an ACK or a command again. Here the whole node runs as on the simulated board (its heap,
its pty UART, its simulated street); this test takes the gateway's place on the line, sends
the bombs as ACK and COMMAND frames in several bursts, and then requires the node to obey a
genuine command after every burst and a genuine ACK at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.tools.field import nodelink as nl
from lantern.tools.street.sim import MICROPYTHON, Relay, SimNode
from tests.helpers.bombs import bombs

pytestmark = pytest.mark.micropython

NODE = "SL-0001"
ROUNDS = 4
MAX_SEQS_PER_ACK = 32  # docs/protocol.md, Delivery






def bursts() -> list[list[tuple[int, bytes]]]:
    """Every bomb as an ACK and as a COMMAND, back to back in groups the simulated line's
    FIFO (tools/street/sim.py LINE_BUFFER) carries whole."""
    out: list[list[tuple[int, bytes]]] = [[]]
    size = 0
    for body in bombs():
        if size + 2 * len(body) > 3000:
            out.append([])
            size = 0
        out[-1] += [(protocol.ACK, body), (protocol.COMMAND, body)]
        size += 2 * len(body)
    return out


class Line:
    """The gateway's end of the node's line: frames the node sent, decoded."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.deframer = protocol.Deframer()
        self.data: dict[int, bytes] = {}  # seq -> DATA body
        self.replies: list[int] = []  # counters of REPLYs that verify under the node key
        self.status: dict[Any, Any] = {}  # the result of the latest status REPLY
        self.statuses = 0

    def answered(self, counter: int) -> Callable[[], bool]:
        return lambda: counter in self.replies

    def tap(self, direction: str, data: bytes) -> None:
        if direction != "up":
            return
        for chunk in self.deframer.feed(data):
            try:
                ftype, body = protocol.decode_frame(chunk or b"")
            except FrameError:
                continue
            if ftype == protocol.DATA:
                self.data[protocol.parse_mac0(body).seq] = body
            elif ftype == protocol.REPLY:
                with contextlib.suppress(FrameError, ValueError):
                    _, counter, payload = nl.unseal(self.key, body, protocol.REPLY)
                    self.replies.append(counter)
                    if payload.get(1) == nl.OP_STATUS:
                        self.status = payload[3]
            elif ftype == protocol.STATUS:
                self.statuses += 1


async def wait_for(cond: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; node log:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        await asyncio.sleep(0.05)


def outbox(node: SimNode) -> set[int]:
    d = node.state_dir / "outbox"
    return {int(p.name) for p in d.iterdir() if p.name.isdigit()} if d.exists() else set()


async def test_uart_node_survives_allocation_bombs_and_hears_the_next_ack(
        tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    node = SimNode(NODE, tmp_path, interval_ms=500, extra={"sample_limit": 6})
    line = Line(node.key)
    relay = Relay(NODE, tap=line.tap)
    relay.start()
    node.port = relay.node_port
    log = tmp_path / "node.log"
    counter = int(time.time() * 1000)
    try:
        with open(log, "wb") as out:
            node.start(stdout=out.fileno())  # at the board's heap (boards/unix-sim.json)
        line.key = node.key
        await wait_for(lambda: len(line.data) >= 3, 60, "three DATA frames", log)
        sent = 0
        for rnd in range(ROUNDS):
            for group in bursts():
                for ftype, body in group:
                    relay.inject("down", protocol.encode_frame(ftype, body))
                sent += len(group) // 2
                # a genuine command after every burst: the receive path must still be there
                counter += 1
                relay.inject("down", nl.command_frame(node.key, NODE, counter, nl.OP_STATUS))
                await wait_for(line.answered(counter), 30,
                               f"the REPLY to a genuine command in round {rnd + 1}", log)
                # every bomb reached the node and was counted where it belongs (as a bad ACK,
                # a refused command), none as an unexpected failure
                link, cmd = line.status["link"], line.status["cmd"]
                assert (link["bad_acks"], cmd["refused"], link["rx_failures"]) == (
                    sent, sent, 0), (link, cmd)
        seqs = sorted(line.data)[:MAX_SEQS_PER_ACK]
        assert set(seqs) & outbox(node), "nothing left to acknowledge"
        relay.inject("down", protocol.encode_ack(node.key, NODE.encode(), seqs,
                                                 int(time.time() * 1000)))
        await wait_for(lambda: not set(seqs) & outbox(node), 30,
                       "the genuine ACK to empty the outbox of the frames it names", log)
        assert node.proc is not None and node.proc.poll() is None, "the node died"
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "MemoryError" not in text, text[-3000:]
    finally:
        node.close()
        relay.close()
