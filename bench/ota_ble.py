"""ota_transfer_ble: a whole update bundle over the gateway's BLE link, through a virtual radio.

The gateway's real BLE link (agent/links/ble.py, bleak on the bumble backend) and its
transfer code (agent/ota/transfer.py push, window 4) send a full bundle of the firmware for
the test board to one node: the firmware's BLE link, commands and update code on CPython
(tests/ble/harness.py OtaNode, which boots as main.py does), sampling every 200 ms meanwhile.

bumble's radio has no airtime: a write with response completes as soon as both Python BLE
stacks and the firmware have handled it. The measured figures are that CPU cost, never a
radio's rate. `estimate_real_radio` is computed from the protocol instead: each CTRL segment
is one ATT Write Request and the next waits for its response, so at best one segment per
connection event. For the chunks this run sent, file bytes / (segments x interval).

Run in a process of its own (bench/ota.py ota_transfer_ble does): the harness installs
the fake `bluetooth` module and MicroPython's names into the interpreter.

    python -m bench.ota_ble [--mtu M ...]    # prints one JSON object
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.agent import nodecmd
from lantern.agent.links import ble as ble_link
from lantern.agent.links.ble_session import segments
from lantern.agent.ota.transfer import TransferStats, push, split
from lantern.tools.field import provision_steps as ps
from lantern.tools.field import release
from tests.ble.harness import World, add_ota_node, restore_boot, until

from .ota import _Timed

BOARD = "unix-sim"  # the board tests/ble/harness.py boots
INTERVALS_MS = (7.5, 30.0)
MEANING = (
    "The virtual radio (bumble's in-process link) has no airtime: a GATT write with response "
    "completes as soon as the gateway's Python BLE stack, the node's and the node firmware "
    "on CPython have handled it. The measured figures are that CPU cost on this machine; they "
    "do not predict a radio. estimate_real_radio is computed from the protocol, not measured: "
    "each CTRL segment (ATT MTU - 4 bytes of message) is one write with response, and the "
    "next waits for its response, so at best one segment per connection event: file bytes/s "
    "= file bytes / (CTRL segments of the CHUNK commands x connection interval). OFFER, APPLY, "
    "the ACKs of packs and stacks that answer a write only in the next event make it slower.")


def ctrl_segments(chunk_sizes: list[int], mtu: int, key: bytes, node_id: str) -> int:
    """CTRL writes that carry CHUNK commands of these sizes at this ATT MTU, as the gateway
    seals and cuts them (agent/nodecmd.py command_body, agent/links/ble_session.py)."""
    size = max(20, mtu - 3)  # what the session writes: max_write_without_response_size
    counter = int(time.time() * 1000)  # the channel's counters are Unix ms
    n, offset = 0, 0
    for i, length in enumerate(chunk_sizes):
        body = nodecmd.command_body(key, node_id, counter + i, nodecmd.OP_UPDATE_CHUNK,
                                    {1: offset, 2: bytes(length)})
        n += len(segments(bytes((1,)) + body, size))  # the frame type byte leads the message
        offset += length
    return n


def estimate(files: int, chunk: int, mtu: int, key: bytes, node_id: str) -> dict[str, Any]:
    """The chunk phase of a file area of `files` bytes sent in chunks of `chunk` bytes (none
    resent) on a real radio at each connection interval, one CTRL segment per event."""
    sizes = [min(chunk, files - off) for off in range(0, files, chunk)]
    segs = ctrl_segments(sizes, mtu, key, node_id)
    out: dict[str, Any] = {"file_bytes": files, "chunk_bytes": chunk, "ctrl_segments": segs,
                           "segment_message_bytes": max(20, mtu - 3) - 1,
                           "formula": "file_bytes / (ctrl_segments * interval_s)"}
    for ms in INTERVALS_MS:
        seconds = segs * ms / 1000
        out[f"interval_{ms:g}ms"] = {"file_bytes_per_s": round(files / seconds),
                                     "chunk_phase_s": round(seconds, 1)}
    return out


class _Counted(_Timed):
    """_Timed, also noting each CHUNK's size, the ATT MTUs its answers came at, and the packs
    taken when OFFER is sent and APPLY answered."""

    def __init__(self, channel: Any, packs: Any, mtus: Any) -> None:
        super().__init__(channel)
        self._packs, self._mtus = packs, mtus
        self.chunk_sizes: list[int] = []
        self.att_mtus: set[int] = set()
        self.packs: dict[str, int] = {}

    async def command(self, node_id: str, op: int, args: dict[int, Any] | None = None,
                      timeout: float = 5.0, retries: int = 2) -> Any:
        if op == nodecmd.OP_UPDATE_OFFER:
            self.packs.setdefault("offer", self._packs())
        if op == nodecmd.OP_UPDATE_CHUNK and args is not None:
            self.chunk_sizes.append(len(args[2]))
        out = await super().command(node_id, op, args, timeout, retries)
        if op == nodecmd.OP_UPDATE_CHUNK:
            self.att_mtus.update(self._mtus())
        if op == nodecmd.OP_UPDATE_APPLY:
            self.packs["apply"] = self._packs()
        return out


async def transfer_one(workdir: Path, bundle: bytes, pub: bytes, mtu: int,
                       window: int = 4) -> dict[str, Any]:
    """One whole update of one BLE node at this node MTU; the node samples every 200 ms."""
    links: list[Any] = []
    init = ble_link.BleLink.__init__

    def capture(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        links.append(self)

    ble_link.BleLink.__init__ = capture  # type: ignore[method-assign]
    world = World(workdir)
    node = add_ota_node(world, pub, interval_ms=200, sample_limit=0,
                        link_cfg={"adv_interval_ms": 50, "rotate_ms": 100, "mtu": mtu},
                        extra={"update_trial_s": 120})
    try:
        await world.upstream.start()
        await node.start(world.link)
        supervisor = asyncio.create_task(node.supervise(world.link))
        try:
            await world.start_gateway()
            await until(lambda: bool(links) and links[-1].serves(node.node_id), 30,
                        "the node's address proven")
            ble = links[-1]
            metrics = ble.ingest.metrics
            await until(lambda: metrics.frames_received[node.node_id] >= 1, 30, "a first pack")
            timed = _Counted(ble.commander, lambda: metrics.frames_received[node.node_id],
                             lambda: [c.att_mtu for c in node.chip.device.connections.values()]
                             if node.chip is not None else [])
            stats = TransferStats()
            out = await push(timed, node.node_id, bundle, window=window, stats=stats,
                             confirm_s=120)
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
    finally:
        await world.close()
        restore_boot()
        ble_link.BleLink.__init__ = init  # type: ignore[method-assign]
    t = timed.t
    files = len(split(bundle).files)
    chunk_s = t["chunk_answered"] - t["chunk_sent"]
    whole = t["apply_answered"] - t["offer_sent"]
    return {
        "mtu": mtu,
        "att_mtu_seen": sorted(timed.att_mtus),  # the node's connections, at CHUNK answers
        "window": window,
        "outcome": out.status,
        "version": out.version,
        "boots": node.boots,
        "bundle_bytes": len(bundle),
        "file_bytes": files,
        "chunks": timed.chunks,
        "chunks_resent": stats.chunks_resent,
        "offer_to_apply_s": round(whole, 3),
        "chunk_phase_s": round(chunk_s, 3),
        "file_bytes_per_s": round(files / chunk_s),
        "packs_taken_during_transfer": timed.packs["apply"] - timed.packs["offer"],
        # the key's value changes no length
        "estimate_real_radio": estimate(files, max(timed.chunk_sizes), mtu, bytes(32),
                                        node.node_id),
    }


def run(workdir: Path, mtus: tuple[int, ...] = (247, 23), window: int = 4) -> dict[str, Any]:
    """The section's figures: one whole transfer per node MTU, each in a fresh world."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    tool = ps.find_mpy_cross()
    found = ps.mpy_cross_version(tool)
    assert found is not None, f"{tool} does not state its version"
    bundle = release.bundle(key, "2.0.0", 1, "0.1.0", [BOARD], found[1],
                            release.firmware_files(tool, [BOARD]))
    pub = key.public_key().public_bytes_raw()
    res: dict[str, Any] = {"meaning": MEANING, "board": BOARD}
    for mtu in mtus:
        res[f"mtu_{mtu}"] = asyncio.run(transfer_one(workdir / f"mtu-{mtu}", bundle, pub, mtu,
                                                     window))
    res["estimate_real_radio"] = {f"mtu_{m}": res[f"mtu_{m}"].pop("estimate_real_radio")
                                  for m in mtus}
    return res


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mtu", type=int, action="append", help="node ATT MTU (default 247, 23)")
    p.add_argument("--window", type=int, default=4, help="chunks in flight")
    p.add_argument("--workdir", help="state and logs (default: a temporary directory)")
    args = p.parse_args()
    mtus = tuple(args.mtu or (247, 23))
    if args.workdir:
        res = run(Path(args.workdir), mtus, args.window)
    else:
        with tempfile.TemporaryDirectory(prefix="lantern-ota-ble-") as d:
            res = run(Path(d), mtus, args.window)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
