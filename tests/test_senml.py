"""SenML packs: firmware/node/senml.py + cbor.py on the node, agent/protocol.py resolve_pack.

docs/protocol.md §1: integer labels (RFC 8428 §6), bn/bt on the first record, resolved
records carry absolute n and t (RFC 8428 §4.6); packs that are not valid SenML are rejected
with kind 'senml' (undecodable CBOR: 'cbor').
"""

import base64
import struct
import sys
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "firmware"))

from node import cbor, senml

from agent import protocol
from agent.errors import FrameError

NODE = "SL-0042"
BN = "urn:dev:lantern:SL-0042:"
BT = 1764331200
NAN = float("nan")
INF = float("inf")
UNITS = ("Cel", "%RH", "Pa", "hPa", "ug/m3", "ppm", "lx", "W", "V", "A", "s", "B")


def same(got, want):
    """Equal with the same type; floats compared bit for bit (so -0.0 differs from 0.0)."""
    if type(got) is not type(want):
        return False
    if isinstance(want, float):
        return struct.pack(">d", got) == struct.pack(">d", want)
    return bool(got == want)


def resolve_firmware_pack(bt, records):
    """What the gateway makes of a pack the node built and encoded."""
    return protocol.resolve_pack(cbor.dumps(senml.pack(senml.base_name(NODE), bt, records)))


def test_base_name():
    assert senml.base_name(NODE) == BN


# docs/protocol.md §4: the pack of SL-0042, seq 5.
DOC_PACK = bytes.fromhex(
    "84"
    "a5" "0069686561705f66726565" "016142" "021a00018000"
    "21781875726e3a6465763a6c616e7465726e3a534c2d303034323a" "221a69298ec0"
    "a3" "006868756d6964697479" "0163255248" "02f95208"
    "a3" "006b74656d7065726174757265" "016343656c" "02f94d60"
    "a3" "0066757074696d65" "016173" "02190e10")


def test_doc_pack_vector():
    records = [senml.record("heap_free", 98304, "B"), senml.record("humidity", 48.25, "%RH"),
               senml.record("temperature", 21.5, "Cel"), senml.record("uptime", 3600, "s")]
    payload = cbor.dumps(senml.pack(BN, BT, records))
    assert len(payload) == 114
    assert payload == DOC_PACK
    assert protocol.resolve_pack(payload) == [
        {"n": BN + "heap_free", "t": BT, "u": "B", "v": 98304},
        {"n": BN + "humidity", "t": BT, "u": "%RH", "v": 48.25},
        {"n": BN + "temperature", "t": BT, "u": "Cel", "v": 21.5},
        {"n": BN + "uptime", "t": BT, "u": "s", "v": 3600},
    ]


def test_pack_puts_base_fields_on_first_record_only():
    first, second = senml.record("a", 1), senml.record("b", 2)
    out = senml.pack(BN, BT, [first, second])
    assert out == [{senml.N: "a", senml.V: 1, senml.BN: BN, senml.BT: BT},
                   {senml.N: "b", senml.V: 2}]
    assert first == {senml.N: "a", senml.V: 1}  # the caller's record is not modified


# (record arguments, the resolved record without n and t, time offset)
RESOLVE_CASES = [
    pytest.param(("temperature", 21.5, "Cel"), {"u": "Cel", "v": 21.5}, 0, id="v-half"),
    pytest.param(("temperature", 21.37, "Cel"), {"u": "Cel", "v": 21.37}, 0, id="v-double"),
    pytest.param(("pm25", 100000.0, "ug/m3"), {"u": "ug/m3", "v": 100000.0}, 0, id="v-single"),
    pytest.param(("count", 0), {"v": 0}, 0, id="v-zero-no-unit"),
    pytest.param(("big", 2**64 - 1), {"v": 2**64 - 1}, 0, id="v-uint64-max"),
    pytest.param(("small", -(2**64)), {"v": -(2**64)}, 0, id="v-nint64-min"),
    pytest.param(("door", True), {"vb": True}, 0, id="vb-true"),
    pytest.param(("door", False), {"vb": False}, 0, id="vb-false"),
    pytest.param(("status", "ok"), {"vs": "ok"}, 0, id="vs"),
    pytest.param(("status", ""), {"vs": ""}, 0, id="vs-empty"),
    pytest.param(("raw", b"\xfb\xff\x00"), {"vd": "-_8A"}, 0, id="vd-urlsafe"),
    pytest.param(("raw", b"\x00"), {"vd": "AA"}, 0, id="vd-unpadded-1"),
    pytest.param(("raw", b"\x00\x01"), {"vd": "AAE"}, 0, id="vd-unpadded-2"),
    pytest.param(("raw", b""), {"vd": ""}, 0, id="vd-empty"),
    pytest.param(("raw", bytearray(b"\x01\x02\x03")), {"vd": "AQID"}, 0, id="vd-bytearray"),
    pytest.param(("energy", 1.25, "W", -5), {"u": "W", "v": 1.25}, -5, id="t-negative"),
    pytest.param(("energy", 1.25, "W", 0.5), {"u": "W", "v": 1.25}, 0.5, id="t-float"),
    pytest.param(("energy", 1.25, None, 60), {"v": 1.25}, 60, id="t-no-unit"),
]


