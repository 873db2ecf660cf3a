"""A rollout's test parts: signed bundles, a release public key file, the transfer double,
and a gateway API with a rollout manager (tests/gateway/test_rollout*.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent.api import Api, GatewayView
from lantern.agent.config import UpdatesConfig
from lantern.agent.metrics import Metrics
from lantern.agent.ota.rollout import RolloutManager
from lantern.agent.ota.transfer import Outcome, Status
from lantern.agent.queue.store import Store
from lantern.tools.field import release
from tests.helpers.api import FakeForwarder, FakeLink

NODES = [f"SL-{i:04d}" for i in range(1, 8)]


def write_pub(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    path.chmod(0o644)
    return path


def make_bundle(key: Ed25519PrivateKey, version: str = "0.2.0", min_gateway: str = "0.0.1",
                boards: tuple[str, ...] = ("unix-sim",)) -> bytes:
    files = [("main.py", b"import node\n"), ("node/app.mpy", b"M\x06" + version.encode())]
    return release.bundle(key, version, 0, min_gateway, list(boards), (6, 3), files)


@dataclass
class Street:
    """The transfer double: each node answers as `verdicts` says, or waits for `gates`."""

    verdicts: dict[str, Status] = field(default_factory=dict)  # node → status (default updated)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    started: dict[str, asyncio.Event] = field(default_factory=dict)

    def ev(self, node: str) -> asyncio.Event:
        return self.started.setdefault(node, asyncio.Event())

    async def push(self, channel: Any, node: str, bundle: bytes, **_: Any) -> Outcome:
        assert channel == f"channel-{node}"
        self.calls.append(node)
        self.ev(node).set()
        try:
            if node in self.gates:
                await self.gates[node].wait()
        except asyncio.CancelledError:
            self.cancelled.append(node)
            raise
        self.finished.append(node)
        status: Status = self.verdicts.get(node, "updated")
        version = "0.2.0" if status == "updated" else "0.1.0"
        reason = {"rolled_back": "boot_exception: ImportError", "refused": "board"}.get(status)
        return Outcome(node, status, reason, version, f"{node}: {status}")


@contextlib.asynccontextmanager
async def api_with_rollout(tmp_path: Path, street: Street, token: str, canary: int = 1,
                           step: int = 3) -> AsyncIterator[tuple[web.Application,
                                                                 RolloutManager,
                                                                 Ed25519PrivateKey]]:
    """The local API of a gateway whose rollout manager sends through `street`."""
    key = Ed25519PrivateKey.generate()
    cfg = UpdatesConfig(write_pub(key, tmp_path / "release.pub.pem"), canary=canary,
                        step=step)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    async with Store(tmp_path / "queue.sqlite") as store, RolloutManager(
            state, cfg, lambda n: f"channel-{n}", lambda: NODES, street.push) as manager:
        view = GatewayView(Metrics(), store, NODES, [FakeLink("serial:/dev/ttyUSB0")],
                           [FakeForwarder()], rollout=manager)
        yield Api(view, token).app, manager, key
