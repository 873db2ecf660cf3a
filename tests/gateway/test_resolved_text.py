"""A frame's JSON text, written from per-(name, unit) fragments, is exactly what json writes."""

from __future__ import annotations

import json
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.agent.queue import resolve as resolved
from lantern.agent.queue.resolve import PACK, RECORDS, dumps, resolve
from tests.helpers.resolve import GOOD, NODE, RECORD, reference

ODD_NODE = 'SL-ü"\\1'  # a node id JSON must escape (ids come from the keys file)
TEXT_NAMES = st.text(min_size=1, max_size=6)  # quotes, controls, non-ASCII
ODD = st.fixed_dictionaries(
    {0: TEXT_NAMES, 2: st.integers(-(2**64), 2**64 - 1) | st.floats(width=32, allow_nan=False)
     | st.floats(allow_nan=False, allow_infinity=False)},
    optional={1: st.text(max_size=4), 3: st.text(max_size=3), 6: st.floats(allow_nan=False),
              -3: st.floats(allow_nan=False) | st.integers(-(2**63), 2**63)})


def check(node: str, seq: int, payload: bytes) -> None:
    try:
        want = reference(payload, node=node)
    except FrameError:
        with pytest.raises(FrameError):
            resolve(node, seq, PACK, payload)
        return
    records, text = resolve(node, seq, PACK, payload)
    for i, r in enumerate(want):
        r["id"] = f"{node}:{seq}:{i}"
    assert records == want
    assert text == dumps(records)[1:-1]  # byte for byte, float signs and escapes included


@settings(max_examples=1500, deadline=None)
@given(st.lists(GOOD | ODD | RECORD, min_size=1, max_size=8), st.sampled_from([NODE, ODD_NODE]),
       st.integers(0, 2**32))
def test_text_is_what_json_writes(recs: list[Any], node: str, seq: int) -> None:
    check(node, seq, cbor2.dumps(recs))


def test_the_sign_of_zero_survives_the_value_cache() -> None:
    """-0.0 and 0.0 are equal as dict keys; a cached 0.0 must not be shown for -0.0."""
    for v in (0.0, -0.0, 0.0, -0.0):
        payload = cbor2.dumps([{0: "temperature", 2: v, -3: 1}])
        records, text = resolve(NODE, 1, PACK, payload)
        assert f'"v":{v!r}' in text and str(records[0]["v"]) == repr(v)
    f32 = struct.unpack("<f", struct.pack("<f", 21.37))[0]
    for _ in range(2):  # a cached value is shown as the first resolution showed it
        records, text = resolve(NODE, 1, PACK, cbor2.dumps([{0: "temperature", 2: f32}]))
        assert records[0]["v"] == 21.37 and '"v":21.37,' in text


def test_times_that_sum_past_the_largest_float_are_refused() -> None:
    """bt + t of two finite times can be inf, which JSON cannot carry: refused, not sent."""
    payload = cbor2.dumps([{0: "x", 2: 1, -3: 1e308, 6: 1e308}])
    with pytest.raises(FrameError, match="outside years 1 to 9999"):
        resolve(NODE, 1, PACK, payload)


def test_a_full_fragment_table_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolved, "_FRAGMENTS_MAX", 3)
    monkeypatch.setattr(resolved, "_frag", {})
    for round_ in range(3):
        for name in ("a", "b", "c", "d", "e"):
            payload = cbor2.dumps([{0: name, 1: "Cel", 2: round_, -3: 7}, {0: "x", 2: 1.5}])
            check(NODE, round_, payload)
    assert len(resolved._frag) <= 3


def test_third_party_records_keep_their_text() -> None:
    recs = [{"n": "urn:dev:ble:a4c1:temperature", "u": "Cel", "t": 5, "v": 21.5,
             "id": "bthome:a4c1:5:0"}]
    body = dumps(recs)[1:-1].encode()
    assert resolve("a4c1", 5, RECORDS, body) == (recs, body.decode())


def test_the_protocol_vector() -> None:
    from pathlib import Path

    vec = json.loads((Path(__file__).parents[1] / "vectors/frames/sl0042-seq5-v2.json").read_text())
    payload = bytes.fromhex(vec["data"]["senml_pack"])
    records, text = resolve(NODE, 5, PACK, payload)
    assert json.loads("[" + text + "]") == records
    assert [{k: v for k, v in r.items() if k != "id"} for r in records] == vec["resolved"]
    assert protocol.resolve_pack(payload, node=NODE) == vec["resolved"]
