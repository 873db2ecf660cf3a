"""Queued frames as SenML-JSON: resolved once, off the ACK path, for every sink and the history.

The ACK path stores each frame's pack as the node sealed it (store.py). A pack becomes
SenML-JSON only in the forward stage: resolved records (`protocol.resolve_pack`) with their
reading ids (`node:seq:index`, the same for every resend and after restarts) and the JSON text
a sink sends. A small cache keeps that until every sink has the frame, so several sinks (or a
retried batch, or the status page asking first) pay for one resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .. import protocol

# what the frames table holds in `body`, by its `format` column
PACK = 0  # a SenML CBOR pack as the node sealed it (MAC checked before it was stored)
RECORDS = 1  # SenML-JSON records the gateway made (third-party adverts), ids included
CACHE_MAX = 1024  # frames; a sink that far behind the others resolves its frames again


dumps = json.JSONEncoder(separators=(",", ":")).encode  # compact; built once, not per call
_FRAGMENTS_MAX = 4096  # (name, unit) pairs: nodes times measurements, for a street
_frag: dict[tuple[str, Any], tuple[str, str]] = {}


def _fragments(name: str, unit: Any) -> tuple[str, str]:
    """The fixed text around a numeric record's time and value: '{"n":…,"t":' and ',"u":…,"v":'."""
    unit_text = ',"u":' + dumps(unit) if unit is not None else ""
    pair = '{"n":' + dumps(name) + ',"t":', unit_text + ',"v":'
    if len(_frag) >= _FRAGMENTS_MAX:
        _frag.clear()
    _frag[(name, unit)] = pair
    return pair


@dataclass(frozen=True, slots=True)
class Resolved:
    """One frame's readings, ready for a sink."""

    id: int
    node: str
    seq: int
    received_at: float
    rids: list[str]
    text: str  # the records as JSON array items: '{...},{...}' (no brackets)


@dataclass(frozen=True)
class Batch:
    """Whole frames for one sink; `full` when the next frame would not fit."""

    first_id: int
    last_id: int
    first_received: float
    rids: list[str]
    json_items: list[str]  # SenML-JSON records as array items: one frame's '{..},{..}' each
    full: bool = True

    def body(self) -> bytes:
        return ("[" + ",".join(self.json_items) + "]").encode()

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = json.loads(self.body())
        return out


def resolve(node: str, seq: int, fmt: int, body: bytes) -> tuple[list[dict[str, Any]], str]:
    """A frame's records with their ids, and their JSON text (array items, '{..},{..}').

    FrameError if the pack does not resolve. The text is what `dumps` writes, made faster:
    nearly every record is a finite number with a name, a time and maybe a unit, and their
    fixed text is kept per (name, unit), so only time, value and id are written per frame
    (repr of an int or a finite float is what json writes). Anything else goes to `dumps`.
    """
    if fmt == RECORDS:
        records: list[dict[str, Any]] = json.loads(b"[" + body + b"]")
        return records, dumps(records)[1:-1]
    # node: the COSE kid the MAC was checked under (it implies the base name, and bounds it)
    records = protocol.resolve_pack(body, node=node)
    base = f"{node}:{seq}:"
    id_head = ',"id":' + dumps(base)[:-1]  # the id's text up to its index and closing quote
    frag, isfinite = _frag, math.isfinite
    parts = []
    for i, r in enumerate(records):
        r["id"] = base + str(i)
        v, t = r.get("v"), r["t"]
        tv, tt = type(v), type(t)
        if (tv is int or tv is float) and (tt is int or (tt is float and isfinite(t))):
            unit = r.get("u")
            pair = frag.get((r["n"], unit)) or _fragments(r["n"], unit)
            parts.append(f'{pair[0]}{t!r}{pair[1]}{v!r}{id_head}{i}"}}')
        else:
            parts.append(dumps(r))
    return records, ",".join(parts)


class Cache:
    """Resolved frames by frame id, oldest first; bounded (a miss only costs time)."""

    def __init__(self, limit: int = CACHE_MAX) -> None:
        self.limit = limit
        self._by_id: dict[int, Resolved] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, frame_id: int) -> Resolved | None:
        return self._by_id.get(frame_id)

    def put(self, r: Resolved) -> None:
        if len(self._by_id) >= self.limit:
            del self._by_id[next(iter(self._by_id))]
        self._by_id[r.id] = r

    def drop_upto(self, frame_id: int) -> None:
        """Forget frames every sink has (ids are in ascending order)."""
        while self._by_id:
            first = next(iter(self._by_id))
            if first > frame_id:
                break
            del self._by_id[first]