@pytest.mark.parametrize("position", ["first", "second"])
@pytest.mark.parametrize(("args", "want", "dt"), RESOLVE_CASES)
def test_resolve_firmware_record(args, want, dt, position):
    rec = senml.record(*args)
    records = [rec] if position == "first" else [senml.record("uptime", 3600, "s"), rec]
    got = resolve_firmware_pack(BT, records)[-1]
    assert got == {"n": BN + args[0], "t": BT + dt, **want}
    assert all(same(got[k], v) for k, v in want.items())
    assert same(got["t"], BT + dt)


# Payloads the gateway must refuse as 'senml' (valid CBOR, not a valid pack).
OK = {0: "x", 2: 1}
SENML_REJECTS = [
    pytest.param({0: "x", 2: 1}, id="not-a-list-map"),
    pytest.param("pack", id="not-a-list-str"),
    pytest.param(5, id="not-a-list-int"),
    pytest.param([], id="empty-list"),
    pytest.param([5], id="record-not-a-map"),
    pytest.param([OK, [0, "x"]], id="second-record-not-a-map"),
    pytest.param([{**OK, 9: 1}], id="unknown-label-9"),
    pytest.param([{**OK, -7: 1}], id="unknown-label-minus-7"),
    pytest.param([{**OK, "n": "x"}], id="unknown-label-text"),
    pytest.param([{0: "x"}], id="no-value"),
    pytest.param([{-2: "urn:x:", 0: "x", 1: "Cel", 6: 5}], id="no-value-with-base"),
    pytest.param([OK, {0: "y"}], id="no-value-second"),
    pytest.param([{0: "x", 2: 1, 3: "a"}], id="two-values-v-vs"),
    pytest.param([{0: "x", 2: 1, 4: True}], id="two-values-v-vb"),
    pytest.param([{0: "x", 3: "a", 8: b"a"}], id="two-values-vs-vd"),
    pytest.param([{0: "x", 2: NAN}], id="v-nan"),
    pytest.param([{0: "x", 2: INF}], id="v-inf"),
    pytest.param([{0: "x", 2: -INF}], id="v-minus-inf"),
    pytest.param([{0: "x", 2: True}], id="v-bool"),
    pytest.param([{0: "x", 2: "21.5"}], id="v-text"),
    pytest.param([{0: "x", 2: None}], id="v-null"),
    pytest.param([{**OK, 6: "now"}], id="t-text"),
    pytest.param([{**OK, 6: b"\x01"}], id="t-bytes"),
    pytest.param([{**OK, 6: None}], id="t-null"),
    pytest.param([{**OK, 6: [1]}], id="t-array"),
    pytest.param([{**OK, 6: True}], id="t-bool"),
    pytest.param([{**OK, 6: NAN}], id="t-nan"),
    pytest.param([{**OK, 6: INF}], id="t-inf"),
    pytest.param([{**OK, -3: "2025-11-28"}], id="bt-text"),
    pytest.param([{**OK, -3: -INF}], id="bt-minus-inf"),
    pytest.param([{2: 1}], id="no-name"),
    pytest.param([{0: "", 2: 1}], id="empty-name"),
    pytest.param([{0: 5, 2: 1}], id="n-int"),
    pytest.param([{0: b"x", 2: 1}], id="n-bytes"),
    pytest.param([{0: None, 2: 1}], id="n-null"),
    pytest.param([{-2: 5, 0: "x", 2: 1}], id="bn-int"),
    pytest.param([{-2: b"urn:", 0: "x", 2: 1}], id="bn-bytes"),
    pytest.param([{-2: b"urn:", 2: 1}], id="bn-bytes-no-n"),
    pytest.param([{0: "x", 8: "AQID"}], id="vd-text"),
    pytest.param([{0: "x", 8: 5}], id="vd-int"),
]


