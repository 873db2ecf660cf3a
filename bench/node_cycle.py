"""node_cycle: the firmware's sample → encode → MAC → frame cycle on MicroPython, and its bytes.

Runs bench/mp_node.py on the unix port with the board's heap (boards/unix-sim.json heap_kb),
on the firmware compiled to .mpy as a board runs it, its sensors on the simulated street
(firmware/sim, a process of its own as SimNode runs it).

Wire bytes per reading count everything on the line (delimiters, COBS, type, CRC, COSE header,
kid, seq, tag) of a typical pack: one sampled as at a node's interval, every sensor fresh.
The SenML-JSON twin is the same readings as a node would have to send them without Lantern's
conventions (docs/protocol.md §1): the pack the gateway resolves — base name and base time on
the first record, the unit on every record that has one — as compact SenML-JSON (RFC 8428 §5,
no whitespace), each number with the fewest digits that give back the same value (what the
node measured, not the double it widens to). No framing, no MAC: the smallest honest twin.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import cbor2

from lantern.agent import protocol
from lantern.tools.street.sim import FIRMWARE, MICROPYTHON, MP_EXTMOD, SimNode, compiled_firmware

SCRIPT = Path(__file__).resolve().parent / "mp_node.py"


def board_heap(node: SimNode) -> str:
    """The simulated board's heap, as SimNode.start uses it."""
    return f"{node.heap_kb()}K"


def run_mp(mode: str, node: SimNode, n: int, heap: str | None = None,
           timeout: float = 600) -> dict[str, Any]:
    """bench/mp_node.py on the node's compiled firmware, with its simulated street running."""
    if not MICROPYTHON.exists():
        raise FileNotFoundError(f"{MICROPYTHON} is missing: run `make micropython` first")
    cfg = node.write_config()
    env = {"MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}", "PATH": os.environ.get("PATH", "")}
    node.start_street(cfg, env)
    env["MICROPYPATH"] = f"{compiled_firmware()}:{FIRMWARE}:{MP_EXTMOD}"
    try:
        out = subprocess.run([str(MICROPYTHON), "-X", f"heapsize={heap or board_heap(node)}",
                              str(SCRIPT), mode, str(cfg), str(n)], env=env,
                             capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        node.close()
    if out.returncode != 0:
        raise RuntimeError(f"MicroPython {mode} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def json_number(v: int | float) -> str:
    """The fewest digits that give back v: of its float32 if v is one (as the node holds it)."""
    if isinstance(v, int):
        return str(v)
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))  # 50.0 → 50: the same JSON number
    is_f32 = struct.unpack(">f", struct.pack(">f", v))[0] == v
    for digits in range(1, 18):
        s = f"{v:.{digits}g}"
        back = float(s)
        if (struct.unpack(">f", struct.pack(">f", back))[0] if is_f32 else back) == v:
            return s
    return repr(v)


def senml_json_twin(records: list[dict[str, Any]], bn: str) -> bytes:
    """Resolved records as a compact SenML-JSON pack: bn and bt once, n relative, every unit."""
    bt = records[0]["t"]
    parts = []
    for i, r in enumerate(records):
        assert r["n"].startswith(bn) and r["t"] == bt
        fields = [("bn", json.dumps(bn)), ("bt", str(bt))] if i == 0 else []
        fields.append(("n", json.dumps(r["n"][len(bn):])))
        if "u" in r:
            fields.append(("u", json.dumps(r["u"])))
        fields.append(("v", json_number(r["v"])))
        parts.append("{" + ",".join(f'"{k}":{v}' for k, v in fields) + "}")
    return ("[" + ",".join(parts) + "]").encode()


def with_conventions_undone(payload: bytes, node: str, key: bytes, seq: int,
                            bn: bool, units: bool) -> int:
    """Wire bytes of the same pack with the base name and/or every unit sent (version 1)."""
    recs = cbor2.loads(payload)
    for r, resolved in zip(recs, protocol.resolve_pack(payload, node=node), strict=True):
        if units and "u" in resolved:
            r[1] = resolved["u"]
    if bn:
        recs[0][-2] = protocol.base_name(node)
    body = protocol.create_mac0(key, node.encode(), seq, bytes(cbor2.dumps(recs, canonical=True)))
    return len(protocol.encode_frame(protocol.DATA, body))


def figures(payload: bytes, wire: bytes, node: SimNode) -> dict[str, Any]:
    """Bytes of one sealed pack against its SenML-JSON twin, with the arithmetic."""
    # the gateway's independent code must accept the frame the VM made
    chunk = protocol.Deframer().feed(wire)[0]
    assert chunk is not None
    _, body = protocol.decode_frame(chunk)
    m = protocol.parse_mac0(body)
    protocol.verify_mac0(node.key, m)
    assert m.payload == payload
    records = protocol.resolve_pack(payload, node=node.node_id)
    n = len(records)  # SenML records: readings and their quality flags
    js = senml_json_twin(records, protocol.base_name(node.node_id))
    undone = {f"wire_bytes_{k}": with_conventions_undone(payload, node.node_id, node.key, m.seq,
                                                         bn, units)
              for k, bn, units in (("with_bn", True, False), ("with_units", False, True),
                                   ("with_bn_and_units", True, True))}
    return {
        "records_per_pack": n,
        "flags": sorted(r["n"].rsplit(":", 1)[1] for r in records if r["n"].endswith(".q")),
        "wire_bytes": len(wire),
        "wire_bytes_per_reading": round(len(wire) / n, 1),
        "pack_cbor_bytes": len(payload),
        "framing_and_mac_bytes": len(wire) - len(payload),
        "senml_json_bytes": len(js),
        "senml_json_bytes_per_reading": round(len(js) / n, 1),
        "wire_vs_senml_json": round(len(wire) / len(js), 3),
        **undone,
        "example_senml_json": js.decode(),
        "pack_cbor_hex": payload.hex(),
    }


def run(workdir: Path, cycles: int) -> dict[str, Any]:
    node = SimNode("SL-0042", workdir / "node-cycle", port="/dev/null")
    heap = board_heap(node)
    r = run_mp("cycle", node, cycles, heap)
    back = figures(bytes.fromhex(r.pop("payload_hex")), bytes.fromhex(r.pop("wire_hex")), node)
    typical = figures(bytes.fromhex(r.pop("typical_payload_hex")),
                      bytes.fromhex(r.pop("typical_wire_hex")), node)
    r.update({
        "encode_us": r["seal_us"] - r["mac_us"],
        "cycle_without_sample_us": r["seal_us"] + r["frame_us"],
        "vm": f"MicroPython unix port, compiled firmware (.mpy), -X heapsize={heap}",
        **typical,
        # the last of the timed cycles, run back to back: slow sensors flagged stale
        "back_to_back": {k: back[k] for k in ("records_per_pack", "flags", "wire_bytes",
                                              "senml_json_bytes", "wire_vs_senml_json")},
    })
    return r
