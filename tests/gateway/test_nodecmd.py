"""The gateway's command channel (agent/nodecmd.py) through its real serial link to the node
firmware on MicroPython: authenticated commands, pipelined, their counters persisted."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

from lantern.agent import nodecmd, protocol
from lantern.agent.nodecmd import OK, OP_LATEST, OP_STATUS, Channel, Counters
from tests.helpers.gateway_node import node_line

pytestmark = [pytest.mark.ota, pytest.mark.micropython]


def channel(line) -> Channel:  # type: ignore[no-untyped-def]
    ch = line.link.commander
    assert isinstance(ch, Channel)
    return ch


async def test_status_and_latest_through_the_gateways_serial_link(tmp_path: Path) -> None:
    async with node_line(tmp_path) as line:
        ch = channel(line)
        await line.until(lambda: line.metrics.frames_received["SL-0001"] >= 2, 30, "two packs")
        code, st = await ch.command("SL-0001", OP_STATUS, timeout=5)
        assert code == OK and st["id"] == "SL-0001" and st["board"] == "unix-sim"
        assert st["cmd"]["accepted"] == 1
        # four at once: each REPLY matched to its command by the Partial IV
        answers = await asyncio.gather(*(ch.command("SL-0001", op, timeout=5)
                                         for op in (OP_LATEST, OP_STATUS, OP_LATEST, OP_STATUS)))
        assert [a[0] for a in answers] == [OK] * 4
        assert "outbox" in answers[1][1] and "outbox" in answers[3][1]
        assert answers[3][1]["cmd"]["accepted"] == 5
        # the newest pack still in the outbox: none, or one sealed under the node key (the
        # gateway acknowledges every pack as it is committed)
        for latest in (answers[0][1], answers[2][1]):
            assert set(latest) == {"data"}
            if latest["data"] is not None:
                m = protocol.parse_mac0(latest["data"])
                protocol.verify_mac0(line.node.key, m)
                assert m.kid == b"SL-0001"
        # DATA kept flowing and being acknowledged; REPLYs are not refused frames any more
        before = line.metrics.frames_received["SL-0001"]
        await line.until(lambda: line.metrics.frames_received["SL-0001"] > before, 30,
                         "more packs")
        assert line.metrics.frames_rejected["unexpected"] == 0
        assert ch.stats["replies"] == 5 and ch.stats["timeouts"] == 0
        assert nodecmd.route([line.link], "SL-0001") is ch


async def test_counters_persist_ahead_and_a_tool_ahead_is_overtaken(tmp_path: Path) -> None:
    async with node_line(tmp_path) as line:
        ch = channel(line)
        code, _ = await ch.command("SL-0001", OP_STATUS, timeout=5)
        assert code == OK
        path = line.state_dir / nodecmd.COUNTER_FILE
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        used = ch.counters.last["SL-0001"]
        # a restarted gateway starts above anything the old one may have used
        again = Counters(path)
        assert await again.next("SL-0001") > used + nodecmd.RESERVE - 1
        # a technician's tool (its clock an hour ahead) moved the node's floor: the gateway's
        # next command is refused as a replay, learns the floor from the STATUS and goes on
        ahead = time.time_ns() // 1_000_000 + 3_600_000
        line.relay.inject("down", nodecmd.command_frame(line.node.key, "SL-0001", ahead,
                                                        OP_STATUS))
        await line.until(lambda: ch.stats["late_replies"] >= 1, 10, "the tool's answer")
        code, st = await ch.command("SL-0001", OP_STATUS, timeout=5)
        assert code == OK and st["cmd"]["floor"] > ahead
        assert ch.stats["retries"] >= 1


async def test_forged_answers_and_a_silent_node(tmp_path: Path) -> None:
    async with node_line(tmp_path) as line:
        ch = channel(line)
        await ch.command("SL-0001", OP_STATUS, timeout=5)
        # a REPLY under another key, for a counter that is not outstanding: counted only
        forged = nodecmd.seal(b"\x01" * 32, b"SL-0001", 5, b"\xa0", protocol.REPLY)
        line.relay.inject("up", protocol.encode_frame(protocol.REPLY, forged))
        await line.until(lambda: ch.stats["bad_mac"] == 1, 10, "the forged REPLY counted")
        assert line.metrics.frames_rejected["unexpected"] == 0
        line.node.kill()  # gone quiet (power cut): the command times out with a clear error
        with pytest.raises(nodecmd.CommandTimeout, match="no answer to op 1"):
            await ch.command("SL-0001", OP_STATUS, timeout=0.5, retries=1)
        with pytest.raises(nodecmd.CommandError, match="no key"):
            await ch.command("SL-0404", OP_STATUS, timeout=0.5)
        with pytest.raises(nodecmd.NoRoute):
            nodecmd.route([line.link], "SL-0404")
