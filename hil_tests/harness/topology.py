"""The walking-skeleton topology under test: MicroPython nodes ↔ relay ptys ↔ gateway ↔ upstream."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cbor2

from lantern.agent import protocol
from lantern.agent.config import write_secret
from lantern.agent.errors import FrameError
from lantern.tools.street.faults import Faults, FaultSpec
from lantern.tools.street.sim import Relay, SimNode, gateway_toml, keys_toml
from lantern.tools.street.upstream import Upstream

SAMPLE_LINE = re.compile(rb"sample seq=(\d+) readings=(\d+)")
# a node whose clock is not set yet seals a time request (node/untimed.py, docs/time.md): a
# pack of one record and no reading, printed as a sample line with this tail
TIME_REQUEST = re.compile(rb"sample seq=(\d+) readings=1 outbox=\d+ \(time request")


def _ack(chunk: bytes) -> tuple[list[int], bool]:
    """The sequence numbers an ACK frame names, and whether it carries the gateway's time
    (key 2; its MAC is the node's business)."""
    payload = protocol.parse_mac0(protocol.decode_frame(chunk)[1]).payload
    try:
        ack = cbor2.loads(payload)
    except ValueError:  # CBORDecodeError
        return [], False
    if not isinstance(ack, dict):
        return [], False
    seqs = ack.get(1)
    return ([s for s in seqs if isinstance(s, int)] if isinstance(seqs, list) else [],
            isinstance(ack.get(2), int))


@dataclass
class Wire:
    """Every DATA frame body a node put on the wire, in order (duplicates included)."""

    deframer: protocol.Deframer = field(default_factory=protocol.Deframer)
    data_frames: list[bytes] = field(default_factory=list)
    acks: int = 0
    bad_frames: int = 0  # chunks from the node that are not frames (a node bug: counted)
    down: protocol.Deframer = field(default_factory=protocol.Deframer)
    ack_frames: int = 0  # exact: ACK frames the gateway sent (as sent, before any line fault)
    acked: set[int] = field(default_factory=set)  # sequence numbers those ACKs named
    timed_acks: int = 0  # of those ACK frames, the ones carrying the gateway's time (key 2)
    _sizes: dict[int, int] = field(default_factory=dict)  # seq → readings, authentic frames
    _sized: int = 0  # data_frames[:_sized] are in _sizes

    def pack_sizes(self, key: bytes) -> dict[int, int]:
        """seq → readings of every authentic DATA frame so far (parsed once each)."""
        for body in self.data_frames[self._sized:]:
            self._sized += 1
            with contextlib.suppress(FrameError):
                m = protocol.parse_mac0(body)
                protocol.verify_mac0(key, m)
                self._sizes.setdefault(m.seq, len(protocol.resolve_pack(
                    m.payload, node=m.kid.decode(errors="replace"))))
        return self._sizes

    def tap(self, direction: str, data: bytes) -> None:
        if direction != "up":
            self.acks += data.count(b"\x00") // 2  # rough: frames are 00 COBS 00
            for chunk in self.down.feed(data):
                with contextlib.suppress(FrameError):
                    if chunk is not None and protocol.decode_frame(chunk)[0] == protocol.ACK:
                        self.ack_frames += 1
                        seqs, timed = _ack(chunk)
                        self.acked.update(seqs)
                        self.timed_acks += timed
            return
        for chunk in self.deframer.feed(data):
            if chunk is None:
                self.bad_frames += 1
                continue
            try:
                ftype, body = protocol.decode_frame(chunk)
            except FrameError:
                self.bad_frames += 1
                continue
            if ftype == protocol.DATA:
                self.data_frames.append(body)


@dataclass
class Topology:
    workdir: Path
    n_nodes: int = 2
    interval_ms: int = 200
    sample_limit: int = 0
    node_extra: dict[str, object] = field(default_factory=dict)
    upstream: Upstream = field(default_factory=Upstream)
    relays: list[Relay] = field(default_factory=list)
    nodes: list[SimNode] = field(default_factory=list)
    wires: dict[str, Wire] = field(default_factory=dict)
    gateway: subprocess.Popen[bytes] | None = None
    gw_config: Path | None = None
    gateway_extra: str = ""  # TOML appended to the gateway config (more sinks, [nodes])
    faults: FaultSpec | None = None  # a seeded faulty line on every relay (tools/street/faults.py)
    fault_seed: int = 0
    gateway_wrapper: list[str] = field(default_factory=list)  # command run before the gateway
    node_class: type[SimNode] = SimNode  # QEMU boards: hil_tests/harness/qemu.py
    # node id → seq → frame, as a test read them from the node's flash (power-cut scenario)
    flash_frames: dict[str, dict[int, bytes]] = field(default_factory=dict)
    # the release public key (32 raw bytes) every node is provisioned with (release.pub), so
    # tests can update them (hil_tests/harness/ota.py); None: the nodes refuse updates
    release_pub: bytes | None = None
    clock: str | None = "trust"  # the gateway's [clock] mode (docs/time.md); None: its default

    async def start(self, gateway: bool = True) -> None:
        await self.upstream.start()
        for i in range(self.n_nodes):
            node_id = f"SL-{i + 1:04d}"
            wire = Wire()
            self.wires[node_id] = wire
            relay = Relay(node_id, tap=wire.tap)
            if self.faults is not None:
                relay.faults = Faults(self.faults, self.fault_seed + i)
            relay.start()
            self.relays.append(relay)
            extra = dict(self.node_extra)
            if self.sample_limit:
                extra["sample_limit"] = self.sample_limit
            self.nodes.append(self.node_class(node_id, self.workdir / "nodes",
                                              port=relay.node_port,
                                              interval_ms=self.interval_ms, extra=extra))
        if self.release_pub is not None:
            for n in self.nodes:
                n.release_pub = self.release_pub
        for n in self.nodes:
            n.write_config()
        keys = self.workdir / "keys.toml"
        write_secret(keys, keys_toml(self.nodes))
        self.gw_config = self.workdir / "gateway.toml"
        self.gw_config.write_text(gateway_toml(self.workdir / "gw-state", keys,
                                               [r.gateway_port for r in self.relays],
                                               self.upstream.url, max_age_s=0.2,
                                               extra=self.gateway_extra, clock=self.clock))
        if gateway:
            self.start_gateway()
        for n in self.nodes:
            n.start(stdout=subprocess.PIPE)

    def start_gateway(self) -> None:
        assert self.gw_config is not None
        log = open(self.workdir / "gateway.log", "ab")  # noqa: SIM115 - closed by the child
        self.gateway = subprocess.Popen(
            [*self.gateway_wrapper, sys.executable, "-m", "lantern", "gateway", "run",
             "--config", str(self.gw_config)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill_gateway(self, sig: int = signal.SIGKILL) -> None:
        if self.gateway and self.gateway.poll() is None:
            self.gateway.send_signal(sig)
            self.gateway.wait(timeout=10)

    def gateway_log(self) -> str:
        """What the gateway printed ("" if none was started)."""
        log = self.workdir / "gateway.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def sampled(self, node: SimNode) -> dict[int, int]:
        """seq → number of readings, from what the node printed when it sealed each pack."""
        return self._samples.setdefault(node.node_id, {})

    def time_requests(self, node: SimNode) -> set[int]:
        """The seqs of `sampled` that are time requests, not samples of the sensors."""
        return self._requests.setdefault(node.node_id, set())

    def samples(self, node: SimNode) -> dict[int, int]:
        """`sampled` without the time requests: the packs of the node's sensors."""
        requests = self.time_requests(node)
        return {s: n for s, n in self.sampled(node).items() if s not in requests}

    _samples: dict[str, dict[int, int]] = field(default_factory=dict)
    _requests: dict[str, set[int]] = field(default_factory=dict)
    _outputs: dict[str, bytearray] = field(default_factory=dict)

    def collect_output(self) -> None:
        """Read what nodes printed so far (non-blocking) and parse their sample lines."""
        import os

        for n in self.nodes:
            if n.proc is None or n.proc.stdout is None:
                continue
            fd = n.proc.stdout.fileno()
            os.set_blocking(fd, False)
            buf = self._outputs.setdefault(n.node_id, bytearray())
            with contextlib.suppress(BlockingIOError, TypeError):
                while chunk := os.read(fd, 65536):
                    buf += chunk
            self.parse_samples(n, buf, 0, len(buf))

    def parse_samples(self, node: SimNode, text: bytes | bytearray, start: int, end: int) -> None:
        """Record the packs (and which are time requests) the node printed in text[start:end]."""
        for m in SAMPLE_LINE.finditer(text, start, end):
            self.sampled(node)[int(m.group(1))] = int(m.group(2))
        for m in TIME_REQUEST.finditer(text, start, end):
            self.time_requests(node).add(int(m.group(1)))

    def output(self, node: SimNode) -> str:
        return self._outputs.get(node.node_id, bytearray()).decode(errors="replace")

    async def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.collect_output()
            if cond():
                return
            await asyncio.sleep(0.05)
        self.collect_output()
        outputs = "\n".join(f"--- {n.node_id}\n{self.output(n)[-2000:]}" for n in self.nodes)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{outputs}\n"
                             f"--- gateway\n{self.gateway_log()[-3000:]}")

    def outbox(self, node: SimNode) -> list[int]:
        d = node.state_dir / "outbox"
        return sorted(int(p.name) for p in d.iterdir() if not p.name.endswith(".tmp"))

    async def stop(self) -> None:
        for n in self.nodes:
            n.close()
        self.kill_gateway(signal.SIGTERM)
        for r in self.relays:
            r.close()
        await self.upstream.stop()
