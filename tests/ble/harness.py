"""The BLE tier's world: nodes (the real firmware, on CPython) and the real gateway on one radio.

Each node is `node.app.Node` with its BLE link, on its own virtual controller (fake
`bluetooth` module, tests/ble/upy); the gateway is `agent.gateway.run` with bleak on the
bumble backend (tests/ble/bleak_bumble.py); upstream is the project's HTTP receiver.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import json
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bumble import hci, ll
from bumble.controller import Controller
from bumble.link import LocalLink
from prometheus_client.parser import text_string_to_metric_families

from lantern.agent import gateway
from lantern.agent.config import load_config, write_secret
from lantern.agent.links.ble import BleBackend
from lantern.tools.street.upstream import Upstream

from . import mpcompat
from .bleak_bumble import Adapter

mpcompat.install()

import bluetooth  # noqa: E402 - tests/ble/upy, on sys.path after install()
from node import app, start  # noqa: E402
from node.hal import unix as unix_hal  # noqa: E402

app.gc = mpcompat.MicroGC()  # type: ignore[assignment]

BOARD = Path(__file__).resolve().parents[2] / "boards" / "unix-sim.json"


class SimHal:
    """The unix simulated board's HAL plus a radio (the fake `bluetooth` module).

    street=True: the sensors are the real drivers on the simulated street's register-level
    chips (node/hal/unix.py sensor_buses). street=False: the simple climate model, which
    samples instantly, for tests about moving many frames.
    """

    def __init__(self, street: bool) -> None:
        self.street = street

    def __getattr__(self, name: str) -> Any:
        if name == "sensor_buses" and not self.street:
            raise AttributeError(name)
        return getattr(unix_hal, name)

    @staticmethod
    def heap_free() -> int:
        return 100_000  # CPython's heap says nothing about an ESP32's

    @staticmethod
    def bluetooth() -> Any:
        return bluetooth

    @staticmethod
    def sensors(board: dict[str, Any], node_id: str) -> list[Any]:
        from node.drivers.sim_climate import SimClimate

        return [SimClimate(sum(node_id.encode()))]


class Air(LocalLink):
    """bumble's LocalLink, with two link-layer events as they happen on air.

    A control PDU to a radio that is off is lost. bumble raises instead (ACL data it already
    drops), and it raises inside the sender's HCI Disconnect, before the sender drops its side
    of the connection: a gateway that gave up on a node during the node's power cut kept a
    stale connection to it, and that controller then refused every later connect
    ("Connection for ... already exists?").

    A connection request (CONNECT_IND) no advertiser takes fails to be established. bumble's
    initiator reports the connection made as it sends the request, and a node whose advertiser
    is off just then (start_advertising disables the old one over several HCI round trips,
    each time the firmware rotates its advert) ignores it: the gateway held a connection the
    node never had, until its own connect timeout. A real initiator hears nothing in the
    first 6 connection intervals and reports Disconnection Complete, reason 0x3E "connection
    failed to be established" (Core spec Vol 6 Part B 4.5.2); so does this link.
    `refused_connects` counts those requests.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refused_connects = 0

    def send_ll_control_pdu(self, sender_address: Any, receiver_address: Any,
                            packet: Any) -> None:
        if self.find_le_controller(receiver_address) is not None:
            super().send_ll_control_pdu(sender_address, receiver_address, packet)

    def send_advertising_pdu(self, sender_controller: Controller,
                             packet: ll.AdvertisingPdu) -> None:
        if not isinstance(packet, ll.ConnectInd):
            super().send_advertising_pdu(sender_controller, packet)
            return
        # the initiator has just added its side of the connection (bumble's create_le_connection)
        conn = sender_controller.le_connections.get(packet.advertiser_address)
        asyncio.get_running_loop().call_soon(self._connect_ind, sender_controller, conn, packet)

    def _connect_ind(self, initiator: Controller, conn: Any, packet: ll.ConnectInd) -> None:
        """Deliver a CONNECT_IND; if no controller took it, fail the initiator's side."""
        peers = {c: c.le_connections.get(packet.initiator_address)
                 for c in self.controllers if c is not initiator}
        for c in peers:
            c.on_ll_advertising_pdu(packet)
        for c, old in peers.items():
            new = c.le_connections.get(packet.initiator_address)
            if new is not None and new is not old:
                return  # an advertiser took it
        self.refused_connects += 1
        interval_s = max(packet.interval, 6) * 1.25e-3
        asyncio.get_running_loop().call_later(6 * interval_s, self._not_established, initiator,
                                              conn, packet.advertiser_address)

    @staticmethod
    def _not_established(initiator: Controller, conn: Any, peer: Any) -> None:
        if conn is not None and initiator.le_connections.get(peer) is conn:  # not gone already
            initiator.on_le_disconnected(
                conn, hci.HCI_ErrorCode.CONNECTION_FAILED_TO_BE_ESTABLISHED_ERROR)


