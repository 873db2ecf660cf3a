"""The gateway's start and its health as an operator meets them (issue 20).

`gateway run` on a state directory that cannot take the queue says so in one line (exit 2)
instead of a traceback; a second gateway on the same state directory is refused; /healthz is
not ready while commits fail (a full or read-only disk), though the store still answers reads.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from lantern.agent.api import Api, GatewayView
from lantern.agent.ingest import Ingest, Maker
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import Accepted, Store
from tests.helpers.api import FakeForwarder, FakeLink, pack

LANTERN = [sys.executable, "-m", "lantern"]
T0 = 1_764_331_200


def config(tmp: Path, state: str = "state") -> Path:
    keys = tmp / "keys.toml"
    keys.write_text('[nodes]\n"SL-0001" = "' + "ab" * 32 + '"\n')
    keys.chmod(0o600)
    cfg = tmp / "gateway.toml"
    cfg.write_text(f'[gateway]\nstate_dir = "{state}"\nkeys_file = "keys.toml"\n\n'
                   '[[links.serial]]\nport = "/dev/ttyUSB-lantern-test"\n\n'
                   '[sinks.http]\nurl = "http://127.0.0.1:9/"\n\n[api]\nenabled = false\n')
    return cfg


def test_run_on_a_state_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    (tmp_path / "state").write_text("")
    r = subprocess.run([*LANTERN, "gateway", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert "gateway.state_dir is a file, not a directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_second_gateway_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    lock = tmp_path / "state" / "gateway.lock"

    def wait_for_lock(proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while not (lock.exists() and lock.read_text().strip() == str(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "gateways.log").read_text()
            time.sleep(0.05)

    with open(tmp_path / "gateways.log", "w") as log:
        first = subprocess.Popen([*LANTERN, "gateway", "run", "--config", str(cfg)],
                                 stdout=log, stderr=log)
        try:
            wait_for_lock(first)
            second = subprocess.run([*LANTERN, "gateway", "run", "--config", str(cfg)],
                                    capture_output=True, text=True, timeout=60)
            assert second.returncode == 2, second
            assert f"another gateway (pid {first.pid}) runs on this state directory" \
                in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
            assert first.poll() is None  # the first one is untouched
        finally:
            first.terminate()
            first.wait(timeout=30)
        # once it has stopped, the state directory is free again
        again = subprocess.Popen([*LANTERN, "gateway", "run", "--config", str(cfg)],
                                 stdout=log, stderr=log)
        try:
            wait_for_lock(again)
        finally:
            again.terminate()
            assert again.wait(timeout=30) == 0


class Recorder(Maker):
    """Readings made here, as a third-party advert's are: told when stored or lost."""

    name = "test"

    def __init__(self) -> None:
        self.done = asyncio.Event()

    def stored(self, frames: list[Accepted]) -> None:
        self.done.set()

    def lost(self, frames: list[Accepted], e: BaseException) -> None:
        self.done.set()


async def test_healthz_is_not_ready_while_commits_fail(tmp_path: Path) -> None:
    async with Store(tmp_path / "queue.sqlite") as store:
        metrics = Metrics()
        link = FakeLink("serial:/dev/ttyUSB0", True, 0, 0)
        view = GatewayView(metrics, store, ["SL-0001"], [link], [FakeForwarder()],
                           [store.path])
        ingest = Ingest(store, {}, metrics)
        await ingest.start()
        runner = asyncio.create_task(ingest.run())
        real = store.commit

        async def full(*args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        try:
            async with TestClient(TestServer(Api(view, None).app)) as client:
                assert (await (await client.get("/healthz")).json())["ready"] is True
                store.commit = full  # type: ignore[method-assign]
                maker = Recorder()
                ingest.take(maker, pack("SL-0001", 1, T0, {"temperature": 20.0}))
                await asyncio.wait_for(maker.done.wait(), 10)
                r = await client.get("/healthz")
                body = await r.json()
                assert r.status == 503 and body["ready"] is False
                assert body["store"] == "commits failing: database or disk is full"
                store.commit = real  # type: ignore[method-assign]
                maker = Recorder()
                ingest.take(maker, pack("SL-0001", 2, T0 + 60, {"temperature": 20.5}))
                await asyncio.wait_for(maker.done.wait(), 10)
                assert metrics.commit_error is None
                assert (await (await client.get("/healthz")).json())["store"] == "ok"
        finally:
            runner.cancel()
    assert os.path.exists(tmp_path / "queue.sqlite")
