"""idle: what a quiet street cabinet pays — RSS, CPU wake-ups and start-up time, at rest.

Lantern's gateway runs with 20 serial links on ptys that nobody writes to, as a systemd
service would start it (NOTIFY_SOCKET and WATCHDOG_USEC of packaging/systemd: READY=1 is
the start-up mark and the watchdog pings are part of the idle cost); Node-RED runs the
bench flow (bench/node-red/flow.json) with 20 `serial in` nodes on 20 silent ptys too. Both
run pinned to the same CPU, one after the other, in the same run.

Wake-ups: every thread's voluntary + involuntary context switches (/proc/PID/task/*/status)
over the window; also every thread's run count (/proc/PID/task/*/schedstat, third field).
A thread that is never scheduled costs nothing; each switch in is a wake-up of the CPU for
that process (on an idle Pi, a wake-up from a low-power state).

After the window, a live street's first minutes: a few frames from each of 8 nodes are
delivered to a receiver and the metrics scraped once (what a street loads anyway: the HTTP
sink's first POST, the exporter), and the RSS is read again (`after_traffic`).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import socket
import subprocess
import threading
import time
import tty
import urllib.request
from pathlib import Path
from typing import Any

from lantern.tools.street.upstream import Upstream

from . import frames
from .peers import LanternPeer, NodeRedPeer, Peer, cpu_seconds, render_flow, rss_mb

LINKS = 20
TRAFFIC_NODES, TRAFFIC_FRAMES = 8, 5  # after the window: 5 frames from each of 8 nodes
WATCHDOG_USEC = 30_000_000  # packaging/systemd/lantern-gateway.service: WatchdogSec=30s


class SilentPtys:
    """LINKS pty pairs; the bench holds the masters and never writes to them."""

    def __init__(self, n: int) -> None:
        self.fds: list[int] = []
        self.ports: list[str] = []
        for _ in range(n):
            master, slave = pty.openpty()
            tty.setraw(slave)
            self.fds += [master, slave]
            self.ports.append(os.ttyname(slave))

    def master(self, i: int) -> int:
        return self.fds[2 * i]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class Receiver:
    """The street's upstream (tools/street/upstream.py) on a thread of its own, with its own
    event loop, so that the bench's waits stay plain."""

    def __init__(self) -> None:
        self.upstream = Upstream()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="receiver",
                                       daemon=True)
        self.thread.start()
        self.url: str = self._call(self.upstream.start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def readings(self) -> int:
        async def count() -> int:
            return len(self.upstream.readings)
        n: int = self._call(count())
        return n

    def close(self) -> None:
        self._call(self.upstream.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def after_traffic(pid: int, ptys: SilentPtys, receiver: Receiver, metrics_url: str | None,
                  settle_s: float, timeout: float = 60.0) -> dict[str, Any]:
    """RSS once the idle peer has done a live street's first work: TRAFFIC_FRAMES frames from
    each of TRAFFIC_NODES nodes (node i on link i) delivered upstream, then one scrape of
    its metrics (Lantern's /metrics; Node-RED has none)."""
    nodes = frames.node_ids(TRAFFIC_NODES)
    for i, node in enumerate(nodes):
        os.write(ptys.master(i), b"".join(frames.data_frame(node, seq)
                                          for seq in range(1, TRAFFIC_FRAMES + 1)))
    want = TRAFFIC_NODES * TRAFFIC_FRAMES * frames.readings_per_frame()
    t0 = time.monotonic()
    while (got := receiver.readings()) < want:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"after_traffic: {got} of {want} readings upstream "
                               f"after {timeout:g}s")
        time.sleep(0.05)
    delivered_s = time.monotonic() - t0
    scraped = 0
    if metrics_url is not None:
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            scraped = len(r.read())
    time.sleep(settle_s)
    return {"frames": TRAFFIC_NODES * TRAFFIC_FRAMES, "readings_delivered": got,
            "delivered_s": round(delivered_s, 2), "metrics_bytes": scraped,
            "rss_mb": round(rss_mb(pid, "VmRSS"), 1),
            "peak_rss_mb": round(rss_mb(pid, "VmHWM"), 1)}


def thread_counts(pid: int) -> dict[int, tuple[int, int, int]]:
    """tid → (voluntary, involuntary context switches, schedstat run count)."""
    out: dict[int, tuple[int, int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                sw = {k: int(v) for k, _, v in (line.partition(":\t") for line in f)
                      if k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")}
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                runs = int(f.read().split()[2])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (sw["voluntary_ctxt_switches"], sw["nonvoluntary_ctxt_switches"], runs)
    return out


def wakeups(pid: int, seconds: float) -> dict[str, Any]:
    """Wake-ups per second over `seconds` of the idle process, all threads; its RSS sampled
    every second meanwhile (reading /proc wakes the bench, not the process)."""
    before, cpu0, t0 = thread_counts(pid), cpu_seconds(pid), time.monotonic()
    rss = [rss_mb(pid, "VmRSS")]
    while time.monotonic() - t0 < seconds:
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
        rss.append(rss_mb(pid, "VmRSS"))
    after, cpu1, took = thread_counts(pid), cpu_seconds(pid), time.monotonic() - t0
    zero = (0, 0, 0)
    d = {tid: tuple(a - b for a, b in zip(c, before.get(tid, zero), strict=True))
         for tid, c in after.items()}
    vol, invol, runs = (sum(x[i] for x in d.values()) for i in range(3))
    rss.sort()
    return {"seconds": round(took, 1), "threads": len(after),
            "context_switches_per_s": round((vol + invol) / took, 2),
            "voluntary": vol, "involuntary": invol,
            "schedstat_runs_per_s": round(runs / took, 2),
            "main_thread_switches": sum(d.get(pid, zero)[:2]),
            "cpu_ms_per_min": round((cpu1 - cpu0) / took * 60e3, 1),
            "rss_mb_min_median_max": [round(rss[0], 1), round(rss[len(rss) // 2], 1),
                                      round(rss[-1], 1)]}


class NotifySocket:
    """A service manager's end of sd_notify(3): datagrams on a unix socket."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages = self.watchdog_pings = 0
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify", daemon=True)

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> str:
        """The READY=1 datagram (its STATUS= names the status page)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the gateway exited before READY=1")
            self.sock.settimeout(0.2)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in msg.splitlines():
                self._reader.start()
                return msg
        raise RuntimeError(f"no READY=1 within {timeout}s")

    def _read(self) -> None:
        """After READY=1, every STATUS= and WATCHDOG=1 is read as systemd reads them: a
        queue nobody reads fills, and the gateway's sends then fail with EAGAIN."""
        while not self._closing.is_set():
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages += 1
            self.watchdog_pings += "WATCHDOG=1" in msg.splitlines()

    def close(self) -> None:
        self._closing.set()
        if self._reader.is_alive():
            self._reader.join(5)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def _launch(peer: Peer, cmd: list[str], env: dict[str, str]
            ) -> tuple[subprocess.Popen[bytes], float]:
    cpu = peer.cpu
    with open(peer.log, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu >= 0 else None)
    peer.proc = proc
    return proc, t0


def gateway_idle(workdir: Path, ptys: SilentPtys, cpu: int, seconds: float, settle_s: float
                 ) -> dict[str, Any]:
    receiver = Receiver()
    peer = LanternPeer(workdir, ptys.ports[0], receiver.url, frames.node_ids(TRAFFIC_NODES), cpu)
    peer.more_ports = tuple(ptys.ports[1:])
    notify = NotifySocket(peer.workdir / "notify.sock")
    try:
        cmd, env = peer.command()
        proc, t0 = _launch(peer, cmd, {**env, "NOTIFY_SOCKET": str(notify.path),
                                       "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        msg = notify.wait_ready(proc, 60.0)
        ready_s = time.monotonic() - t0
        page = re.search(r"status page (http://\S+/)", msg)
        time.sleep(settle_s)
        out = {"links": LINKS, "ready_s": round(ready_s, 3),
               "ready_signal": "sd_notify READY=1 on NOTIFY_SOCKET",
               **_idle(proc.pid, seconds),
               "after_traffic": after_traffic(proc.pid, ptys, receiver,
                                              page[1] + "metrics" if page else None, settle_s),
               # read from the socket after READY=1, as systemd does (none may fail: EAGAIN)
               "watchdog_pings": notify.watchdog_pings, "notify_messages": notify.messages}
    finally:
        peer.stop()
        notify.close()
        receiver.close()
    if "open at" not in peer.tail(1 << 20):
        raise RuntimeError(f"the gateway opened no link:\n{peer.tail()}")
    return out


def node_red_flow(ports: list[str], url: str) -> str:
    """The bench flow with one `serial in` node (and its port) per pty, all into the decoder."""
    flow = json.loads(render_flow(ports[0], url, 25, 1.0))
    port = next(n for n in flow if n["id"] == "lantern-port")
    inp = next(n for n in flow if n["id"] == "lantern-in")
    for i, p in enumerate(ports[1:], 1):
        flow.append({**port, "id": f"lantern-port-{i}", "serialport": p})
        flow.append({**inp, "id": f"lantern-in-{i}", "serial": f"lantern-port-{i}",
                     "y": inp["y"] + 40 * i})
    return json.dumps(flow, indent=1)


def node_red_idle(workdir: Path, ptys: SilentPtys, cpu: int, seconds: float, settle_s: float
                  ) -> dict[str, Any]:
    receiver = Receiver()
    peer = NodeRedPeer(workdir, ptys.ports[0], receiver.url, frames.node_ids(TRAFFIC_NODES), cpu)
    cmd, env = peer.command()  # writes the one-port flow; replaced by the 20-port one below
    Path(env["LANTERN_NR_FLOW"]).write_text(node_red_flow(ptys.ports, peer.url))
    try:
        proc, t0 = _launch(peer, cmd, env)
        # Node-RED has no sd_notify: ready = every serial port reported open in its log
        # ("serial port /dev/pts/N opened at 115200 baud"); polled every 10 ms
        deadline = t0 + 60.0
        while peer.tail(1 << 20).count("opened at") < LINKS:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node-red not ready:\n{peer.tail()}")
            time.sleep(0.01)
        ready_s = time.monotonic() - t0
        time.sleep(settle_s)
        return {"links": LINKS, "ready_s": round(ready_s, 3),
                "ready_signal": f"all {LINKS} 'serial port ... opened at' log lines",
                **_idle(proc.pid, seconds),
                "after_traffic": after_traffic(proc.pid, ptys, receiver, None, settle_s)}
    finally:
        peer.stop()
        receiver.close()


def _idle(pid: int, seconds: float) -> dict[str, Any]:
    w = wakeups(pid, seconds)
    return {"rss_mb": w["rss_mb_min_median_max"][1], "wakeups": w,
            "wakeups_per_s": w["context_switches_per_s"]}


def run(workdir: Path, seconds: float = 60.0, settle_s: float = 5.0) -> dict[str, Any]:
    """Both peers idle, one after the other, on the same CPU; the window starts `settle_s`
    after ready (start-up work, first timers)."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    ptys = SilentPtys(LINKS)
    try:
        lantern = gateway_idle(workdir / "idle", ptys, cpu, seconds, settle_s)
        node_red = node_red_idle(workdir / "idle", ptys, cpu, seconds, settle_s)
    finally:
        ptys.close()
    return {"lantern": lantern, "node_red": node_red,
            "rss_ratio": round(lantern["rss_mb"] / node_red["rss_mb"], 2),
            "rss_ratio_after_traffic": round(lantern["after_traffic"]["rss_mb"]
                                             / node_red["after_traffic"]["rss_mb"], 2),
            "setup": f"{LINKS} silent serial links (ptys) each, {seconds:g} s window after "
                     f"{settle_s:g} s of rest, both pinned to CPU {cpu}; after_traffic: "
                     f"{TRAFFIC_FRAMES} frames from each of {TRAFFIC_NODES} nodes delivered "
                     "upstream, Lantern's /metrics scraped once, RSS read after "
                     f"{settle_s:g} s more; the gateway with "
                     f"NOTIFY_SOCKET and WATCHDOG_USEC={WATCHDOG_USEC} as under systemd, its "
                     "local API on; Node-RED headless (no editor)"}