async def until(cond: Callable[[], bool], timeout: float, what: str,
                every: float = 0.02) -> None:
    """Wait for a condition, failing with `what` after `timeout` seconds (CPU is shared)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)


@dataclass
class BleNode:
    node_id: str
    address: str
    root: Path
    link_cfg: dict[str, Any]
    interval_ms: int = 20
    sample_limit: int = 0
    street: bool = False
    sim: dict[str, Any] = field(default_factory=dict)
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    chip: Any = None
    node: Any = None
    task: asyncio.Task[Any] | None = None
    sampled: dict[int, int] = field(default_factory=dict)  # seq -> readings in that pack

    @property
    def state_dir(self) -> Path:
        return self.root / self.node_id

    def write_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        key_file = self.state_dir / "node.key"
        write_secret(key_file, self.key.hex())
        cfg = {"id": self.node_id, "key_file": str(key_file), "board": str(BOARD),
               "state_dir": str(self.state_dir / "flash"), "interval_ms": self.interval_ms,
               "sample_limit": self.sample_limit, "link": {"type": "ble", **self.link_cfg}}
        if self.sim:
            cfg["sim"] = self.sim
        path = self.state_dir / "node.json"
        path.write_text(json.dumps(cfg))
        return path

    async def start(self, link: LocalLink) -> None:
        """Boot the node: a fresh controller at the node's address, the firmware from flash."""
        bluetooth.track_tasks(asyncio.get_running_loop())
        self.chip = bluetooth.Chip(link, self.address)
        await self.chip.power_on()
        cfg = start.load_config(str(self.write_config()))
        board = json.loads(BOARD.read_text())

        async def boot() -> None:
            node = app.Node(cfg, self.make_hal(), board)
            seal = node.seal

            def counting_seal(now: Any, values: dict[str, Any]) -> int:
                # packs differ in size (e.g. energy only once a cycle took >= 1 ms)
                seq: int = seal(now, values)
                self.sampled[seq] = len(values)
                return seq

            node.seal = counting_seal
            self.node = node
            await node.run()

        self.task = self.chip.start(boot, name=self.node_id)
        await until(lambda: self.node is not None and self.node.link is not None, 10,
                    f"{self.node_id} to boot")

    def make_hal(self) -> SimHal:
        return SimHal(self.street)

    async def stop(self) -> None:
        """Power cut: the firmware stops wherever it is and the radio goes silent."""
        if self.chip is not None:
            tasks = list(self.chip.tasks)
            self.chip.power_cut()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(t, 5)
        self.node = None

    @property
    def outbox(self) -> Any:
        return self.node.outbox


