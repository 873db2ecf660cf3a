"""Accounting for the reliability scenarios: what the nodes sealed against what arrived upstream.

The oracle is the wire as the node put it out (the relay's tap sees the true bytes, before
any injected fault): every DATA frame is verified with the node's key and resolved to the
SenML records the gateway should forward. Upstream then holds, per reading id, either
exactly that record (delivered), nothing (lost), or something else (accepted corrupt).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from dataclasses import dataclass, field
from typing import Any

from lantern.agent import protocol
from lantern.agent.errors import FrameError

from .topology import Topology

SAMPLE_ALL = re.compile(r"sample seq=(\d+) readings=(\d+)")


def _canon(r: dict[str, Any]) -> str:
    """Exact comparison: JSON keeps ints and floats apart and floats round-trip bit-exact.

    `bver` is left out: the HTTP sink adds it to a record with a secondary unit (RFC 8798,
    RFC 9100), the pack the node sealed has none; it says the version, not the reading."""
    return json.dumps({k: v for k, v in r.items() if k != "bver"}, sort_keys=True)


@dataclass
class Tally:
    sent: int = 0  # readings the nodes made durable (packs reported, on the wire or on flash)
    delivered: int = 0  # of those, upstream holds exactly the sealed record
    lost: int = 0  # sealed, never upstream (and not counted as evicted by the gateway)
    evicted: int = 0  # dropped by the gateway's evict_oldest policy, counted by it
    accepted_corrupt: int = 0  # upstream records that are no reading any node sealed
    duplicates_upstream: int = 0  # repeats upstream (same id)
    conflicting_duplicates: int = 0  # repeats upstream with the same id but other content
    out_of_order: int = 0  # packs that reached upstream before an older pack of their node
    corrupt_frames_sent: int = 0  # DATA frames from a node that fail its own key or SenML
    seq_reused: int = 0  # one node, one sequence number, two different frames
    missing: dict[str, list[str]] = field(default_factory=dict)  # node → lost reading ids

    def row(self) -> dict[str, Any]:
        return {"sent": self.sent, "delivered": self.delivered, "lost": self.lost,
                "duplicates_upstream": self.duplicates_upstream,
                "accepted_corrupt": self.accepted_corrupt}


def sealed_seqs(topo: Topology, node_id: str) -> list[int]:
    """Every `sample seq=` line the node printed, across restarts, repeats included."""
    node = next(n for n in topo.nodes if n.node_id == node_id)
    return [int(m.group(1)) for m in SAMPLE_ALL.finditer(topo.output(node))]


def packs(topo: Topology, node_id: str) -> dict[int, int]:
    """seq → readings of every pack the node made durable: reported sealed, on the wire, or
    seen on its flash (a power cut can land after a pack's write and before its report)."""
    node = next(n for n in topo.nodes if n.node_id == node_id)
    out = dict(topo.wires[node_id].pack_sizes(node.key))
    for seq, body in topo.flash_frames.get(node_id, {}).items():
        if seq not in out:
            with contextlib.suppress(FrameError):
                out[seq] = len(protocol.resolve_pack(protocol.parse_mac0(body).payload,
                                                     node=node_id))
    out.update(topo.sampled(node))
    return out


def tally(topo: Topology, evicted: int = 0) -> Tally:
    t = Tally(duplicates_upstream=topo.upstream.duplicates,
              conflicting_duplicates=topo.upstream.conflicting)
    expected: dict[str, str] = {}
    for node in topo.nodes:
        nid = node.node_id
        frames: dict[int, bytes] = {}
        # the wire first, then the node's flash as a test saw it between power cuts
        for body in [*topo.wires[nid].data_frames, *topo.flash_frames.get(nid, {}).values()]:
            try:
                m = protocol.parse_mac0(body)
                protocol.verify_mac0(node.key, m)
                if m.kid != nid.encode():
                    raise FrameError("cose", "kid of another node")
                records = protocol.resolve_pack(m.payload, node=nid)
            except FrameError:
                t.corrupt_frames_sent += 1
                continue
            if frames.setdefault(m.seq, body) != body:
                t.seq_reused += 1
                continue
            for i, r in enumerate(records):
                r["id"] = f"{nid}:{m.seq}:{i}"
                expected[r["id"]] = _canon(r)
        t.corrupt_frames_sent += topo.wires[nid].bad_frames
        # packs the node sealed but never put on the wire count as sent (and so as lost)
        for seq, n in topo.sampled(node).items():
            if seq not in frames:
                for i in range(n):
                    expected.setdefault(f"{nid}:{seq}:{i}", "")
        seqs = sealed_seqs(topo, nid)
        t.seq_reused += len(seqs) - len(set(seqs))
        t.out_of_order += _out_of_order(topo, nid, frames)
    up = topo.upstream.readings
    t.sent = len(expected)
    for rid, want in expected.items():
        got = up.get(rid)
        if got is None:
            t.missing.setdefault(rid.split(":", 1)[0], []).append(rid)
        elif _canon(got) == want:
            t.delivered += 1
        else:
            t.accepted_corrupt += 1
    t.accepted_corrupt += sum(1 for rid in up if rid not in expected)
    t.evicted = evicted
    t.lost = max(0, sum(len(v) for v in t.missing.values()) - evicted)
    return t


def _out_of_order(topo: Topology, nid: str, frames: dict[int, bytes]) -> int:
    arrival: dict[int, float] = {}
    for rid, when in topo.upstream.arrival.items():
        node, seq, _ = rid.rsplit(":", 2)
        if node == nid:
            s = int(seq)
            arrival[s] = min(when, arrival.get(s, when))
    late, newest = 0, float("-inf")
    for k in sorted(arrival):
        if arrival[k] < newest:
            late += 1
        newest = max(newest, arrival[k])
    return late


def stop_gateway(topo: Topology) -> dict[str, Any]:
    """SIGTERM the gateway and return the counters it logs on the way out."""
    topo.kill_gateway(signal.SIGTERM)
    lines = [ln for ln in topo.gateway_log().splitlines() if "gateway stopped:" in ln]
    assert lines, "the gateway did not log its counters on stopping:\n" + topo.gateway_log()[-3000:]
    return json.loads(lines[-1].split("gateway stopped:", 1)[1])  # type: ignore[no-any-return]


def counters_of_every_run(topo: Topology) -> list[dict[str, Any]]:
    """The counters each gateway process logged when it stopped, oldest first."""
    return [json.loads(ln.split("gateway stopped:", 1)[1])
            for ln in topo.gateway_log().splitlines() if "gateway stopped:" in ln]


def all_sampled(topo: Topology, limit: int) -> bool:
    return all(len(topo.sampled(n)) >= limit for n in topo.nodes)


def drained(topo: Topology) -> bool:
    return all(not topo.outbox(n) for n in topo.nodes)


def upstream_has_all(topo: Topology) -> bool:
    """Upstream holds every reading of every durable pack, by id.

    Not a count: a pack made durable but never reported (a power cut between the two) once
    made up for the last pack still in the gateway's batch, and the scenario stopped the
    gateway with that pack queued and called it lost.
    """
    up = topo.upstream.readings
    return all(f"{n.node_id}:{seq}:{i}" in up
               for n in topo.nodes for seq, k in packs(topo, n.node_id).items()
               for i in range(k))
