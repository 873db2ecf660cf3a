"""The recorded frames in tests/vectors/frames are what both sides produce and accept.

sl0042-seq5.json is protocol version 1 (bn and units in the pack): the gateway still accepts it
and resolves it alike. sl0042-seq5-v2.json is what nodes send now (docs/protocol.md §4), written
by tests/vectors/make_frames.py from the firmware's encoder.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import cbor2
import pytest
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

from lantern.agent import protocol

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "firmware"))

from node import cbor, cose, frame, senml  # noqa: E402

VECTORS = sorted((ROOT / "tests/vectors/frames").glob("*.json"))
V2 = ROOT / "tests/vectors/frames/sl0042-seq5-v2.json"


def _make_frames():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_frames",
                                                  ROOT / "tests/vectors/make_frames.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(params=VECTORS, ids=lambda p: p.stem)
def vec(request: pytest.FixtureRequest) -> dict[str, object]:
    return json.loads(request.param.read_text())  # type: ignore[no-any-return]


def test_both_versions_are_recorded() -> None:
    assert [p.name for p in VECTORS] == ["sl0042-seq5-v2.json", "sl0042-seq5.json"]


def firmware_payload(vec: dict) -> bytes:
    """The pack as the firmware builds it: from the readings (v2) or from the recorded pack."""
    if "readings" in vec:
        values = {n: senml.quantize(senml.quantize(v, p)) for n, v, p in vec["readings"]}
        records = [senml.record(n, values[n]) for n in sorted(values)]
        return cbor.dumps(senml.pack(None, vec["bt"], records))
    pack = cbor2.loads(bytes.fromhex(vec["data"]["senml_pack"]))
    first = pack[0]
    records = [senml.record(r[0], r[2], r.get(1)) for r in pack]
    return cbor.dumps(senml.pack(first[-2], first[-3], records))


def test_firmware_reproduces_data_frame(vec: dict) -> None:
    key, d = bytes.fromhex(vec["key"]), vec["data"]
    payload = firmware_payload(vec)
    assert payload.hex() == d["senml_pack"]
    protected = {1: 4, 4: bytes.fromhex(vec["kid"]), 6: cose.piv(vec["seq"])}
    assert cbor.dumps(protected).hex() == d["protected"]
    assert cbor.dumps(["MAC0", cbor.dumps(protected), b"", payload]).hex() == d["mac_structure"]
    msg = cose.mac0_create(key, payload, protected)
    assert msg.hex() == d["cose_mac0"]
    assert msg[-8:].hex() == d["tag"]
    wire = frame.encode(frame.DATA, msg)
    assert wire.hex() == d["wire"]
    assert frame.crc16(bytes((frame.DATA,)) + msg).to_bytes(2, "big").hex() == d["crc16"]


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
    # the independent COSE implementation agrees
    msg = Mac0Message.decode(body)
    msg.key = SymmetricKey(k=key)
    assert msg.verify_tag()
    records = protocol.resolve_pack(m.payload, node=m.kid.decode())
    assert records == vec["resolved"]
    assert [type(r["v"]) for r in records] == [type(r["v"]) for r in vec["resolved"]]


def test_versions_resolve_alike() -> None:
    """The same kind of readings, with and without bn and units, resolve to the same shape."""
    v1 = json.loads((ROOT / "tests/vectors/frames/sl0042-seq5.json").read_text())
    v2 = json.loads(V2.read_text())
    assert v1["resolved"][0] == {"n": "urn:dev:lantern:SL-0042:heap_free", "t": 1764331200,
                                 "u": "B", "v": 98304}
    assert v2["resolved"][0] == v1["resolved"][0]
    assert len(bytes.fromhex(v2["data"]["wire"])) < len(bytes.fromhex(v1["data"]["wire"]))


def test_v2_pack_has_no_base_name_and_no_units() -> None:
    pack = cbor2.loads(bytes.fromhex(json.loads(V2.read_text())["data"]["senml_pack"]))
    assert all(set(r) <= {0, 2, -3} for r in pack)
    assert -3 in pack[0]


def test_v2_file_is_what_the_generator_writes() -> None:
    want = json.dumps(_make_frames().vector(), indent=2) + "\n"
    assert V2.read_text() == want


def test_doc_shows_the_v2_vector() -> None:
    doc = (ROOT / "docs/protocol.md").read_text()
    flat = doc.replace("\n", "")
    v2 = json.loads(V2.read_text())
    d = v2["data"]
    for field in ("wire", "tag", "crc16"):
        assert d[field] in flat, field
    assert v2["ack"]["wire"] in flat
    # the annotated pack: every byte of it, in order, before the annotations
    block = re.split(r"SenML pack \(\d+ bytes\)", doc, maxsplit=1)[1]
    block = block.split("The gateway resolves it", 1)[0]
    hexes = ""
    for line in block.splitlines():
        tokens = line.strip().split("  ")[0].split()
        if tokens and all(re.fullmatch(r"(?:[0-9a-f]{2})+", t) for t in tokens):
            hexes += "".join(tokens)
    assert hexes == d["senml_pack"]
    assert f"SenML pack ({len(bytes.fromhex(d['senml_pack']))} bytes)" in doc
    assert f"On the wire ({len(bytes.fromhex(d['wire']))} bytes" in doc


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
