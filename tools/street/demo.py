"""`lantern demo`: the street of `lantern sim` → the gateway → an upstream that prints."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .command import Street, bad_arguments, run_until_stopped, setup_failed
from .sim import gateway_toml
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

    A deployed gateway refuses such a queue and changes nothing (agent/queue/store.py); the demo's
    readings are the demo's, so after an upgrade it starts again rather than stop.
    """
    from lantern.agent.errors import ConfigError
    from lantern.agent.queue.layout import QUEUE_FILE, check_layout

    try:
        check_layout(state / QUEUE_FILE)
    except ConfigError as e:
        aside = state.with_name(f"{state.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        state.rename(aside)
        print(f"{e.args[0].split(';')[0]}: the demo moved it to {aside} and starts with an "
              "empty queue", flush=True)


async def _run(n_nodes: int, interval: float, seconds: float, workdir: Path) -> int:
    upstream = Upstream(listener=_show)
    url = await upstream.start()
    try:
        street = Street(n_nodes, interval, workdir)  # `lantern sim`, plus a gateway, a receiver
    except OSError as e:
        await upstream.stop()
        return setup_failed(workdir, e, "lantern demo")
    workdir = street.workdir
    _fresh_queue_if_old(workdir / "gateway-state")
    gw_cfg = workdir / "gateway.toml"
    api_port = _api_port()
    gw_cfg.write_text(gateway_toml(workdir / "gateway-state", street.keys_file, street.ports, url)
                      + f"\n[api]\nport = {api_port}\n")
    logs = street.logs
    gw_log = open(logs / "gateway.log", "ab")  # noqa: SIM115 - lives as long as the demo
    gateway = subprocess.Popen(
        [sys.executable, "-m", "lantern", "gateway", "run", "--config", str(gw_cfg)],
        stdout=gw_log, stderr=subprocess.STDOUT, start_new_session=True)
    street.start()
    print(f"Lantern demo: {n_nodes} nodes on MicroPython (unix port, "
          f"{street.nodes[0].heap_kb()} KB heap), sampling every {interval:g}s → gateway → "
          f"upstream {url}", flush=True)
    print(f"  logs: {logs}/   gateway config: {gw_cfg}   queue: "
          f"{workdir / 'gateway-state' / 'queue.sqlite'}", flush=True)
    print(f"  status page: http://127.0.0.1:{api_port}/  (nodes, live values, queue, upstream)",
          flush=True)
    print("  Ctrl-C stops everything.\n", flush=True)

    code = 0
    try:
        stop = asyncio.create_task(run_until_stopped(seconds))
        while not stop.done():
            await asyncio.wait({stop}, timeout=1.0)
            if gateway.poll() is not None:
                print(f"gateway exited with {gateway.returncode}; see {logs / 'gateway.log'}")
                code = 1
                break
            if dead := street.dead():
                print(f"node(s) {', '.join(dead)} exited; see {logs}/")
                code = 1
                break
        stop.cancel()
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gateway.kill()
        street.close()
        await upstream.stop()
        gw_log.close()
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
    if why := bad_arguments(n_nodes, interval, seconds):
        print(f"lantern demo: {why}", file=sys.stderr)
        return 2
    os.chdir(Path(__file__).resolve().parents[2])
    return asyncio.run(_run(n_nodes, interval, seconds, workdir))
