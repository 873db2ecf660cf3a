"""Bench traffic: DATA frames shaped like the firmware's packs, and their SenML-JSON twins.

The pack mirrors what firmware/node/app.py seals today (climate readings plus the node's
health records, names sorted, bn and bt on the first record); values vary from frame to
frame like a real sensor's. Frames are made with the gateway's own encoders (cbor2, hmac),
which the vector tests prove byte-equal to the firmware's.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import cbor2

from agent import protocol

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


def _values(seq: int) -> dict[str, Any]:
    wave = math.sin(seq / 50.0)
    return {"cycle_ms": 3 + seq % 4, "heap_free": 88000 - (seq * 37) % 4000,
            "heap_peak": 21000 + (seq * 13) % 900, "humidity": round(62.0 - 9.0 * wave, 1),
            "outbox": seq % 5, "temperature": round(14.0 + 5.0 * wave, 2), "uptime": 60 + seq}


def pack(node: str, seq: int) -> bytes:
    """One SenML CBOR pack (integer labels, deterministic encoding)."""
    vals = _values(seq)
    recs: list[dict[int, Any]] = []
    for i, (name, unit) in enumerate(READINGS):
        r: dict[int, Any] = {0: name, 2: vals[name]}
        if unit:
            r[1] = unit
        if i == 0:
            r[-2] = f"urn:dev:lantern:{node}:"
            r[-3] = BT0 + seq
        recs.append(r)
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


def readings_per_frame() -> int:
    return len(READINGS)
