"""agent/ota/transfer.py push() through the gateway's real serial link to the firmware on
MicroPython's unix port: a whole update, a resume after a power cut mid-transfer, refusals.

Bundles are real: `lantern release keygen` / `build` from this firmware tree.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lantern.agent.nodecmd import Channel
from lantern.agent.ota.transfer import Outcome, TransferStats, push, split
from lantern.tools.field import provision_steps as ps
from lantern.tools.field import release
from tests.helpers.gateway_node import node_line

pytestmark = [pytest.mark.ota, pytest.mark.micropython]

NODE = "SL-0001"
BOARD = "unix-sim-lite"
NODE_EXTRA = {"update_trial_s": 30}


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("release")
    cli = [sys.executable, "-m", "lantern", "release"]
    subprocess.run([*cli, "keygen", "--out", str(d / "rel")], check=True, capture_output=True)
    subprocess.run([*cli, "build", "--key", str(d / "rel.pem"), "--version", "2.0.0",
                    "--security-floor", "1", "--board", BOARD, "--out", str(d / "2.lub")],
                   check=True, capture_output=True)
    key = release.load_private(d / "rel.pem")
    found = ps.mpy_cross_version(ps.find_mpy_cross())
    assert found is not None
    return {"key": key, "pub": key.public_key().public_bytes_raw(), "mpy": found[1],
            "files": release.firmware_files(ps.find_mpy_cross(), [BOARD]),
            "v2": (d / "2.lub").read_bytes()}


def commander(line: Any) -> Channel:
    ch = line.link.commander
    assert isinstance(ch, Channel)
    return ch


async def test_push_updates_a_node_while_its_packs_keep_flowing(tmp_path: Path,
                                                                 rel: dict[str, Any]) -> None:
    async with node_line(tmp_path, board=BOARD, release_pub=rel["pub"],
                         extra=NODE_EXTRA) as line:
        await line.until(lambda: line.metrics.frames_received[NODE] >= 1, 30, "a first pack")
        before = line.metrics.frames_received[NODE]
        stats = TransferStats()
        out = await push(commander(line), NODE, rel["v2"], stats=stats, confirm_s=120)
        assert out == Outcome(NODE, "updated", None, "2.0.0", "runs 2.0.0"), (
            out.detail, line.output()[-3000:])
        area = len(split(rel["v2"]).files)
        assert stats.bytes_sent >= area and stats.chunks_sent >= area // 768
        assert stats.outcomes["updated"] == 1 and not stats.refusals
        assert line.boots == 2  # one reboot, into the candidate
        # packs were taken while chunks went down the same line, and none was refused
        assert line.metrics.frames_received[NODE] > before
        assert line.metrics.frames_rejected["unexpected"] == 0


async def test_push_resumes_after_a_power_cut_mid_transfer(tmp_path: Path,
                                                           rel: dict[str, Any]) -> None:
    async with node_line(tmp_path, board=BOARD, release_pub=rel["pub"],
                         extra=NODE_EXTRA) as line:
        area = len(split(rel["v2"]).files)
        stats = TransferStats()
        task = asyncio.create_task(push(commander(line), NODE, rel["v2"], stats=stats,
                                        timeout=2.0, confirm_s=120))
        await line.until(lambda: stats.bytes_sent > area // 2, 120, "half the bundle sent")
        line.node.kill()  # power cut: the gateway hears nothing for a while
        await asyncio.sleep(3.0)  # the outage itself (not a synchronisation)
        line.start_node()
        out = await task
        assert out.status == "updated" and out.version == "2.0.0", (out, line.output()[-3000:])
        assert stats.resumes >= 1
        # taken up from the node's `have`, not from the start
        assert stats.bytes_sent < 2 * area, (stats, area)


@pytest.mark.parametrize("case", ["other_board", "other_key", "flipped"])
async def test_a_refusal_reaches_the_outcome(tmp_path: Path, rel: dict[str, Any],
                                             case: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate() if case == "other_key" else rel["key"]
    boards = ["esp32-devkitc"] if case == "other_board" else [BOARD]
    bundle = bytearray(release.bundle(key, "2.0.1", 1, "0.1.0", boards, rel["mpy"],
                                      rel["files"]))
    if case == "flipped":
        bundle[-100] ^= 0x01  # in the last file: its hash fails when it completes
    async with node_line(tmp_path, board=BOARD, release_pub=rel["pub"],
                         extra=NODE_EXTRA) as line:
        stats = TransferStats()
        out = await push(commander(line), NODE, bytes(bundle), stats=stats, confirm_s=30)
        expect = {"other_board": "other_board", "other_key": "other_key", "flipped": "file"}
        assert (out.status, out.reason) == ("refused", expect[case]), (out, line.output()[-2000:])
        assert stats.refusals[expect[case]] >= 1 and stats.outcomes["refused"] == 1
        assert line.boots == 1  # never rebooted into anything
