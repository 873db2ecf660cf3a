"""`lantern gateway rollout start|status|halt` and `lantern diag gateway`, as processes, against
the gateway's real local API with a token (the transfer to nodes is a double)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent.ota.rollout import RolloutManager
from tests.helpers.rollout import Street, api_with_rollout, make_bundle

pytestmark = pytest.mark.ota

TOKEN = "cli-token-0123456789"


class Gateway:
    def __init__(self, url: str, token_file: Path, street: Street, manager: RolloutManager,
                 key: Ed25519PrivateKey, tmp: Path) -> None:
        self.url, self.token_file, self.street = url, token_file, street
        self.manager, self.key, self.tmp = manager, key, tmp

    async def lantern(self, *args: str) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lantern", *args, "--url", self.url,
            "--token-file", str(self.token_file), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await p.communicate()
        assert p.returncode is not None
        return p.returncode, out.decode(), err.decode()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    street = Street(gates={"SL-0002": asyncio.Event()})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    async with api_with_rollout(tmp_path, street, TOKEN, step=2) as (app, manager, key):
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            yield Gateway(str(server.make_url("/")), token_file, street, manager, key,
                          tmp_path)
        finally:
            await server.close()


async def test_start_status_halt_from_the_command_line(gw: Gateway) -> None:
    bundle = gw.tmp / "lantern-0.2.0.lub"
    bundle.write_bytes(make_bundle(gw.key))
    rc, out, err = await gw.lantern("gateway", "rollout", "start", str(bundle), "--canary",
                                    "SL-0003", "--step", "3", "--json")
    assert rc == 0, err
    ro = json.loads(out)["rollout"]
    assert ro["canary"] == ["SL-0003"] and ro["step"] == 3
    await gw.street.ev("SL-0002").wait()  # canary done; the first step under way
    rc, out, err = await gw.lantern("gateway", "rollout", "status")
    assert rc == 0, err
    assert "rollout" in out and "RUNNING" in out and "canary" in out
    assert "SL-0003" in out and "updated" in out and "transferring" in out
    rc, out, err = await gw.lantern("gateway", "rollout", "halt", "--reason", "wrong build")
    assert rc == 0, err
    assert "HALTED" in out and "halted by the operator: wrong build" in out.replace("\n", " ")
    # status of a halted rollout exits 1: a script sees it; diag names it as a note
    rc, out, _ = await gw.lantern("gateway", "rollout", "status", "--json")
    assert rc == 1 and json.loads(out)["rollout"]["state"] == "halted"
    rc, out, _ = await gw.lantern("diag", "gateway", "--json")
    rep: dict[str, Any] = json.loads(out)
    assert rep["rollout"]["state"] == "halted"
    assert any(n.startswith("rollout ") and "HALTED" in n for n in rep["notes"])
    assert {n["id"]: n["firmware"] for n in rep["nodes"]}["SL-0003"] == "0.2.0"
    assert not set(gw.street.calls) - {"SL-0003", "SL-0001", "SL-0002", "SL-0004"}


async def test_a_refused_bundle_and_a_halt_with_nothing_running_exit_1(gw: Gateway) -> None:
    other = gw.tmp / "other.lub"
    other.write_bytes(make_bundle(Ed25519PrivateKey.generate()))
    rc, out, err = await gw.lantern("gateway", "rollout", "start", str(other))
    assert rc == 1 and "other_key" in err and out == ""
    rc, _, err = await gw.lantern("gateway", "rollout", "halt")
    assert rc == 1 and "no rollout is running" in err
    rc, _, err = await gw.lantern("gateway", "rollout", "start", str(gw.tmp / "missing.lub"))
    assert rc == 2 and "missing.lub" in err
    assert gw.street.calls == []


async def test_a_halt_by_the_rollout_itself_is_a_problem_for_diag(gw: Gateway) -> None:
    gw.street.verdicts["SL-0001"] = "rolled_back"
    r = await gw.manager.start(make_bundle(gw.key))
    assert gw.manager._task is not None
    await gw.manager._task
    assert r.state == "halted"
    rc, out, _ = await gw.lantern("diag", "gateway", "--json")
    rep = json.loads(out)
    assert rc == 1 and rep["state"] == "degraded"
    assert any("canary SL-0001 rolled back" in p for p in rep["problems"]), rep["problems"]
    _, text, _ = await gw.lantern("diag", "gateway")
    assert "rolled back" in text and "SL-0001" in text
