"""`lantern provision fleet --csv` end to end against two QEMU boards, broken off and resumed.

Two factory-fresh boards (hil_tests/harness/qemu.py `Board`); a CSV with one row per board, its
`port` the board's REPL pty and its `link_port` the node's link UART. The fleet run is stopped
the way an installer's run is stopped — Ctrl-C (SIGINT to its process group, mpremote
included) or a kill (SIGKILL to the group) — after row 1 is done and while row 2 is being
provisioned. The same command run again skips row 1 (its board is not touched), provisions row
2 from its first step, and leaves one current key per node in the fragment (a key of the broken
run that reached the board is retired, never kept beside the new one). Then the gateway imports
the fragment and takes both boards' sealed frames under their new keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lantern.agent.config import load_keys
from lantern.agent.registry import key_id
from lantern.tools.street.sim import gateway_toml
from lantern.tools.street.upstream import Upstream

from .harness.qemu import QEMU_BOARD, Board, Console, require_qemu

pytestmark = [pytest.mark.qemu, pytest.mark.fleet]
CLI = [sys.executable, "-m", "lantern"]
IDS = ("SL-0001", "SL-0002")


@pytest.fixture
async def boards(tmp_path: Path) -> AsyncIterator[list[Board]]:
    require_qemu()
    out: list[Board] = []
    try:
        for i, node in enumerate(IDS, 1):
            (tmp_path / f"board{i}").mkdir()
            b = Board(tmp_path / f"board{i}", street_id=node,
                      console=Console(f"board{i}-console"))
            out.append(b)
        await asyncio.gather(*(b.power_on() for b in out))
        yield out
    finally:
        for b in out:
            b.off()


def write_csv(path: Path, boards: list[Board]) -> None:
    lines = ["id,pole,location,board,port,group,link_port"]
    for i, (node, b) in enumerate(zip(IDS, boards, strict=True), 1):
        lines.append(f'{node},{i},"52.{3700 + i},4.{8900 + i}",{QEMU_BOARD},{b.console.port},'
                     f"street-7,{b.link.gateway_port}")
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Stop:
    """Where to break a fleet run off: once row 2 printed a line matching `line` (and `then`
    has returned), its process group gets `sig`."""

    line: str
    sig: signal.Signals
    then: Callable[[], Awaitable[object]] | None = None


async def fleet(csv: Path, *extra: str, stop: Stop | None = None,
                timeout: float = 240) -> tuple[int, str]:
    """Run `lantern provision fleet` as an installer does (its own session, as a terminal)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, "provision", "fleet", "--csv", str(csv), "--interval", "1",
        "--out", str(csv.parent / "stage"), *extra, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    stdout = proc.stdout
    out: list[str] = []
    seen = asyncio.Event()

    async def read() -> None:
        row2 = False
        while line := (await stdout.readline()).decode():
            out.append(line)
            row2 = row2 or line.startswith("== 2/2 ")
            if stop is not None and row2 and re.search(stop.line, line.strip()):
                seen.set()

    reader = asyncio.create_task(read())
    try:
        async with asyncio.timeout(timeout):
            if stop is not None:
                waiting = asyncio.create_task(seen.wait())
                await asyncio.wait([reader, waiting], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                assert seen.is_set(), "the run ended before the stop:\n" + "".join(out)
                if stop.then is not None:
                    await stop.then()
                os.killpg(proc.pid, stop.sig)
            await reader
            code = await proc.wait()
    finally:
        reader.cancel()
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return code, "".join(out)


def raw_repl_entries(b: Board) -> int:
    """How often an mpremote has taken the board's REPL (it announces the raw REPL)."""
    return bytes(b.console.text).count(b"raw REPL; CTRL-B to exit")


async def delivered(upstream: Upstream, node: str, frames: int, timeout: float) -> set[int]:
    """The frame sequences of `node` upstream, once there are `frames` of them."""
    deadline = time.monotonic() + timeout
    while True:
        seqs = {int(r["id"].split(":")[1]) for r in upstream.readings.values()
                if r["id"].startswith(node + ":")}
        if len(seqs) >= frames or time.monotonic() > deadline:
            return seqs
        await asyncio.sleep(0.1)


# Ctrl-C once row 2's key is made (before it leaves the laptop); a kill once row 2's deploy has
# taken the board's REPL to copy the files (the key on its way to the board)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
async def test_fleet_broken_off_in_row_2_resumes_and_the_gateway_takes_both_nodes(
        boards: list[Board], tmp_path: Path, sig: signal.Signals) -> None:
    csv = tmp_path / "nodes.csv"
    write_csv(csv, boards)
    fragment = tmp_path / "nodes.fragment.toml"
    progress_file = tmp_path / "nodes.progress.json"

    code, out = await fleet(csv, "--dry-run")  # every step of both rows, nothing done
    assert code == 0, out
    for b in boards:
        assert f"mpremote connect {b.console.port} fs cp" in out
        assert f"probe the node on {b.link.gateway_port}" in out
    assert not fragment.exists() and not progress_file.exists()
    assert not (tmp_path / "stage").exists()

    # row 1 runs to the end; row 2 is broken off
    board2 = boards[1].console
    mark = 0

    async def deploying() -> None:  # mpremote's next visit after the device probe: the deploy
        await board2.expect(rb"raw REPL; CTRL-B to exit", 30, since=mark)

    def at_key() -> Awaitable[object]:
        nonlocal mark
        mark = len(board2.text)  # the device probe is over: its REPL visit is before this
        return deploying() if sig == signal.SIGKILL else asyncio.sleep(0)

    code, out = await fleet(csv, stop=Stop(r"^\[4/10\] key: ", sig, at_key))
    progress = json.loads(progress_file.read_text())
    assert list(progress["done"]) == [IDS[0]], out
    assert re.search(r"verify: node SL-0001 answers: firmware \S+, board " + QEMU_BOARD, out)
    if sig == signal.SIGINT:
        assert code == 130, out
        assert f"{IDS[1]:<32} INTERRUPTED" in out
        assert progress["failed"] == {IDS[1]: "interrupted (Ctrl-C)"}
        assert progress["running"] is None
    else:
        assert code == -signal.SIGKILL, out
        assert "fleet report" not in out  # nothing of the run went on
        assert progress["running"]["id"] == IDS[1]  # the journal names the row it was in
    keys = load_keys(fragment)  # whole and readable: written atomically
    k1 = keys[IDS[0].encode()]
    broken = keys[IDS[1].encode()]  # row 2's key step ran before the stop
    assert "SL-0002" not in tomllib.loads(fragment.read_text()).get("meta", {})
    took_repl = raw_repl_entries(boards[0])

    code, out = await fleet(csv)  # the same command again
    assert code == 0, out
    if sig == signal.SIGKILL:
        assert f"{IDS[1]}: the last run stopped while provisioning it" in out
    assert f"{IDS[0]:<32} done before" in out and "2/2 done" in out
    assert raw_repl_entries(boards[0]) == took_repl  # row 1's board not touched again
    row2 = out[out.index("== 2/2 " + IDS[1]):]
    key_line = next(x.strip() for x in row2.splitlines() if "] key: " in x)
    assert "[1/10] check:" in row2 and "[3/10] device:" in row2  # from its first step
    assert re.search(r"verify: node SL-0002 answers: firmware \S+, board " + QEMU_BOARD, row2)
    keys = load_keys(fragment)
    assert keys[IDS[0].encode()] == k1
    k2 = keys[IDS[1].encode()]
    text = fragment.read_text()
    # one current key for SL-0002: the broken run's, kept (it never reached a node, or the node
    # holds it with its counters), or a new one with the broken run's retired by id
    if k2 != broken:
        assert f"{IDS[1]}: retired key {key_id(broken)}" in text, row2
        assert broken.hex() not in text
        assert "replaced the key of SL-0002" in row2
    else:
        assert "key: reuse the key of SL-0002" in row2, row2
    assert (tmp_path / "stage" / IDS[1] / "node.key").read_text().strip() == k2.hex()
    meta = tomllib.loads(text)["meta"]
    assert sorted(meta) == list(IDS) and meta[IDS[1]]["key_id"] == key_id(k2)
    assert meta[IDS[1]]["group"] == "street-7"
    progress = json.loads(progress_file.read_text())
    assert sorted(progress["done"]) == list(IDS) and progress["failed"] == {}
    assert progress["running"] is None
    # nothing half-written left behind: the fragment, progress and stage files are whole
    assert not [*tmp_path.glob("*.tmp"), *(tmp_path / "stage").rglob("*.tmp")]

    code, out = await fleet(csv)  # a third run: nothing left, no board touched
    assert code == 0 and "2/2 done" in out and out.count("skipped") == 2, out
    assert raw_repl_entries(boards[0]) == took_repl

    # the gateway merges the fragment and takes both nodes' sealed frames under the new keys
    state = tmp_path / "gw-state"
    state.mkdir(mode=0o700)
    keys_file = tmp_path / "gw-keys.toml"
    upstream = Upstream()
    await upstream.start()
    gw_toml = tmp_path / "gateway.toml"
    gw_toml.write_text(gateway_toml(state, keys_file, [b.link.gateway_port for b in boards],
                                    upstream.url, max_age_s=0.2))
    code, out = await lantern("gateway", "nodes", "import", str(fragment), "--config",
                              str(gw_toml))
    assert code == 0, out
    assert f"SL-0001: key {key_id(k1)} added" in out and f"SL-0002: key {key_id(k2)} added" in out
    assert load_keys(keys_file) == {IDS[0].encode(): k1, IDS[1].encode(): k2}
    log = open(tmp_path / "gateway.log", "ab")  # noqa: SIM115 - the child keeps it
    gw = subprocess.Popen([*CLI, "gateway", "run", "--config", str(gw_toml)], stdout=log,
                          stderr=subprocess.STDOUT)
    log.close()
    try:
        got = await asyncio.gather(*(delivered(upstream, n, 3, 90) for n in IDS))
        gw_log = (tmp_path / "gateway.log").read_text()
        assert all(len(s) >= 3 for s in got), (got, gw_log[-3000:], boards[1].text()[-2000:])
        assert "rejected frame" not in gw_log, gw_log[-3000:]
    finally:
        gw.terminate()
        gw.wait(20)
        await upstream.stop()
    code, out = await lantern("gateway", "nodes", "--config", str(gw_toml))
    assert code == 0, out
    for node, k in ((IDS[0], k1), (IDS[1], k2)):  # heard (silent now, with 1 s intervals)
        line = next(x for x in out.splitlines() if x.startswith(node)).split()
        assert line[1] in ("active", "silent") and key_id(k) in line, out
    print(f"{sig.name}: resumed: "
          + ("SL-0002's key replaced, the broken run's retired" if k2 != broken
             else "SL-0002's key of the broken run reused") + f" ({key_line})"
          + f"; frames upstream: {dict(zip(IDS, (len(s) for s in got), strict=True))}")


async def lantern(*args: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*CLI, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()
