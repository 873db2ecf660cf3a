"""Staged rollout (agent/ota/rollout.py): real signed bundles, the real state file; only the
transfer to a node is a double (the end-to-end tests run it against MicroPython nodes)."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent.config import UpdatesConfig
from lantern.agent.ota.rollout import (
    BUNDLE_FILE,
    STATE_FILE,
    RolloutError,
    RolloutManager,
    version_key,
)
from tests.helpers.rollout import NODES, Street, make_bundle, write_pub

pytestmark = pytest.mark.ota

@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def cfg(tmp_path: Path, key: Ed25519PrivateKey) -> UpdatesConfig:
    return UpdatesConfig(write_pub(key, tmp_path / "release.pub.pem"), canary=1, step=2,
                         node_timeout_s=30.0)


def manager(tmp_path: Path, cfg: UpdatesConfig | None, street: Street,
            reach: Callable[[str], Any] | None = None, **kw: Any) -> RolloutManager:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return RolloutManager(state, cfg, reach or (lambda n: f"channel-{n}"), lambda: NODES,
                          street.push, **kw)


async def finished(m: RolloutManager) -> None:
    """Until the rollout's task has ended (the manager's own task, awaited)."""
    t = m._task
    assert t is not None
    await t


async def test_canary_first_then_steps_and_everything_persisted(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street(gates={"SL-0001": asyncio.Event()})
    async with manager(tmp_path, cfg, street) as m:
        r = await m.start(make_bundle(key))
        await street.ev("SL-0001").wait()
        assert street.calls == ["SL-0001"]  # the canary alone, nobody else yet
        assert r.as_dict()["phase"] == "canary"
        assert [p.state for p in r.nodes][:2] == ["transferring", "pending"]
        street.gates["SL-0001"].set()
        await finished(m)
        assert r.state == "done" and r.reason is None
        assert street.calls[0] == "SL-0001" and sorted(street.calls) == NODES
        assert all(p.state == "updated" and p.version == "0.2.0" for p in r.nodes)
        assert m.firmware == dict.fromkeys(NODES, "0.2.0")
        d = r.as_dict()
        assert d["counts"]["updated"] == 7 and d["steps"] == 1 + 3 and d["phase"] == "done"
    state = tmp_path / "state" / STATE_FILE
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    saved = json.loads(state.read_text())
    assert saved["rollout"]["state"] == "done"
    assert saved["nodes"]["SL-0003"]["fw"] == "0.2.0"
    assert stat.S_IMODE((tmp_path / "state" / BUNDLE_FILE).stat().st_mode) == 0o600


async def test_a_canary_that_rolls_back_halts_the_rollout_and_nobody_else_gets_it(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street(verdicts={"SL-0001": "rolled_back"})
    async with manager(tmp_path, cfg, street) as m:
        r = await m.start(make_bundle(key))
        await finished(m)
        assert r.state == "halted"
        assert r.reason == "canary SL-0001 rolled back: SL-0001: rolled_back"
        assert street.calls == ["SL-0001"]
        assert [p.state for p in r.nodes] == ["rolled_back"] + ["pending"] * 6
        assert m.firmware["SL-0001"] == "0.1.0"  # what the node runs now
        assert r.as_dict()["halted"] is True
    # a restarted gateway reports the halt and sends nothing
    again = Street()
    async with manager(tmp_path, cfg, again) as m2:
        assert m2.rollout is not None and m2.rollout.state == "halted"
        assert m2._task is None
    assert again.calls == []


async def test_a_refusal_in_a_step_stops_the_nodes_in_flight_and_the_later_steps(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    # canary SL-0001, then steps of 2: [2, 3], [4, 5], [6, 7]; SL-0003 refuses while
    # SL-0002 is still transferring
    street = Street(verdicts={"SL-0003": "refused"}, gates={"SL-0002": asyncio.Event()})
    async with manager(tmp_path, cfg, street) as m:
        r = await m.start(make_bundle(key))
        await finished(m)
        assert r.state == "halted" and r.reason == "SL-0003 refused: SL-0003: refused"
        # SL-0002 was stopped: in its transfer, or (on a busy machine) before it began
        assert {"SL-0001", "SL-0003"} <= set(street.calls) <= {"SL-0001", "SL-0002", "SL-0003"}
        assert street.cancelled == [n for n in street.calls if n == "SL-0002"]
        assert "SL-0002" not in street.finished
        states = {p.node: p.state for p in r.nodes}
        assert states["SL-0002"] == "pending"  # stopped before an outcome: not done
        assert states["SL-0003"] == "refused"
        assert all(states[n] == "pending" for n in NODES[3:])


async def test_the_operator_halts_and_no_further_node_is_sent_to(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street(gates={"SL-0002": asyncio.Event()})
    async with manager(tmp_path, cfg, street) as m:
        r = await m.start(make_bundle(key))
        await street.ev("SL-0002").wait()
        await m.halt("halted by the operator: wrong release")
        assert r.state == "halted" and r.reason == "halted by the operator: wrong release"
        assert "SL-0002" in street.cancelled
        with pytest.raises(RolloutError) as e:
            await m.halt()
        assert e.value.kind == "idle"
    assert set(street.calls) <= {"SL-0001", "SL-0002", "SL-0003"}
    assert not set(street.calls) & set(NODES[3:])


async def test_a_restarted_gateway_resumes_and_never_sends_again_to_a_node_done(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street(gates={"SL-0004": asyncio.Event(), "SL-0005": asyncio.Event()})
    async with manager(tmp_path, cfg, street) as m:
        await m.start(make_bundle(key))
        await street.ev("SL-0004").wait()
        await street.ev("SL-0005").wait()
    # stopped mid-step: 1, 2, 3 done; 4 and 5 interrupted, 6 and 7 never started
    assert sorted(street.finished) == ["SL-0001", "SL-0002", "SL-0003"]
    saved = json.loads((tmp_path / "state" / STATE_FILE).read_text())["rollout"]
    assert saved["state"] == "running"
    assert [p["state"] for p in saved["nodes"]] == ["updated"] * 3 + ["pending"] * 4
    second = Street()
    async with manager(tmp_path, cfg, second) as m2:
        await finished(m2)
        assert m2.rollout is not None and m2.rollout.state == "done"
    assert sorted(second.calls) == NODES[3:]


async def test_two_starts_at_once_make_one_rollout(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street(gates={"SL-0001": asyncio.Event()})
    async with manager(tmp_path, cfg, street) as m:
        results = await asyncio.gather(m.start(make_bundle(key)), m.start(make_bundle(key)),
                                       return_exceptions=True)
        kinds = sorted(type(x).__name__ if not isinstance(x, RolloutError) else x.kind
                       for x in results)
        assert kinds == ["Rollout", "busy"]
        street.gates["SL-0001"].set()
        await finished(m)
    assert sorted(street.calls) == NODES


async def test_a_gateway_restarted_without_updates_halts_the_rollout_it_cannot_check(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street(gates={"SL-0001": asyncio.Event()})
    async with manager(tmp_path, cfg, street) as m:
        await m.start(make_bundle(key))
        await street.ev("SL-0001").wait()
    second = Street()
    async with manager(tmp_path, None, second) as m2:
        assert m2.rollout is not None and m2.rollout.state == "halted"
        assert "without [updates]" in (m2.rollout.reason or "")
    assert second.calls == []


async def test_a_lost_bundle_file_halts_the_resumed_rollout_instead_of_guessing(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street(gates={"SL-0001": asyncio.Event()})
    async with manager(tmp_path, cfg, street) as m:
        await m.start(make_bundle(key))
        await street.ev("SL-0001").wait()
    (tmp_path / "state" / BUNDLE_FILE).write_bytes(b"LUB1 something else")
    second = Street()
    async with manager(tmp_path, cfg, second) as m2:
        assert m2.rollout is not None and m2.rollout.state == "halted"
        assert "gone or differs" in (m2.rollout.reason or "")
    assert second.calls == []


@pytest.mark.parametrize(("spoil", "reason"), [
    ("flip", "bad_signature"), ("other_key", "other_key"), ("file", "bad_hash"),
    ("new_gateway", "gateway_version"), ("garbage", "not_bundle")])
async def test_bundles_the_gateway_refuses_are_counted_and_never_sent(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey, spoil: str,
        reason: str) -> None:
    bundle = make_bundle(key)
    if spoil == "flip":
        b = bytearray(bundle)
        b[60] ^= 0x01  # inside the signed manifest
        bundle = bytes(b)
    elif spoil == "other_key":
        bundle = make_bundle(Ed25519PrivateKey.generate())
    elif spoil == "file":
        bundle = bundle[:-1] + bytes([bundle[-1] ^ 0x40])
    elif spoil == "new_gateway":
        bundle = make_bundle(key, min_gateway="99.0.0")
    else:
        bundle = b"GIF89a" + bytes(100)
    street = Street()
    async with manager(tmp_path, cfg, street, gateway_version="0.1.0") as m:
        with pytest.raises(RolloutError) as e:
            await m.start(bundle)
        assert e.value.kind == "refused" and reason in str(e.value)
        assert m.refused == {reason: 1}
        assert m.rollout is None
    assert street.calls == []
    assert not (tmp_path / "state" / BUNDLE_FILE).exists()


async def test_unreachable_canaries_prove_nothing_so_the_rollout_halts(
        tmp_path: Path, key: Ed25519PrivateKey) -> None:
    cfg = UpdatesConfig(write_pub(key, tmp_path / "r.pub.pem"), canary=("SL-0003",), step=3,
                        node_timeout_s=0.05)
    street = Street()
    async with manager(tmp_path, cfg, street, reach=lambda n: None) as m:
        r = await m.start(make_bundle(key))
        assert r.canary == ["SL-0003"] and r.nodes[0].node == "SL-0003"
        await finished(m)
        assert r.nodes[0].state == "unreachable"
        assert r.state == "halted" and "no canary node could be reached" in (r.reason or "")
    assert street.calls == []


async def test_an_unreachable_node_after_the_canary_does_not_halt_the_rollout(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street()

    def reach(n: str) -> str | None:
        return None if n == "SL-0004" else f"channel-{n}"

    short = UpdatesConfig(cfg.release_key, canary=1, step=3, node_timeout_s=0.05)
    async with manager(tmp_path, short, street, reach=reach) as m:
        r = await m.start(make_bundle(key))
        await finished(m)
        assert r.state == "done"
        assert {p.node: p.state for p in r.nodes}["SL-0004"] == "unreachable"
        assert r.as_dict()["counts"] == {"pending": 0, "transferring": 0, "applied": 0,
                                         "updated": 6, "rolled_back": 0, "refused": 0,
                                         "unreachable": 1}


async def test_start_options_nodes_already_updated_other_boards_and_bad_requests(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street()
    async with manager(tmp_path, None, street) as unconfigured:
        with pytest.raises(RolloutError) as e:
            await unconfigured.start(make_bundle(key))
        assert e.value.kind == "unconfigured"
    async with manager(tmp_path, cfg, street) as m:
        m.learn("SL-0002", "0.2.0", "unix-sim")  # already runs it
        m.learn("SL-0003", "0.1.0", "esp32-devkitc")  # not a board of the bundle
        for bad in ({"canary": ["SL-0099"]}, {"nodes": ["nobody"]}, {"step": 0}):
            with pytest.raises(RolloutError) as e:
                await m.start(make_bundle(key), **bad)
            assert e.value.kind == "bad_request"
        r = await m.start(make_bundle(key), canary=["SL-0005", "SL-0002"], step=10,
                          nodes=["SL-0002", "SL-0003", "SL-0005", "SL-0006"])
        assert [p.node for p in r.nodes] == ["SL-0005", "SL-0002", "SL-0006"]
        assert r.skipped == {"SL-0003": "board esp32-devkitc is not one of the bundle's"}
        with pytest.raises(RolloutError) as e:
            await m.start(make_bundle(key))
        assert e.value.kind in ("busy",)
        await finished(m)
        assert sorted(street.calls) == ["SL-0005", "SL-0006"]  # SL-0002 already had it
        assert r.nodes[1].reason == "already runs it"


async def test_versions_learnt_from_status_survive_a_restart_and_bad_ones_are_ignored(
        tmp_path: Path, cfg: UpdatesConfig) -> None:
    async with manager(tmp_path, cfg, Street()) as m:
        m.learn("SL-0001", "0.1.0", "unix-sim")
        m.learn("SL-0002", "bad version\n", 7)
        m.learn("SL-0003", None, None)
    async with manager(tmp_path, cfg, Street()) as m2:
        assert m2.firmware == {"SL-0001": "0.1.0"} and m2.boards == {"SL-0001": "unix-sim"}
        assert m2.status()["firmware"] == {"SL-0001": {"version": "0.1.0",
                                                       "board": "unix-sim"}}


async def test_a_node_running_the_candidate_shows_as_applied(
        tmp_path: Path, cfg: UpdatesConfig, key: Ed25519PrivateKey) -> None:
    street = Street(gates={"SL-0001": asyncio.Event()})
    async with manager(tmp_path, cfg, street) as m:
        r = await m.start(make_bundle(key))
        await street.ev("SL-0001").wait()
        m.learn("SL-0001", "0.2.0", "unix-sim", {"state": "candidate", "version": "0.2.0"})
        assert r.nodes[0].state == "applied"
        street.gates["SL-0001"].set()
        await finished(m)
        assert r.nodes[0].state == "updated"


async def test_an_unreadable_state_file_is_moved_aside_never_a_crash(
        tmp_path: Path, cfg: UpdatesConfig, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / STATE_FILE).write_text('{"rollout": {"id": 3}, "nodes": []}')
    async with manager(tmp_path, cfg, Street()) as m:
        assert m.rollout is None and m.firmware == {}
    assert (state / (STATE_FILE + ".unreadable")).exists()
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1


def test_version_order() -> None:
    ordered = ["0.1.0", "0.1.1-rc1", "0.1.1-rc2", "0.1.1", "0.1.1+build7", "0.2", "1.0.0"]
    keys = [version_key(v) for v in ordered]
    assert keys == sorted(keys)
    assert version_key("0.1.1") == version_key("0.1.1+other")
    for bad in ("", "v1", "1..2", "1.x"):
        with pytest.raises(ValueError):
            version_key(bad)