def check_rejects(payload, kind):
    try:
        got = protocol.resolve_pack(payload)
    except FrameError as e:
        assert e.kind == kind
    else:
        pytest.fail(f"accepted as {got!r}")


@pytest.mark.parametrize("obj", SENML_REJECTS)
def test_resolve_rejects_invalid_senml(obj):
    check_rejects(cbor2.dumps(obj), "senml")


@pytest.mark.parametrize("payload", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x9f\xa1", id="unterminated-indefinite"),
    pytest.param(b"\x84\xa1\x00\x61", id="truncated"),
    pytest.param(b"\x1c", id="reserved-additional-info"),
    pytest.param(b"\x81\xa1\x00\x62\xff\xfe\x02\x01", id="invalid-utf8"),
])
def test_resolve_rejects_undecodable_cbor(payload):
    check_rejects(payload, "cbor")


# ------------------------------------------------------------------ property: bit-exact values

FINITE = st.floats(allow_nan=False, allow_infinity=False)
VALUES = st.one_of(FINITE, st.integers(-(2**64), 2**64 - 1), st.booleans(),
                   st.text(max_size=20), st.binary(max_size=24))
TIMES = st.one_of(st.none(), st.integers(-(2**31), 2**31),
                  st.floats(-1e6, 1e6, allow_nan=False))
UNIT_OR_NONE = st.one_of(st.none(), st.sampled_from(UNITS))
RECORDS = st.lists(st.tuples(st.text(min_size=1, max_size=16), VALUES, UNIT_OR_NONE, TIMES),
                   min_size=1, max_size=8)


def expected_value(value):
    """(SenML-JSON value field, value) the gateway must report, computed independently."""
    if isinstance(value, bool):
        return "vb", value
    if isinstance(value, str):
        return "vs", value
    if isinstance(value, bytes):
        return "vd", base64.b64encode(value).decode().translate(str.maketrans("+/", "-_", "="))
    return "v", value


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), RECORDS)
def test_firmware_pack_survives_resolution(bt, recs):
    got = resolve_firmware_pack(bt, [senml.record(*r) for r in recs])
    assert len(got) == len(recs)
    for (name, value, unit, t), r in zip(recs, got, strict=True):
        field, want = expected_value(value)
        assert set(r) == {"n", "t", field} | ({"u"} if unit else set())
        assert r["n"] == BN + name
        assert r.get("u") == unit
        assert same(r[field], want), (r[field], want)  # ints stay ints, floats keep their bits
        assert same(r["t"], bt + t if t else bt)


@settings(max_examples=300, deadline=None)
@given(st.lists(FINITE | st.integers(-(2**64), 2**64 - 1), min_size=1, max_size=30))
def test_numbers_survive_bit_exactly(values):
    recs = [senml.record(f"m{i}", v) for i, v in enumerate(values)]
    got = [r["v"] for r in resolve_firmware_pack(BT, recs)]
    assert [type(v) for v in got] == [type(v) for v in values]
    assert [struct.pack(">d", v) if isinstance(v, float) else v for v in got] == [
        struct.pack(">d", v) if isinstance(v, float) else v for v in values]


# Any CBOR a node could send: ingest only catches FrameError, so nothing else may escape.
ANY_ITEM = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.integers(-8, 9), inner,
                                                                max_size=3),
    max_leaves=12)
ANY_RECORD = st.dictionaries(st.sampled_from(sorted(protocol.SENML_LABELS)), ANY_ITEM, max_size=6)


@settings(max_examples=500, deadline=None)
@given(st.one_of(ANY_ITEM, st.lists(ANY_RECORD, min_size=1, max_size=4)))
def test_resolve_raises_only_frame_error(obj):
    try:
        protocol.resolve_pack(cbor2.dumps(obj))
    except FrameError as e:
        assert e.kind == "senml"
