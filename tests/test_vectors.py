"""The recorded frames in tests/vectors/frames are what both sides produce and accept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cbor2
import pytest

from agent import protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "firmware"))

from node import cbor, cose, frame, senml  # noqa: E402

VECTORS = sorted((ROOT / "tests/vectors/frames").glob("*.json"))


@pytest.fixture(params=VECTORS, ids=lambda p: p.stem)
def vec(request: pytest.FixtureRequest) -> dict[str, object]:
    return json.loads(request.param.read_text())  # type: ignore[no-any-return]


def test_firmware_reproduces_data_frame(vec: dict) -> None:
    key, d = bytes.fromhex(vec["key"]), vec["data"]
    pack = cbor2.loads(bytes.fromhex(d["senml_pack"]))
    first = pack[0]
    records = [senml.record(r[0], r[2], r.get(1)) for r in pack]
    payload = cbor.dumps(senml.pack(first[-2], first[-3], records))
    assert payload.hex() == d["senml_pack"]
    protected = {1: 4, 4: bytes.fromhex(vec["kid"]), 6: cose.piv(vec["seq"])}
    assert cbor.dumps(protected).hex() == d["protected"]
    msg = cose.mac0_create(key, payload, protected)
    assert msg.hex() == d["cose_mac0"]
    assert frame.encode(frame.DATA, msg).hex() == d["wire"]


def test_gateway_accepts_data_frame(vec: dict) -> None:
    key, d = bytes.fromhex(vec["key"]), vec["data"]
    wire = bytes.fromhex(d["wire"])
    assert wire[0] == 0 and wire[-1] == 0
    ftype, body = protocol.decode_frame(wire[1:-1])
    assert ftype == protocol.DATA and body.hex() == d["cose_mac0"]
    m = protocol.parse_mac0(body)
    assert m.kid == bytes.fromhex(vec["kid"]) and m.seq == vec["seq"]
    protocol.verify_mac0(key, m)
    assert m.tag.hex() == d["tag"]
    records = protocol.resolve_pack(m.payload)
    assert records[0] == {"n": "urn:dev:lantern:SL-0042:heap_free", "t": 1764331200, "u": "B",
                          "v": 98304}


def test_ack_both_ways(vec: dict) -> None:
    key, a = bytes.fromhex(vec["key"]), vec["ack"]
    kid = bytes.fromhex(vec["kid"])
    payload = cbor2.loads(bytes.fromhex(a["payload"]))
    assert protocol.encode_ack(key, kid, payload[1], payload[2]).hex() == a["wire"]
    wire = bytes.fromhex(a["wire"])
    ftype, body = frame.decode(wire[1:-1])
    assert ftype == frame.ACK
    protected, _, ack = cose.mac0_verify(key, body)
    assert protected[4] == kid
    assert cbor.loads(ack) == payload