@dataclass
class World:
    """Nodes, the gateway (in this process, on the same radio) and an HTTP upstream."""

    workdir: Path
    link: Air = field(default_factory=Air)
    nodes: list[BleNode] = field(default_factory=list)
    upstream: Upstream = field(default_factory=Upstream)
    adapter: Adapter | None = None
    gw_task: asyncio.Task[None] | None = None
    gw_extra: str = ""
    ble_opts: dict[str, Any] = field(default_factory=dict)  # [[links.ble]] settings
    ble_extra: str = ""  # appended after them ([[links.ble.devices]] tables)
    links: list[Any] = field(default_factory=list)  # every BleLink the gateway built
    api: bool = False  # serve the gateway's API (on a free port) for scrapes
    api_urls: list[str] = field(default_factory=list)  # every API the gateway served

    def add_nodes(self, n: int, **kw: Any) -> list[BleNode]:
        link_cfg = kw.pop("link_cfg", {"adv_interval_ms": 50, "rotate_ms": 100})
        out = []
        for _ in range(n):
            i = len(self.nodes) + 1
            node = BleNode(f"SL-{i:04d}", f"F0:00:00:00:01:{i:02X}", self.workdir / "nodes",
                           dict(link_cfg), **kw)
            self.nodes.append(node)
            out.append(node)
        return out

    def gateway_toml(self) -> Path:
        keys = self.workdir / "keys.toml"
        write_secret(keys, "[nodes]\n" + "".join(
            f'"{n.node_id}" = "{n.key.hex()}"\n' for n in self.nodes))
        path = self.workdir / "gateway.toml"
        ble = {"max_connections": 3, "scan_stall_s": 5, "backoff_initial_s": 0.2,
               "backoff_max_s": 2, "connect_timeout_s": 5, "idle_timeout_s": 5, **self.ble_opts}
        path.write_text(
            f'[gateway]\nstate_dir = "{self.workdir / "gw-state"}"\nkeys_file = "{keys}"\n\n'
            f'[batch]\nmax_records = 500\nmax_age_s = 0.2\n\n'
            f'[api]\nenabled = {"true" if self.api else "false"}\nhost = "127.0.0.1"\nport = 0\n\n'
            f'[sinks.http]\nurl = "{self.upstream.url}"\ntimeout_s = 5\n\n'
            "[[links.ble]]\n" + "".join(f"{k} = {v}\n" for k, v in ble.items())
            + f"{self.ble_extra}\n{self.gw_extra}")
        return path

    async def start_gateway(self) -> None:
        if not self.upstream.url:
            await self.upstream.start()
        cfg = load_config(self.gateway_toml())
        if self.adapter is None:
            self.adapter = Adapter(self.link)
        scanner, client = self.adapter.backend()
        self.gw_task = asyncio.create_task(gateway.run(cfg, BleBackend(scanner, client)))
        adapter, starts = self.adapter, self.adapter.scan_starts
        await until(lambda: adapter.scan_starts > starts or self.gw_task.done(), 20,
                    "the gateway to scan")
        if self.gw_task.done():
            self.gw_task.result()

    async def stop_gateway(self) -> None:
        """SIGTERM, as systemd would: the gateway's own handler stops it cleanly."""
        if self.gw_task is None:
            return
        if not self.gw_task.done():
            signal.raise_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.gw_task, 30)
        finally:
            self.gw_task = None

    async def scrape(self) -> str:
        """The running gateway's /metrics, as Prometheus would read it."""
        assert self.api_urls, "the gateway serves no API (set world.api)"
        async with aiohttp.ClientSession() as http, \
                http.get(self.api_urls[-1] + "metrics") as r:
            assert r.status == 200, r.status
            return await r.text()

    @property
    def ble(self) -> Any:
        """The gateway's BleLink (the latest one built), for its counters."""
        assert self.links, "no BLE link built yet"
        return self.links[-1]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stop_gateway()
        for n in self.nodes:
            await n.stop()
        await self.upstream.stop()


def senml_seqs(upstream: Upstream) -> dict[str, set[int]]:
    """node → the sequence numbers whose readings reached upstream."""
    out: dict[str, set[int]] = {}
    for rid in upstream.readings:
        node, seq, _ = rid.rsplit(":", 2)
        out.setdefault(node, set()).add(int(seq))
    return out


