"""Reliability scenario 4's accounting (issue 21, finding 10): what counts as sealed, and when
the scenario may stop and count what is missing as lost.

A pack is sealed once it is durable (its file complete and renamed into place). The node
reports it just after; a power cut between the two leaves a durable pack nobody reported.
The scenario once waited for as many readings upstream as the node had reported: that pack,
delivered, made up for the last pack still in the gateway's batch, and the scenario stopped
the gateway and called that one lost (21 readings, one pack, in a full run under CPU load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2

from hil_tests.harness.scenarios import packs, tally, upstream_has_all
from hil_tests.harness.topology import Topology, Wire
from lantern.agent import protocol
from lantern.tools.street.sim import SimNode

NODE = "SL-0001"


def _pack(seq: int) -> bytes:
    return cbor2.dumps([{-3: 1_700_000_000 + seq, 0: "temperature", 2: 20.5 + seq},
                        {0: "humidity", 2: 40 + seq}])


def _topology(tmp_path: Path) -> tuple[Topology, SimNode, dict[int, bytes]]:
    topo = Topology(tmp_path, n_nodes=1)
    node = SimNode(NODE, tmp_path / "nodes")
    topo.nodes.append(node)
    topo.wires[NODE] = Wire()
    frames = {seq: protocol.create_mac0(node.key, NODE.encode(), seq, _pack(seq))
              for seq in range(4)}
    return topo, node, frames


def _deliver(topo: Topology, frames: dict[int, bytes], seq: int) -> None:
    payload = protocol.parse_mac0(frames[seq]).payload
    for i, r in enumerate(protocol.resolve_pack(payload, node=NODE)):
        rec: dict[str, Any] = {**r, "id": f"{NODE}:{seq}:{i}"}
        topo.upstream.readings[rec["id"]] = rec


def test_the_scenario_waits_for_a_durable_pack_the_node_never_reported(tmp_path: Path) -> None:
    topo, node, frames = _topology(tmp_path)
    wire = topo.wires[NODE]
    wire.data_frames += [frames[0], frames[1], frames[2]]
    # the node reported 0 and 1; a power cut landed after 2 was written, before its report;
    # after the reboot the node sent 2 from its outbox
    topo.sampled(node).update({0: 2, 1: 2})
    # upstream has 0 and 2; 1 is acknowledged but still in the gateway's batch
    _deliver(topo, frames, 0)
    _deliver(topo, frames, 2)
    assert not upstream_has_all(topo), "the scenario would stop now and call pack 1 lost"
    _deliver(topo, frames, 1)
    assert upstream_has_all(topo)
    t = tally(topo)
    assert (t.sent, t.delivered, t.lost) == (6, 6, 0)


def test_a_pack_seen_durable_on_flash_counts_as_sealed(tmp_path: Path) -> None:
    """Durable, never reported, never sent: sealed all the same, so lost if it never arrives."""
    topo, node, frames = _topology(tmp_path)
    topo.wires[NODE].data_frames.append(frames[0])
    topo.sampled(node).update({0: 2})
    topo.flash_frames[NODE] = {3: frames[3]}
    _deliver(topo, frames, 0)
    assert packs(topo, NODE) == {0: 2, 3: 2}
    assert not upstream_has_all(topo)
    t = tally(topo)
    assert (t.sent, t.delivered, t.lost) == (4, 2, 2)
    assert t.missing == {NODE: [f"{NODE}:3:0", f"{NODE}:3:1"]}
