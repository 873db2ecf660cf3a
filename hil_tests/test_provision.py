"""`lantern provision node` end to end against the emulated QEMU board (mps2-an385).

A factory-fresh board (its littlefs lives in QEMU's RAM) boots to the REPL; the CLI, run as
an installer runs it, creates the key, writes the config, deploys with mpremote over the
board's REPL UART, soft-resets it and reads the node's status over its link UART. Then a real
gateway, given the key file the CLI wrote and the [nodes] table it printed, must receive the
node's readings under the new key.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lantern.agent.config import load_keys
from lantern.tools.field import provision_steps as ps
from lantern.tools.street.sim import Relay, gateway_toml
from lantern.tools.street.upstream import Upstream

from .harness.qemu import Board, Console, require_qemu

pytestmark = pytest.mark.qemu
CLI = [sys.executable, "-m", "lantern"]


@pytest.fixture
async def board(tmp_path: Path) -> AsyncIterator[Board]:
    require_qemu()
    b = Board(tmp_path)
    await b.power_on()
    try:
        yield b
    finally:
        b.off()


async def lantern(*args: str, timeout: float = 240) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*CLI, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def provision_args(b: Board, tmp: Path, *extra: str) -> list[str]:
    return ["provision", "node", "--board", "qemu-mps2-an385", "--id", "SL-0042", "--pole",
            "42", "--location", "52.3702,4.8952", "--interval", "1", "--port", b.console.port,
            "--link-port", b.link.gateway_port, "--keys", str(tmp / "keys.toml"),
            "--out", str(tmp / "stage"), *extra]


def seq_start(out: str) -> int:
    """Where the CLI said the new key's frame sequence starts (review finding 4)."""
    m = re.search(r"the new key's frame sequence starts at (\d+): (.+)$", out, re.M)
    assert m, out
    return int(m.group(1))


def nodes_table(out: str) -> str:
    """The [nodes."ID"] table the CLI told the installer to give the gateway."""
    m = re.search(r'^\s*(\[nodes\."SL-0042"\]\n(?:\s*\w+ = .+\n)+)', out, re.M)
    assert m, out
    return "\n".join(line.strip() for line in m.group(1).splitlines()) + "\n"


