"""node_cycle: the firmware's sample → encode → MAC → frame cycle on MicroPython, and its bytes.

Runs bench/mp_node.py on the unix port with the board's heap (boards/unix-sim.json heap_kb),
on the firmware compiled to .mpy as a board runs it, its sensors on the simulated street
(firmware/sim, a process of its own as SimNode runs it). Wire bytes per
reading count everything on the line (delimiters, COBS, type, CRC, COSE header, kid, seq,
tag); SenML-JSON is the same pack, same base name and base time, without any whitespace,
framing or MAC — the smallest honest JSON twin.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import cbor2

from agent import protocol
from tools.sim import BOARDS, FIRMWARE, MICROPYTHON, MP_EXTMOD, SimNode, compiled_firmware

from . import frames

SCRIPT = Path(__file__).resolve().parent / "mp_node.py"


def board_heap(node: SimNode) -> str:
    """The simulated board's heap (boards/*.json heap_kb), as SimNode.start uses it."""
    board = json.loads((BOARDS / f"{node.board}.json").read_text())
    return f"{board.get('heap_kb', 110)}K"


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


def run(workdir: Path, cycles: int) -> dict[str, Any]:
    node = SimNode("SL-0042", workdir / "node-cycle", port="/dev/null")
    heap = board_heap(node)
    r = run_mp("cycle", node, cycles, heap)
    wire = bytes.fromhex(r.pop("wire_hex"))
    payload = bytes.fromhex(r.pop("payload_hex"))
    # the gateway's independent code must accept the frame the VM made
    chunk = protocol.Deframer().feed(wire)[0]
    assert chunk is not None
    _, body = protocol.decode_frame(chunk)
    m = protocol.parse_mac0(body)
    protocol.verify_mac0(node.key, m)
    n = len(cbor2.loads(payload))  # SenML records: readings and their quality flags
    js = frames.senml_json(payload)
    r.update({
        "records_per_pack": n,
        "encode_us": r["seal_us"] - r["mac_us"],
        "cycle_without_sample_us": r["seal_us"] + r["frame_us"],
        "vm": f"MicroPython unix port, compiled firmware (.mpy), -X heapsize={heap}",
        "wire_bytes": len(wire),
        "wire_bytes_per_reading": round(len(wire) / n, 1),
        "senml_json_bytes": len(js),
        "senml_json_bytes_per_reading": round(len(js) / n, 1),
        "wire_vs_senml_json": round(len(wire) / len(js), 2),
        "pack_cbor_bytes": len(payload),
        "example_senml_json": js.decode(),
        "pack_cbor_hex": payload.hex(),
    })
    return r
