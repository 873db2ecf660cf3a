"""The running gateway's watch over the registry and key files (agent/registry.py `Fleet.tick`):
an idle tick costs no thread hop (issue 22, idle wake-ups), and a change made by another
process (`lantern gateway nodes revoke`) or learnt by the gateway still reaches the file and
ingest at the next tick. And the fleet's live operations load `cryptography` only for a key
rotation, not with the gateway (idle RSS)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lantern.agent.registry import REGISTRY_FILE, Registry
from tests.helpers.fleet import T0, Link, frame, gateway, send

pytestmark = pytest.mark.fleet

A = "SL-0001"
KA = bytes(range(32))
R = TypeVar("R")


def count_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every asyncio.to_thread call from now on, by the function's name."""
    hops: list[str] = []
    real = asyncio.to_thread

    async def counted(func: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    return hops


def age(path: Path) -> None:
    """Make the registry file look written long ago (its mtime), whatever the clock's
    resolution: the next write by anyone then changes it."""
    os.utime(path, ns=(1, 1))


async def test_an_idle_tick_takes_no_thread_and_a_revocation_by_another_process_applies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = Link()
    async with gateway(tmp_path, {A: KA}) as (ingest, fleet, metrics, _):
        path = tmp_path / "state" / REGISTRY_FILE
        await fleet.tick({}, {}, None, [])
        age(path)
        await fleet.tick({}, {}, None, [])  # the file changed (its mtime): read once more
        hops = count_hops(monkeypatch)
        for _ in range(3):
            await fleet.tick({}, {}, None, [])
        assert hops == []  # nothing learnt, nothing changed: no thread, no write
        with Registry(path) as cli:  # `lantern gateway nodes revoke`, another process
            cli.revoke(A, "stolen")
        await fleet.tick({}, {}, None, [])
        assert hops == ["_sync"]
        await send(ingest, link, frame(KA, A, 1))
        assert metrics.frames_rejected == {"revoked": 1}


async def test_what_the_gateway_learnt_is_written_at_the_next_tick(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway(tmp_path, {A: KA}) as (_, fleet, _m, _s):
        path = tmp_path / "state" / REGISTRY_FILE
        await fleet.tick({}, {}, None, [])
        age(path)
        await fleet.tick({}, {}, None, [])
        hops = count_hops(monkeypatch)
        await fleet.tick({A: T0 + 5}, {A: "1.4.0"}, None, [])
        assert hops == ["_sync"]
        with Registry(path) as other:
            r = other.get(A)
            assert r is not None and (r.last_seen, r.firmware) == (T0 + 5, "1.4.0")


def test_the_gateway_loads_cryptography_only_for_a_rotation() -> None:
    code = ("import sys\n"
            "from lantern.agent import gateway, fleetops\n"
            "print('cryptography' in sys.modules)\n"
            "fleetops.derive(bytes(range(1, 33)), bytes(32), 'SL-0001', 2)\n"
            "print('cryptography' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "True"]
