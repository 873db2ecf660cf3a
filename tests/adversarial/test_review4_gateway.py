"""Fourth review, gateway side, beyond the reviewer's own tests (test_review4_ota.py): a node
that answers every command and never comes further cannot hold a transfer for the rollout's
whole node timeout, and `lantern gateway rollout start` says what the API answered when the
answer is not JSON (a bundle over the limit, a failure in the gateway).

The transfer tests talk to a node double at the command channel (the channel's own answers,
decoded): a node that keeps answering without progress is a firmware or flash fault the real
node cannot be made to show on demand. The command-line tests run the real command as a
process against the gateway's real API (tests/helpers/rollout.py).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent import nodecmd
from lantern.agent.ota.rollout import BUNDLE_MAX, RolloutManager
from lantern.agent.ota.transfer import IDLE_ROUNDS, TransferStats, push, split
from lantern.tools.field import release
from tests.helpers.rollout import Street, api_with_rollout, make_bundle

pytestmark = [pytest.mark.ota]

NODE = "SL-0001"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(7, 39)))
BACKOFF = 0.01


def bundle() -> bytes:
    """A bundle whose file area is 8 chunks (the node double does not check it)."""
    files = [("main.py", b"import node\n"), ("node/app.mpy", bytes(6000))]
    return release.bundle(KEY, "2.0.0", 0, "0.1.0", ["unix-sim"], (6, 3), files)


class Node:
    """A node's command channel that answers every command as `fault` says.

    fault: "same_have" (every CHUNK answered with the node's `have`, nothing taken),
    "no_offer" (every CHUNK refused: the node forgot the offer), "incomplete" (it holds every
    byte, and every APPLY is refused: incomplete), "lossy" (the first copy of every third chunk
    is lost, so the gateway resends from `have`; every other chunk is taken), None (a node
    that takes everything)."""

    def __init__(self, data: bytes, fault: str | None) -> None:
        b = split(data)
        self.head, self.total, self.fault = b.head, len(b.files), fault
        self.have = self.total if fault == "incomplete" else 0
        self.ops: list[int] = []
        self.lost: set[int] = set()

    async def command(self, node_id: str, op: int, args: dict[int, Any] | None = None,
                      timeout: float = 5.0, *, retries: int = 2) -> tuple[int, Any]:
        assert node_id == NODE
        self.ops.append(op)
        args = args or {}
        await asyncio.sleep(0)  # an answer comes from the line, later
        if op == nodecmd.OP_UPDATE_OFFER:
            held = args[2] + len(args[1])
            if held < len(self.head):
                return nodecmd.OK, {4: held}
            return nodecmd.OK, {1: self.have, 2: self.total, 3: 768}
        if op == nodecmd.OP_UPDATE_CHUNK:
            if self.fault == "no_offer":
                return nodecmd.E_REFUSED, {1: "no_offer", 2: "no offer", 3: self.have}
            off, data = args[1], args[2]
            index = off // 768
            lose = self.fault == "lossy" and index % 3 == 2 and index not in self.lost
            if lose:
                self.lost.add(index)
            if off == self.have and self.fault != "same_have" and not lose:
                self.have += len(data)
            return nodecmd.OK, {1: self.have}
        if op == nodecmd.OP_UPDATE_APPLY:
            if self.fault == "incomplete" or self.have < self.total:
                return nodecmd.E_REFUSED, {1: "incomplete", 2: "slot", 3: self.have}
            return nodecmd.OK, {1: "2.0.0"}
        assert op == nodecmd.OP_STATUS
        return nodecmd.OK, {"fw": "2.0.0", "upd": {"state": "confirmed"}}


async def carry(node: Node, st: TransferStats, give_up_s: float = 600.0) -> Any:
    return await push(node, NODE, bundle(), window=4, timeout=1.0, give_up_s=give_up_s,
                      confirm_s=5.0, poll_s=0.01, backoff_s=BACKOFF, stats=st)


@pytest.mark.parametrize("fault", ["same_have", "no_offer", "incomplete"])
async def test_a_node_that_never_comes_further_ends_the_push_with_backoff_between_rounds(
        fault: str) -> None:
    """Before: a CHUNK answered with the same `have`, or no_offer / incomplete over and over,
    was sent again at once and for ever (give_up_s was checked on link errors only), until the
    rollout's node_timeout_s (30 min by default) cut it off as 'no outcome'.

    Now: IDLE_ROUNDS rounds in a row without progress end the push as unreachable,
    reason no_progress, naming the node's last answer; the rounds are spaced by a doubling
    backoff (0.01 + 0.02 + 0.04 + 0.08 s here), and no APPLY follows an unfinished transfer."""
    node, st = Node(bundle(), fault), TransferStats()
    out = await carry(node, st)
    assert (out.status, out.reason) == ("unreachable", "no_progress"), out
    assert f"no progress in {IDLE_ROUNDS} rounds" in out.detail, out.detail
    assert {"same_have": "answered have 0", "no_offer": "no_offer",
            "incomplete": "incomplete"}[fault] in out.detail, out.detail
    assert st.stalls == IDLE_ROUNDS
    assert st.backoff_s == pytest.approx(sum(BACKOFF * 2 ** k for k in range(IDLE_ROUNDS - 1)))
    offers = sum(op == nodecmd.OP_UPDATE_OFFER for op in node.ops)
    chunks = sum(op == nodecmd.OP_UPDATE_CHUNK for op in node.ops)
    assert offers <= 2 * IDLE_ROUNDS and chunks <= 4 * IDLE_ROUNDS, (offers, chunks)
    if fault != "incomplete":
        assert nodecmd.OP_UPDATE_APPLY not in node.ops


async def test_a_node_without_progress_is_let_go_at_give_up_s() -> None:
    """give_up_s bounds rounds without progress too: with nothing left of it, the first such
    round ends the push, without a wait."""
    node, st = Node(bundle(), "same_have"), TransferStats()
    out = await carry(node, st, give_up_s=0.0)
    assert (out.status, out.reason) == ("unreachable", "no_progress"), out
    assert "gave up" in out.detail and st.stalls == 1 and st.backoff_s == 0


async def test_lost_chunks_with_progress_between_them_are_resent_at_once() -> None:
    """A round in which the node came further is no stall: the lost chunks are sent again
    from its `have` without a wait, and the update finishes."""
    node, st = Node(bundle(), "lossy"), TransferStats()
    out = await carry(node, st)
    assert (out.status, out.version) == ("updated", "2.0.0"), out
    assert node.lost and st.chunks_resent >= len(node.lost)
    assert st.stalls == 0 and st.backoff_s == 0


# ---- `lantern gateway rollout start` when the API's answer is not JSON ----------------------

TOKEN = "review4-token-0123456789"


class Gateway:
    def __init__(self, url: str, token_file: Path, street: Street, manager: RolloutManager,
                 tmp: Path) -> None:
        self.url, self.token_file, self.street, self.manager = url, token_file, street, manager
        self.tmp = tmp

    async def start(self, data: bytes, *extra: str) -> tuple[int, str, str]:
        path = self.tmp / "release.lub"
        path.write_bytes(data)
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lantern", "gateway", "rollout", "start", str(path), *extra,
            "--url", self.url, "--token-file", str(self.token_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await p.communicate()
        assert p.returncode is not None
        return p.returncode, out.decode(), err.decode()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    street = Street()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    async with api_with_rollout(tmp_path, street, TOKEN) as (app, manager, _key):
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            yield Gateway(str(server.make_url("/")), token_file, street, manager, tmp_path)
        finally:
            await server.close()


async def test_a_bundle_over_the_limit_is_too_big_not_a_wrong_url(gw: Gateway) -> None:
    """Before: the API's 413 (aiohttp, in plain text) was reported as 'not the Lantern API …
    check --url', exit 2 (no gateway). Now: the bundle is too big, the limit, exit 1 (the
    gateway refused it); no node hears of it."""
    rc, out, err = await gw.start(bytes(BUNDLE_MAX + 100))
    assert rc == 1, (rc, err)
    assert "HTTP 413" in err and "too big" in err and f"{BUNDLE_MAX:,} bytes" in err, err
    assert "check --url" not in err and "not the Lantern API" not in err and out == ""
    assert gw.street.calls == [] and gw.manager.rollout is None


async def test_a_failure_in_the_gateway_points_at_its_log_not_at_the_url(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the API's 500 (an exception in the gateway) was 'not the Lantern API … check
    --url', exit 2. Now: the gateway failed, see its log; exit 1 (it answered)."""

    async def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug in the gateway")

    monkeypatch.setattr(gw.manager, "start", broken)
    rc, _, err = await gw.start(make_bundle(KEY))
    assert rc == 1, (rc, err)
    assert "HTTP 500" in err and "the gateway failed" in err and "log" in err, err
    assert "check --url" not in err


async def test_an_option_the_api_refuses_in_plain_text_is_its_reason(gw: Gateway) -> None:
    """`--step -1` passes argparse (an int) and the API refuses it in plain text (400): the
    command says the API's reason, exit 1, instead of 'not the Lantern API'."""
    rc, _, err = await gw.start(make_bundle(KEY), "--step", "-1")
    assert rc == 1, (rc, err)
    assert "HTTP 400" in err and "step='-1': expected a whole number" in err, err
    assert gw.street.calls == []
