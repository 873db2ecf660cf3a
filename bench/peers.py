"""The two systems under test as processes: Lantern's gateway and Node-RED doing its job.

Each reads frames from a pty slave, decodes and verifies them, batches them (500 readings
or 1 s) and POSTs SenML-JSON to the same local receiver. Both run pinned to the same one
CPU so that they are compared per core; /proc gives their CPU time and peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lantern.agent.config import write_secret
from lantern.agent.units import UNITS

from . import frames

ROOT = Path(__file__).resolve().parents[1]
NODE_RED_HOME = ROOT / ".build/node-red"
NODE_RED_JS = NODE_RED_HOME / "node_modules/node-red/red.js"
NODE_RED_SRC = Path(__file__).resolve().parent / "node-red"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def fresh_node_state(node: Any) -> None:
    """Start a bench node from nothing: its state and the marker that its key has run
    (firmware/node/app.py refuses a used key whose counters are gone). Its gateway starts
    with an empty queue too, so reusing the key from sequence 0 opens no replay here."""
    if node.state_dir.exists():
        for p in sorted(node.state_dir.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    (node.dir / "node.key.used").unlink(missing_ok=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """VmHWM: the peak resident set; VmRSS: the current one."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_peak_rss(pid: int) -> None:
    """Start a new VmHWM period (proc(5): writing 5 to clear_refs resets the peak RSS)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class Peer:
    """A system under test: a child process, its log, and readiness by a log line."""

    name = ""
    ready_text = ""

    def __init__(self, workdir: Path, port: str, url: str, nodes: list[str], cpu: int) -> None:
        self.workdir = workdir.resolve() / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.url, self.nodes, self.cpu = port, url, nodes, cpu
        self.log = self.workdir / "log.txt"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        cmd, env = self.command()
        with open(self.log, "wb") as log:
            cpu = self.cpu
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu >= 0 else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.tail()}")
            if self.ready_text in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        """Stop the process we started, by its pid."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class LanternPeer(Peer):
    name = "lantern"
    ready_text = "open at"
    baud = 115200
    keys_toml = ""  # default: the bench keys of self.nodes
    more_ports: tuple[str, ...] = ()

    def command(self) -> tuple[list[str], dict[str, str]]:
        keys = self.workdir / "keys.toml"
        write_secret(keys, self.keys_toml or frames.keys_toml(self.nodes))
        state = self.workdir / "state"
        if state.exists():
            for p in state.iterdir():
                p.unlink()
        cfg = self.workdir / "gateway.toml"
        cfg.write_text("\n".join([
            "[gateway]", f'state_dir = "{state}"', f'keys_file = "{keys}"', "",
            "[batch]", "max_records = 500", "max_age_s = 1.0", "",
            "[sinks.http]", f'url = "{self.url}"', "timeout_s = 10", "",
            # the local API as deployed, on a free port (several gateways may run at once)
            "[api]", "port = 0", "",
            *(line for port in [self.port, *self.more_ports] for line in (
                "[[links.serial]]", f'port = "{port}"', f"baud = {self.baud}", ""))]))
        return [sys.executable, "-m", "lantern", "gateway", "run", "--config", str(cfg)], {}


def render_flow(port: str, url: str, batch_frames: int, batch_age_s: float) -> str:
    """bench/node-red/flow.json with the port, URL, batch and function code filled in."""
    flow = json.loads((NODE_RED_SRC / "flow.json").read_text())
    fill = {"@PORT@": port, "@URL@": url, "@BATCH_FRAMES@": str(batch_frames),
            "@BATCH_AGE_S@": str(batch_age_s)}
    for node in flow:
        for k, v in node.items():
            if isinstance(v, str) and v.startswith("@") and v.endswith("@"):
                node[k] = fill[v] if v in fill else (NODE_RED_SRC / v.strip("@")).read_text()
    return json.dumps(flow, indent=1)


class NodeRedPeer(Peer):
    name = "node-red"
    ready_text = "opened at"

    def command(self) -> tuple[list[str], dict[str, str]]:
        if not NODE_RED_JS.exists():
            raise FileNotFoundError(f"{NODE_RED_JS} is missing: run `make node-red` first")
        user = self.workdir / "user"
        user.mkdir(exist_ok=True)
        flow = user / "flows.json"
        # 500 readings per batch, like the gateway's batch.max_records
        per_batch = max(1, 500 // frames.readings_per_frame())
        flow.write_text(render_flow(self.port, self.url, per_batch, 1.0))
        env = {"LANTERN_NR_MODULES": str(NODE_RED_HOME / "node_modules"),
               "LANTERN_NR_FLOW": str(flow), "LANTERN_NR_USERDIR": str(user),
               "LANTERN_NR_KEYS": json.dumps({n: frames.key_of(n).hex() for n in self.nodes}),
               "LANTERN_NR_UNITS": json.dumps(dict(UNITS))}
        return ["node", str(NODE_RED_JS), "--settings", str(NODE_RED_SRC / "settings.js"),
                "--userDir", str(user)], env