def ble_metrics(text: str, link: str) -> dict[str, float]:
    """One link's lantern_ble_* samples in a scrape, keyed as in BleLink.stats."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith("lantern_ble_") or not s.name.endswith("_total"):
                continue
            if s.labels.get("link") != link:
                continue
            key = s.name[len("lantern_ble_"):-len("_total")]
            out[f"rejected_{s.labels['kind']}" if key == "rejected" else key] = s.value
    return out


def check_exported(before: dict[str, int], scraped: dict[str, float],
                   after: dict[str, int]) -> None:
    """Every counter the link kept is on /metrics, with a value it had during the scrape."""
    missing = sorted(set(after) - set(scraped))
    assert not missing, f"BLE counters not exported: {missing}"
    for key, value in scraped.items():
        assert before.get(key, 0) <= value <= after.get(key, 0), (key, before.get(key), value,
                                                                  after.get(key))


# ---------------------------------------------------------------- signed updates (issue 16)

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"


def boot_loader() -> dict[str, Any]:
    """firmware/main.py's functions (`choose` picks the slot, counts a candidate's tries),
    without its top-level calls (its last line boots a node: not in this process)."""
    tree = ast.parse((FIRMWARE / "main.py").read_text())
    tree.body = [n for n in tree.body
                 if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call))]
    ns: dict[str, Any] = {"__name__": "lantern_boot_loader"}
    exec(compile(tree, str(FIRMWARE / "main.py"), "exec"), ns)
    return ns


class Reboot(asyncio.CancelledError):
    """The board resets (node/commands.py, node/ota.py call hal.reset()).

    A reset ends the firmware wherever it is, as a power cut does, and nothing in the
    firmware may catch it: its loops catch Exception (node/window.py), not cancellation.
    """


class OtaHal(SimHal):
    """SimHal whose reset() reboots the node (OtaNode.supervise starts it again)."""

    def __init__(self, street: bool, node: OtaNode) -> None:
        super().__init__(street)
        self._node = node

    def reset(self) -> None:
        node = self._node
        if not node.flush_on_reset and node.chip is not None:
            node.chip.power_cut()  # at once: what the stack still queues is lost
        node.resets.set()
        raise Reboot()


@dataclass
class OtaNode(BleNode):
    """A BLE node that boots as main.py does: the boot record picks the slot, a candidate is
    on trial, and a reset starts it again. The slot's code is .mpy, which CPython cannot
    import, so the tree's sources run in its place under the slot's signed version: what the
    transfer, the boot record and the trial do is the firmware's own."""

    release_pub: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)  # more node.json keys
    # the radio sends the notifications the firmware queued before the board resets. The
    # firmware resets as soon as gatts_notify has queued its last answer (node/commands.py
    # `after`), which on a radio may lose it (the REPLY to APPLY); False shows that
    flush_on_reset: bool = True
    boots: int = 0
    resets: asyncio.Event = field(default_factory=asyncio.Event)
    versions: list[str] = field(default_factory=list)  # the version each boot ran

    def write_config(self) -> Path:
        path = super().write_config()
        cfg = json.loads(path.read_text())
        pub = self.state_dir / "release.pub"
        pub.write_bytes(self.release_pub)
        cfg.update({"release_key": str(pub), **self.extra})
        path.write_text(json.dumps(cfg))
        return path

    def make_hal(self) -> SimHal:
        return OtaHal(self.street, self)

    async def start(self, link: LocalLink) -> None:
        """Boot: main.py's choice of slot and trial, then the node as BleNode boots it."""
        config = str(self.write_config())
        fw, rec, slot, trial = boot_loader()["choose"](config)
        ver = rec.get("cver") if trial else rec.get("ver") if slot else None
        sys.modules["node"].BOOT = {  # type: ignore[attr-defined]
            "fw": fw, "slot": slot, "trial": trial, "rec": rec, "config": config}
        app.FIRMWARE_VERSION = ver or BASE_VERSION
        self.versions.append(app.FIRMWARE_VERSION)
        self.boots += 1
        await super().start(link)

    async def supervise(self, link: LocalLink) -> None:
        """Start the node again each time it resets (a board's reset; run as a task)."""
        while True:
            await self.resets.wait()
            self.resets.clear()
            ble = self.chip.ble if self.chip is not None else None
            if self.flush_on_reset and ble is not None:
                await until(functools.partial(_sent_all, ble), 5, "the radio's last answers")
            await self.stop()
            await self.start(link)


def _sent_all(ble: Any) -> bool:
    return ble._queued_notifies == 0  # type: ignore[no-any-return]


BASE_VERSION = app.FIRMWARE_VERSION  # what the provisioned firmware says it runs


def restore_boot() -> None:
    """Undo what OtaNode.start set for the whole process (other tests boot the plain way)."""
    app.FIRMWARE_VERSION = BASE_VERSION
    with contextlib.suppress(AttributeError):
        del sys.modules["node"].BOOT


def add_ota_node(world: World, release_pub: bytes, **kw: Any) -> OtaNode:
    """One OtaNode in `world`, named and addressed as add_nodes names its nodes."""
    link_cfg = kw.pop("link_cfg", {"adv_interval_ms": 50, "rotate_ms": 100})
    i = len(world.nodes) + 1
    node = OtaNode(f"SL-{i:04d}", f"F0:00:00:00:01:{i:02X}", world.workdir / "nodes",
                   dict(link_cfg), release_pub=release_pub, **kw)
    world.nodes.append(node)
    return node
