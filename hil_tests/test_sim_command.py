"""`lantern sim` and `lantern demo` as a user runs them: separate processes, real ptys.

`lantern sim` starts simulated nodes and writes their keys and [[links.serial]] tables; the
test then runs a gateway of its own with that fragment against its own upstream, as an
integrator would, and sees every node's readings arrive. `lantern demo` is the same street
with its own gateway and receiver.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from lantern.tools.street.sim import MICROPYTHON
from lantern.tools.street.upstream import Upstream

pytestmark = pytest.mark.micropython

LANTERN = [sys.executable, "-m", "lantern"]


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_sim_feeds_a_gateway_the_user_runs(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), "run `make micropython`"
    street_dir = tmp_path / "street"
    sim = subprocess.Popen([*LANTERN, "sim", "--nodes", "2", "--interval", "0.5", "--dir",
                            str(street_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    upstream = Upstream()
    url = await upstream.start()
    gateway = None
    try:
        links = street_dir / "links.toml"
        await _until(links.exists, 30, "links.toml")
        keys = street_dir / "keys.toml"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        fragment = tomllib.loads(links.read_text())
        assert len(fragment["links"]["serial"]) == 2
        assert set(tomllib.loads(keys.read_text())["nodes"]) == {"SL-0001", "SL-0002"}
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\nkeys_file = "{keys}"\n\n'
                       f'[batch]\nmax_age_s = 0.5\n\n[sinks.http]\nurl = "{url}"\n\n'
                       f"[api]\nenabled = false\n\n{links.read_text()}")
        check = subprocess.run([*LANTERN, "gateway", "check-config", "--config", str(cfg)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        gateway = subprocess.Popen([*LANTERN, "gateway", "run", "--config", str(cfg)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)

        def from_both() -> bool:
            return {rid.split(":")[0] for rid in upstream.readings} >= {"SL-0001", "SL-0002"}

        await _until(from_both, 60, "readings from both simulated nodes")
        assert sim.poll() is None
    finally:
        if gateway is not None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=20)
        sim.send_signal(signal.SIGINT)
        out, _ = sim.communicate(timeout=30)
        await upstream.stop()
    assert sim.returncode == 0, out.decode(errors="replace")
    text = out.decode()
    assert "SL-0001" in text and "links.toml" in text and "Traceback" not in text


def test_demo_shows_readings_upstream(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), "run `make micropython`"
    r = subprocess.run([*LANTERN, "demo", "--nodes", "2", "--interval", "0.5", "--seconds",
                        "12", "--dir", str(tmp_path / "demo")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "sampled" in r.stdout and "Traceback" not in r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("stopped: ") and not last.startswith("stopped: 0 readings"), last
