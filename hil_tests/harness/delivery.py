"""Every reading upstream once, bit-exact: the check the end-to-end tests share."""

from __future__ import annotations

import math
import struct

import cbor2
from pycose.headers import KID, PartialIV
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

from lantern.agent import protocol
from lantern.agent.units import UNITS

from .topology import Topology

SAMPLES = 12
RECENT = 1_700_000_000  # 2023-11: a time request's receipt, as the gateway anchors it


def _bits(v: object) -> object:
    """Floats compared by their bits, so 'equal' means bit-exact."""
    return struct.pack(">d", v) if isinstance(v, float) else v


def _f32(v: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", v))[0])


def _is_f32(v: float) -> bool:
    return bool(struct.unpack(">f", struct.pack(">f", v))[0] == v)


def check_delivery(topo: Topology) -> int:
    """Every sampled reading upstream exactly once, bit-exact, each frame verified by pycose."""
    total = 0
    for node in topo.nodes:
        sampled = topo.sampled(node)
        assert sorted(sampled) == list(range(len(sampled))), "sequence numbers skip or repeat"
        key = SymmetricKey(k=node.key)
        packs: dict[int, list[dict[int, object]]] = {}
        for body in topo.wires[node.node_id].data_frames:
            msg = Mac0Message.decode(body)
            msg.key = key
            assert msg.verify_tag(), f"{node.node_id}: a frame on the wire fails pycose"
            seq = int.from_bytes(msg.phdr[PartialIV], "big")
            assert msg.phdr[KID] == node.node_id.encode()
            pack = cbor2.loads(msg.payload)
            assert packs.setdefault(seq, pack) == pack, "one seq, two different packs"
        assert set(packs) == set(sampled), f"{node.node_id}: frames on the wire != sampled"
        for seq, n_readings in sampled.items():
            pack = packs[seq]
            assert len(pack) == n_readings
            # docs/protocol.md §1: no bn (the kid names the node) and no unit for a canonical
            # name; the gateway restores both
            assert not any(-2 in rec or 1 in rec for rec in pack), pack
            bn, bt = f"urn:dev:lantern:{node.node_id}:", pack[0][-3]
            # a time request (docs/time.md) has base time 0, "now": the gateway dates it at its
            # receipt (never 1970); every other pack carries its own absolute time
            relative = seq in topo.time_requests(node)
            assert bt != 0 or relative, f"{node.node_id} seq {seq}: base time 0, no request"
            for i, rec in enumerate(pack):
                up = topo.upstream.readings.get(f"{node.node_id}:{seq}:{i}")
                assert up is not None, f"{node.node_id} seq {seq} reading {i} never arrived"
                assert up["n"] == bn + rec[0]
                assert up["t"] == bt if not relative else up["t"] > RECENT, (up, bt)
                assert up.get("u") == UNITS.get(rec[0])
                assert rec[0] in UNITS or rec[0] == "outbox" or rec[0].endswith(".q"), rec
                v = rec[2]
                assert isinstance(v, int | float) and not math.isnan(v)
                assert isinstance(v, int) or _is_f32(v), f"{rec[0]}: {v!r} is not a float32"
                assert type(up["v"]) is type(v)
                # upstream shows the float32 as its shortest decimal (21.37, not
                # 21.3700008392334): the same float32, bit for bit
                assert _bits(_f32(up["v"]) if isinstance(v, float) else up["v"]) == _bits(v), (
                    f"{up['n']}: {up['v']!r} != {v!r}")
                assert up["v"] == protocol.f32_decimal(v)
                total += 1
    assert len(topo.upstream.readings) == total, "upstream holds readings nobody sampled"
    return total
