"""The reference resolve_pack (the plain one the lean one replaced) and pack strategies."""

from __future__ import annotations

import base64
import math
from typing import Any

from hypothesis import strategies as st

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.agent.protocol import SENML_LABELS, _canonical_unit, _loads, base_name, f32_decimal

_VALUE_TYPES: dict[int, type] = {3: str, 4: bool, 8: bytes}


def _number(v: Any) -> bool:
    if isinstance(v, int) and not isinstance(v, bool):
        return -(1 << 64) <= v < 1 << 64
    return isinstance(v, float) and math.isfinite(v)


def reference(payload: bytes, *, node: str | None = None) -> list[dict[str, Any]]:
    """resolve_pack as first written: one check at a time, no shortcuts (the oracle)."""
    pack = _loads(payload)
    if not isinstance(pack, list) or not pack:
        raise FrameError("senml", "pack is not a non-empty array")
    out: list[dict[str, Any]] = []
    prefix = None if node is None else base_name(node)
    bn: Any = prefix
    bt: Any = 0
    bu: Any = None
    for rec in pack:
        if not isinstance(rec, dict) or any(k not in SENML_LABELS for k in rec):
            raise FrameError("senml", "record is not a map of known labels")
        bn = rec.get(-2, bn)
        bt = rec.get(-3, bt)
        bu = rec.get(-4, bu)
        n = rec.get(0, "")
        if bn is None:
            raise FrameError("senml", "no base name, and no node id (COSE kid) to imply one")
        if not isinstance(bn, str) or not isinstance(n, str) or not bn + n:
            raise FrameError("senml", "name and base name must be text, and not both empty")
        name = bn + n
        if prefix is not None and (len(name) <= len(prefix) or not name.startswith(prefix)):
            raise FrameError("senml", "not this node's")
        t = rec.get(6, 0)
        if not _number(bt) or not _number(t):
            raise FrameError("senml", f"{name}: time is not a number")
        r: dict[str, Any] = {"n": name, "t": bt + t}
        if not protocol.TIME_MIN <= r["t"] <= protocol.TIME_MAX:  # (added later: dates)
            raise FrameError("senml", f"{name}: time outside years 1 to 9999")
        unit = rec.get(1, bu)
        if unit is None:
            unit = _canonical_unit(name, prefix)
        if unit is not None:
            if not isinstance(unit, str):
                raise FrameError("senml", f"{name}: unit is not text")
            r["u"] = unit
        values = [lbl for lbl in (2, 3, 4, 8) if lbl in rec]
        if len(values) != 1:
            raise FrameError("senml", f"{name}: a record needs exactly one value")
        lbl = values[0]
        val = rec[lbl]
        ok = _number(val) if lbl == 2 else isinstance(val, _VALUE_TYPES[lbl])
        if not ok:
            raise FrameError("senml", "wrong type")
        if lbl == 8:
            val = base64.urlsafe_b64encode(val).rstrip(b"=").decode()
        elif type(val) is float:
            val = f32_decimal(val)
        r[SENML_LABELS[lbl]] = val
        out.append(r)
    return out


NODE = "SL-0042"


NAMES = st.sampled_from(["temperature", "co2", "x", "", "pm2_5.q", "urn:dev:lantern:SL-0042:co2",
                         "urn:dev:lantern:SL-0001:co2"])


ITEM = (st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats(width=32)
        | st.floats() | st.text(max_size=4) | st.binary(max_size=4) | NAMES)


RECORD = st.dictionaries(st.sampled_from([*sorted(SENML_LABELS), 9, -7]), ITEM, max_size=5)


GOOD = st.fixed_dictionaries(
    {0: NAMES, 2: st.integers(-1000, 10**6) | st.floats(width=32, allow_nan=False)},
    optional={6: st.integers(-5, 5), 1: st.sampled_from(["Cel", "ppm"]),
              -3: st.integers(0, 2**33) | st.floats(allow_nan=False, allow_infinity=False),
              -2: st.sampled_from(["urn:dev:lantern:SL-0042:", "other:", ""])})
