"""sd_notify spoken by the gateway (agent/sdnotify.py), against a fake NOTIFY_SOCKET.

The last test runs the real gateway process the way systemd would (NOTIFY_SOCKET,
WATCHDOG_USEC) and checks READY, STATUS, the watchdog pings and STOPPING on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pty
import signal
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from lantern.agent.config import write_secret
from lantern.agent.sdnotify import Notifier, supervise

ROOT = Path(__file__).resolve().parents[2]


class FakeManager:
    """A unix datagram socket standing where systemd's notify socket would be."""

    def __init__(self, address: str | Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        addr = str(address)
        self.sock.bind(b"\0" + addr[1:].encode() if addr.startswith("@") else addr)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def wait(self, pred: object, timeout: float, what: str) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            if pred(self.messages):  # type: ignore[operator]
                return self.messages
        raise AssertionError(f"timed out waiting for {what}; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeManager]:
    m = FakeManager(tmp_path / "notify")
    yield m
    m.close()


def test_messages_reach_the_socket(manager: FakeManager, tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert n.enabled
    assert n.ready("3/3 nodes seen,\nqueue 0")
    assert n.status("queue 12")
    assert n.watchdog()
    assert n.stopping()
    n.close()
    msgs = manager.drain()
    assert msgs == [
        {"READY": "1", "STATUS": "3/3 nodes seen, queue 0", "MAINPID": str(os.getpid())},
        {"STATUS": "queue 12"}, {"WATCHDOG": "1"}, {"STOPPING": "1", "STATUS": "stopping"}]
    assert n.sent == 4


def test_abstract_socket_address() -> None:
    name = f"@lantern-test-{os.getpid()}"
    m = FakeManager(name)
    try:
        n = Notifier({"NOTIFY_SOCKET": name})
        assert n.watchdog()
        n.close()
        assert m.drain() == [{"WATCHDOG": "1"}]
    finally:
        m.close()


def test_without_systemd_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False
    assert n.watchdog_interval_s is None


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_the_timeout(env: dict[str, str],
                                               interval: float | None) -> None:
    assert Notifier(env).watchdog_interval_s == interval


def test_unreachable_manager_is_logged_once(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-here")})
    with caplog.at_level(logging.WARNING, "lantern.sdnotify"):
        assert n.watchdog() is False
        assert n.watchdog() is False
    n.close()
    assert len([r for r in caplog.records if "NOTIFY_SOCKET" in r.getMessage()]) == 1


async def test_supervise_pings_only_while_healthy(manager: FakeManager, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
    healthy = asyncio.Event()
    healthy.set()
    calls = 0

    async def health() -> str:
        nonlocal calls
        calls += 1
        await healthy.wait()  # a wedged store: never answers
        return f"check {calls}"

    async def until(pred: object, what: str) -> None:
        deadline = time.monotonic() + 20
        while not pred():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)
            manager.drain()

    def pings(since: int = 0) -> int:
        return sum(1 for m in manager.messages[since:] if m.get("WATCHDOG") == "1")

    task = asyncio.create_task(supervise(n, health))
    try:
        await until(lambda: pings() >= 3, "three pings")
        assert any(m.get("STATUS", "").startswith("check ") for m in manager.messages)
        with caplog.at_level(logging.ERROR, "lantern.sdnotify"):
            healthy.clear()
            before = len(manager.drain())
            stuck_at = calls
            # absence can only be watched for a while: several watchdog periods (0.1 s)
            await until(lambda: calls >= stuck_at + 3, "three hung health checks")
            assert len(manager.drain()) == before, "pinged while the health check hung"
        assert sum("withholding" in r.getMessage() for r in caplog.records) == 1
        healthy.set()
        await until(lambda: pings(before) >= 1, "a ping after recovery")
    finally:
        task.cancel()
        n.close()


# ---------------------------------------------------------------- the real gateway process


def test_gateway_process_speaks_sd_notify(manager: FakeManager, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    keys = tmp_path / "keys.toml"
    write_secret(keys, '[nodes]\n"SL-0001" = "' + "11" * 32 + '"\n')
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nstate_dir = "state"\nkeys_file = "keys.toml"\n\n'
                   f'[[links.serial]]\nport = "{os.ttyname(slave)}"\n\n'
                   '[sinks.http]\nurl = "http://127.0.0.1:9/never-called"\n\n'
                   "[api]\nport = 0\n")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="1000000")
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "lantern", "gateway", "run", "--config",
                             str(cfg)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        msgs = manager.wait(lambda ms: any(m.get("READY") == "1" for m in ms), 60, "READY=1")
        ready = next(m for m in msgs if m.get("READY") == "1")
        assert ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"].startswith("status page http://127.0.0.1:")
        assert "0/1 nodes seen, 1/1 links up, queue 0" in ready["STATUS"]
        # WatchdogSec=1s → a ping every 0.5 s while healthy
        manager.wait(lambda ms: sum(m.get("WATCHDOG") == "1" for m in ms) >= 4, 30,
                     "four watchdog pings")
        assert msgs.index(ready) < next(i for i, m in enumerate(msgs) if "WATCHDOG" in m)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        msgs = manager.drain()
        stopping = [m for m in msgs if m.get("STOPPING") == "1"]
        assert len(stopping) == 1 and stopping[0]["STATUS"].startswith("stopping: ")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        os.close(master)
        os.close(slave)
