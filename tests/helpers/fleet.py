"""The gateway's ingest as agent/gateway.py wires it with the fleet registry (docs/fleet.md):
a store, the registry's key views, frames in and their commits awaited."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.config import load_keys, write_secret
from lantern.agent.ingest import Ingest
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import Store
from lantern.agent.registry import REGISTRY_FILE, Fleet, Registry, key_id
from lantern.tools.field.provision_steps import merge_key
from lantern.tools.street.ngsi_broker import NgsiBroker

T0 = 1_796_000_000


def frame(key: bytes, node: str, seq: int) -> bytes:
    pack = cbor2.dumps([{-3: T0 + seq, 0: "temperature", 2: 21.5}], canonical=True)
    return protocol.encode_frame(protocol.DATA,
                                 protocol.create_mac0(key, node.encode(), seq, pack))


class Link:
    name = "serial:/dev/ttyTEST"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def keys_file_of(path: Path, keys: dict[str, bytes]) -> Path:
    text = None
    for node, key in keys.items():
        text = merge_key(text, str(path), node, key)
    write_secret(path, text or "[nodes]\n")
    return path


@contextlib.asynccontextmanager
async def gateway(tmp: Path, keys: dict[str, bytes] | None = None, state: Path | None = None,
                  keys_file: Path | None = None
                  ) -> AsyncIterator[tuple[Ingest, Fleet, Metrics, Store]]:
    """Store, registry and ingest wired as agent/gateway.py wires them: in `state` (default
    tmp/state), with `keys_file` as it is, or tmp/keys.toml written from `keys`."""
    state = state or tmp / "state"
    state.mkdir(exist_ok=True)
    if keys_file is None:
        keys_file = keys_file_of(tmp / "keys.toml", keys or {})
    metrics = Metrics()
    async with Store(state / "queue.sqlite") as store:
        with Registry(state / REGISTRY_FILE) as reg:
            fleet = Fleet(reg, keys_file, load_keys(keys_file), {}, [])
            await fleet.start()
            ingest = Ingest(store, fleet.ingest_keys, metrics)
            await ingest.start()
            ingest.refused = fleet.refused  # as agent/gateway.py wires it
            task = asyncio.create_task(ingest.run())
            try:
                yield ingest, fleet, metrics, store
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def send(ingest: Ingest, link: Link, data: bytes) -> None:
    """One frame in; returns once it is committed (or refused at once)."""
    before = sum(ingest.metrics.frames_rejected.values())
    ingest.committed.clear()
    ingest.on_data(link, data)
    if sum(ingest.metrics.frames_rejected.values()) == before:
        await asyncio.wait_for(ingest.committed.wait(), 10)


async def rotate(fleet: Fleet, ops: Any, node: str, old: bytes, new: bytes, first_new: int
                 ) -> None:
    """`node` rotated from `old` to `new` (version 1), the new key sealing from `first_new`
    on: the registry's steps and the switch a COMMIT answer makes (agent/fleetops.py), with
    no node on the other side."""
    reg = fleet.registry
    await asyncio.to_thread(reg.request_rekey, [node])
    await asyncio.to_thread(reg.rekey_next, node, 1, new, key_id(old))
    await asyncio.to_thread(ops._switch, node, 1, new, first_new)


@pytest.fixture
async def broker() -> AsyncIterator[NgsiBroker]:
    """The spec-following NGSI-LD test broker, on a free port."""
    b = NgsiBroker()
    await b.start()
    yield b
    await b.stop()