async def test_provisioned_node_reaches_the_gateway_under_its_new_key(
        board: Board, tmp_path: Path) -> None:
    # a dry run says everything it would do and does none of it
    code, out, err = await lantern(*provision_args(board, tmp_path, "--dry-run"))
    assert code == 0, out + err
    assert "mpremote connect " + board.console.port + " fs cp" in out
    assert "dry run: nothing changed" in out
    assert not (tmp_path / "keys.toml").exists() and not (tmp_path / "stage").exists()

    t0 = time.monotonic()
    code, out, err = await lantern(*provision_args(board, tmp_path))
    assert code == 0, out + err + board.text()[-2000:]
    took = time.monotonic() - t0
    keys_file = tmp_path / "keys.toml"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    key = load_keys(keys_file)[b"SL-0042"]
    assert (tmp_path / "stage/node.key").read_text().strip() == key.hex()
    cfg = json.loads((tmp_path / "stage/node.json").read_text())
    assert cfg["pole"] == "42" and cfg["location"] == [52.3702, 4.8952]
    assert cfg["interval_ms"] == 1000 and cfg["link"] == {"port": "uart1", "baud": 115200}
    assert re.search(r"verify: node SL-0042 answers: firmware \S+, board qemu-mps2-an385", out)
    assert "lantern node SL-0042 firmware" in board.text()  # its console, after the reset
    # a new key's sequence starts above the clock floor (Unix ms): 13 digits on a 32-bit VM
    start = seq_start(out)
    assert start >= int((time.time() - took - 60) * 1000)
    assert f"next seq {start}" in board.text(), board.text()[-2000:]

    # the gateway, given what the installer was told, gets the readings
    upstream = Upstream()
    await upstream.start()
    gw_toml = tmp_path / "gateway.toml"
    gw_toml.write_text(gateway_toml(tmp_path / "gw-state", keys_file, [board.link.gateway_port],
                                    upstream.url, max_age_s=0.2) + "\n" + nodes_table(out))
    code, check, err = await lantern("gateway", "check-config", "--config", str(gw_toml))
    assert code == 0, check + err
    log = open(tmp_path / "gateway.log", "ab")  # noqa: SIM115 - the child keeps it
    gw = subprocess.Popen([*CLI, "gateway", "run", "--config", str(gw_toml)], stdout=log,
                          stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ours = [r for r in upstream.readings.values() if r["id"].startswith("SL-0042:")]
            if len({r["id"].split(":")[1] for r in ours}) >= 3:
                break
            await asyncio.sleep(0.1)
        assert len({r["id"].split(":")[1] for r in ours}) >= 3, (
            (tmp_path / "gateway.log").read_text()[-3000:] + board.text()[-2000:])
        assert {r["n"] for r in ours} >= {"urn:dev:lantern:SL-0042:temperature",
                                          "urn:dev:lantern:SL-0042:uptime"}
        assert min(int(r["id"].split(":")[1]) for r in ours) == start
        gw_log = (tmp_path / "gateway.log").read_text()
        assert "rejected frame" not in gw_log, gw_log[-3000:]
    finally:
        gw.terminate()
        gw.wait(20)
        await upstream.stop()
    print(f"provisioning took {took:.1f} s;",
          next(line for line in out.splitlines() if "verify:" in line))


async def test_compiled_firmware_runs_on_the_board(board: Board, tmp_path: Path) -> None:
    # the image has the firmware frozen; deployed .mpy files come first on sys.path ('')
    code, out, err = await lantern(*provision_args(board, tmp_path, "--firmware", "mpy"))
    assert code == 0, out + err + board.text()[-2000:]
    m = re.search(r"compile: compiled (\d+) modules with (\S+) \((\S+)\)", out)
    assert m and int(m.group(1)) >= 10 and m.group(3).startswith("1.25"), out
    assert (tmp_path / "stage/node/commands.mpy").exists()
    print(next(line for line in out.splitlines() if "verify:" in line))
    code, out, err = await lantern("diag", "node", "--port", board.link.gateway_port, "--keys",
                                   str(tmp_path / "keys.toml"), "--json", "--timeout", "5")
    rep = json.loads(out)
    assert rep["identity"]["verified"] and rep["identity"]["board"] == "qemu-mps2-an385"
    assert rep["status"]["fw_file"] == "node/report.mpy"  # not the frozen node/report.py
    assert rep["status"]["cfg"]["pole"] == "42"


async def test_a_failed_step_says_how_to_resume(board: Board, tmp_path: Path) -> None:
    args = provision_args(board, tmp_path)
    bad = [*args[:args.index("--port") + 1], "/dev/ttyNOPE", *args[args.index("--port") + 2:]]
    code, out, err = await lantern(*bad)
    assert code == 1
    assert "step device failed: mpremote on /dev/ttyNOPE" in err, err
    assert "what to do:" in err
    m = re.search(r"resume with: lantern (.+ --from device)$", err, re.M)
    assert m, err
    # the key waits until the node has been seen: what it holds decides whether one is reused
    assert not (tmp_path / "keys.toml").exists()
    resume = shlex.split(m.group(1).replace("/dev/ttyNOPE", board.console.port))
    code, out, err = await lantern(*resume)
    assert code == 0, out + err
    assert "[4/10] key: added a key for SL-0042" in out
    assert "flash: skipped (--from device)" in out
    assert "verify: node SL-0042 answers" in out


async def test_a_wiped_board_is_given_a_new_key(board: Board, tmp_path: Path) -> None:
    """Review finding 4: a key is reused only where the node still holds its counters."""
    code, out, err = await lantern(*provision_args(board, tmp_path))
    assert code == 0, out + err + board.text()[-2000:]
    first = load_keys(tmp_path / "keys.toml")[b"SL-0042"]
    first_start = seq_start(out)
    # again on the same board: the node shows the counters it bound to that key
    code, out, err = await lantern(*provision_args(board, tmp_path))
    assert code == 0, out + err + board.text()[-2000:]
    assert "key: reuse the key of SL-0042" in out and "with its counters" in out, out
    assert "frame sequence starts at" not in out  # the node's counters go on
    assert load_keys(tmp_path / "keys.toml")[b"SL-0042"] == first
    # the board loses its filesystem (QEMU's littlefs lives in RAM): its counters restart
    used = [int(n) for n in re.findall(r"sample seq=(\d+)", board.text())]
    assert used and min(used) >= first_start, board.text()[-2000:]
    board.off()
    board.console = Console("board-console")
    board.link = Relay("board-link")
    await board.power_on()
    args = provision_args(board, tmp_path)
    code, out, err = await lantern(*args, "--keep-key")
    assert code == 1 and "--keep-key refused: the node has no Lantern state" in err, err
    code, out, err = await lantern(*args)
    assert code == 0, out + err + board.text()[-2000:]
    second = load_keys(tmp_path / "keys.toml")[b"SL-0042"]
    assert second != first and "replaced the key of SL-0042" in out, out
    assert f"retired key {ps.key_id(first)}" in (tmp_path / "keys.toml").read_text()
    assert first.hex() not in (tmp_path / "keys.toml").read_text()
    assert "verify: node SL-0042 answers" in out
    # and the wiped node counts on above every number it used under its old key
    assert seq_start(out) > max(used)
    assert f"next seq {seq_start(out)}" in board.text(), board.text()[-2000:]
