"""`lantern demo`: N simulated nodes on MicroPython → relay ptys → the gateway → an upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.config import write_secret

from .sim import Relay, SimNode, gateway_toml, keys_toml
from .upstream import Upstream


def _show(records: list[dict[str, Any]]) -> None:
    by_frame: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        node, seq, _ = r["id"].rsplit(":", 2)
        by_frame.setdefault(f"{node} seq {seq}", []).append(r)
    for key, recs in by_frame.items():
        t = recs[0]["t"]
        parts = []
        for r in recs:
            name = r["n"].rsplit(":", 1)[-1]
            unit = f" {r['u']}" if "u" in r else ""
            parts.append(f"{name} {r.get('v', r.get('vs', r.get('vb')))}{unit}")
        stamp = time.strftime("%H:%M:%S", time.localtime(t))
        now = time.time()
        arrived = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        print(f"sampled {stamp}  {key:<16} {' | '.join(parts)}   (upstream {arrived})",
              flush=True)


def _fresh_queue_if_old(state: Path) -> None:
    """The demo keeps its queue between runs; one an earlier Lantern wrote is moved aside.

    A deployed gateway refuses such a queue and changes nothing (agent/store.py); the demo's
    readings are the demo's, so after an upgrade it starts again rather than stop.
    """
    from agent.errors import ConfigError
    from agent.store import QUEUE_FILE, check_layout

    try:
        check_layout(state / QUEUE_FILE)
    except ConfigError as e:
        aside = state.with_name(f"{state.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        state.rename(aside)
        print(f"{e.args[0].split(';')[0]}: the demo moved it to {aside} and starts with an "
              "empty queue", flush=True)


async def _run(n_nodes: int, interval: float, seconds: float, workdir: Path) -> int:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    upstream = Upstream(listener=_show)
    url = await upstream.start()
    relays = [Relay(f"SL-{i + 1:04d}") for i in range(n_nodes)]
    nodes = [SimNode(r.name, workdir / "nodes", port=r.node_port,
                     interval_ms=int(interval * 1000)) for r in relays]
    for node in nodes:
        node.write_config()
    keys_file = workdir / "keys.toml"
    write_secret(keys_file, keys_toml(nodes))
    _fresh_queue_if_old(workdir / "gateway-state")
    gw_cfg = workdir / "gateway.toml"
    api_port = _api_port()
    gw_cfg.write_text(gateway_toml(workdir / "gateway-state", keys_file,
                                   [r.gateway_port for r in relays], url)
                      + f"\n[api]\nport = {api_port}\n")
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    for r in relays:
        r.start()
    gw_log = open(logs / "gateway.log", "ab")  # noqa: SIM115 - lives as long as the demo
    gateway = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "gateway", "run", "--config", str(gw_cfg)],
        stdout=gw_log, stderr=subprocess.STDOUT, start_new_session=True)
    node_logs = []
    for node in nodes:
        f = open(logs / f"{node.node_id}.log", "ab")  # noqa: SIM115
        node_logs.append(f)
        node.start(stdout=f.fileno())
    print(f"Lantern demo: {n_nodes} nodes on MicroPython (unix port, {nodes[0].heap_kb()} KB "
          f"heap), sampling every {interval:g}s → gateway → upstream {url}", flush=True)
    print(f"  logs: {logs}/   gateway config: {gw_cfg}   queue: "
          f"{workdir / 'gateway-state' / 'queue.sqlite'}", flush=True)
    print(f"  status page: http://127.0.0.1:{api_port}/  (nodes, live values, queue, upstream)",
          flush=True)
    print("  Ctrl-C stops everything.\n", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    code = 0
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if gateway.poll() is not None:
                print(f"gateway exited with {gateway.returncode}; see {logs / 'gateway.log'}")
                code = 1
                break
            dead = [n.node_id for n in nodes if n.proc and n.proc.poll() is not None]
            if dead:
                print(f"node(s) {', '.join(dead)} exited; see {logs}/")
                code = 1
                break
            if seconds and time.monotonic() - started >= seconds:
                break
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gateway.kill()
        for node in nodes:
            node.close()
        for r in relays:
            r.close()
        await upstream.stop()
        gw_log.close()
        for f in node_logs:
            f.close()
    print(f"\nstopped: {len(upstream.readings)} readings arrived upstream, "
          f"{upstream.duplicates} duplicates; node outboxes kept in {workdir / 'nodes'}")
    if not upstream.readings:
        code = 1
    return code


def _api_port(preferred: int = 8470) -> int:
    """The gateway's usual API port, or any free one if something else holds it."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(n_nodes: int, interval: float, seconds: float, workdir: Path) -> int:
    os.chdir(Path(__file__).resolve().parents[1])
    return asyncio.run(_run(n_nodes, interval, seconds, workdir))
