"""Bench traffic: DATA frames shaped like the firmware's packs, and their SenML-JSON twins.

The pack is the one the firmware seals: bench/run.py hands over the pack that node_cycle
got from the real firmware on MicroPython (use_template), and frames vary its values from
frame to frame like a real sensor's. Without one, a built-in pack shaped like the walking
skeleton's is used. Frames are made with the gateway's own encoders (cbor2, hmac), which
the vector tests prove byte-equal to the firmware's.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import cbor2

from lantern.agent import protocol

_F32 = struct.Struct("<f")
BT0 = 1764331200  # 2025-11-28T12:00:00Z: a fixed base time keeps runs comparable

# (name, unit) in the order the firmware sorts them; None: no unit (a count)
READINGS = [("cycle_ms", "ms"), ("heap_free", "B"), ("heap_peak", "B"), ("humidity", "%RH"),
            ("outbox", None), ("temperature", "Cel"), ("uptime", "s")]


def node_ids(n: int) -> list[str]:
    return [f"SL-{i + 1:04d}" for i in range(n)]


def key_of(node: str) -> bytes:
    """A deterministic per-node bench key (never a real one)."""
    return hashlib.sha256(b"lantern-bench:" + node.encode()).digest()


def keys(nodes: list[str]) -> dict[bytes, bytes]:
    return {n.encode(): key_of(n) for n in nodes}


def keys_toml(nodes: list[str]) -> str:
    lines = ["[nodes]"] + [f'"{n}" = "{key_of(n).hex()}"' for n in nodes]
    return "\n".join(lines) + "\n"


def _f32(v: float) -> float:
    """v as a float32, as the firmware sends readings (docs/protocol.md §4): 5 bytes in CBOR."""
    f: float = _F32.unpack(_F32.pack(v))[0]
    return f


def _values(seq: int) -> dict[str, Any]:
    wave = math.sin(seq / 50.0)
    return {"cycle_ms": 3 + seq % 4, "heap_free": 88000 - (seq * 37) % 4000,
            "heap_peak": 21000 + (seq * 13) % 900, "humidity": _f32(round(62.0 - 9.0 * wave, 1)),
            "outbox": seq % 5, "temperature": _f32(round(14.0 + 5.0 * wave, 2)),
            "uptime": 60 + seq}


# records of the firmware's pack (without bn/bt), set by use_template
_template: list[dict[int, Any]] = []
_with_bn = [True]  # whether the template's pack carried its base name (else the kid implies it)
_source = ["built-in pack"]


def use_template(payload: bytes, source: str = "the firmware's pack (node_cycle)") -> None:
    """Make packs like this one (a pack the firmware sealed); its names, units and values."""
    _source[0] = source
    recs = cbor2.loads(payload)
    _template[:] = [{k: v for k, v in r.items() if k not in (-2, -3)} for r in recs]
    _with_bn[0] = -2 in recs[0]


def _vary(v: Any, seq: int) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return v
    if isinstance(v, int):
        return v + seq % 7
    return _f32(round(v + (seq % 13) * 0.01, 2))


def pack(node: str, seq: int) -> bytes:
    """One SenML CBOR pack (integer labels, deterministic encoding)."""
    recs: list[dict[int, Any]] = []
    if _template:
        recs = [{k: (_vary(v, seq) if k == 2 else v) for k, v in r.items()} for r in _template]
    else:
        vals = _values(seq)
        for name, unit in READINGS:
            r: dict[int, Any] = {0: name, 2: vals[name]}
            if unit:
                r[1] = unit
            recs.append(r)
    if _with_bn[0] or not _template:
        recs[0][-2] = f"urn:dev:lantern:{node}:"
    recs[0][-3] = BT0 + seq
    return bytes(cbor2.dumps(recs, canonical=True))


def data_frame(node: str, seq: int, payload: bytes | None = None) -> bytes:
    """The wire bytes of one DATA frame: 00 | COBS(type | COSE_Mac0 | CRC) | 00."""
    body = protocol.create_mac0(key_of(node), node.encode(), seq,
                                pack(node, seq) if payload is None else payload)
    return protocol.encode_frame(protocol.DATA, body)


def stream(nodes: list[str], first_seq: int, per_node: int) -> list[tuple[str, int, bytes]]:
    """(node, seq, wire) round-robin over the nodes, as many links' traffic interleaves."""
    return [(n, s, data_frame(n, s)) for s in range(first_seq, first_seq + per_node)
            for n in nodes]


def senml_json(payload: bytes) -> bytes:
    """The same pack as compact SenML-JSON (RFC 8428 §5, same bn/bt, no whitespace)."""
    recs = cbor2.loads(payload)
    out = [{protocol.SENML_LABELS[k]: v for k, v in r.items()} for r in recs]
    return json.dumps(out, separators=(",", ":")).encode()


def pack_source() -> str:
    return _source[0]


def readings_per_frame() -> int:
    return len(_template) if _template else len(READINGS)
