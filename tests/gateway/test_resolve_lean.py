"""The lean resolve_pack answers exactly as the plain one it replaced, on any CBOR at all."""

from __future__ import annotations

from typing import Any

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from tests.helpers.resolve import GOOD, ITEM, NODE, RECORD, reference


def outcome(fn: Any, payload: bytes, node: str | None) -> Any:
    try:
        return ("ok", fn(payload, node=node))
    except FrameError as e:
        return ("error", e.kind)




@settings(max_examples=1500, deadline=None)
@given(st.lists(GOOD | RECORD, min_size=0, max_size=6) | ITEM,
       st.sampled_from([None, NODE]))
def test_same_answers_as_the_reference(obj: Any, node: str | None) -> None:
    payload = cbor2.dumps(obj)
    assert outcome(protocol.resolve_pack, payload, node) == outcome(reference, payload, node)


@settings(max_examples=300, deadline=None)
@given(st.lists(GOOD, min_size=1, max_size=25), st.sampled_from([None, NODE]))
def test_same_answers_on_well_formed_packs(recs: list[dict[int, Any]], node: str | None) -> None:
    payload = cbor2.dumps(recs)
    got = outcome(protocol.resolve_pack, payload, node)
    assert got == outcome(reference, payload, node)


def test_the_protocol_vector_resolves_alike() -> None:
    import json
    from pathlib import Path

    vec = json.loads((Path(__file__).parents[1] / "vectors/frames/sl0042-seq5-v2.json").read_text())
    payload = bytes.fromhex(vec["data"]["senml_pack"])
    got = protocol.resolve_pack(payload, node=NODE)
    assert got == reference(payload, node=NODE) == vec["resolved"]
