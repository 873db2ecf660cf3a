"""SenML packs: firmware/node/senml.py + cbor.py on the node, agent/protocol.py resolve_pack.

docs/protocol.md §1: integer labels (RFC 8428 §6), bt on the first record, bn implied by the
COSE kid and units by the canonical names (agent/units.py); resolved records carry absolute n
and t (RFC 8428 §4.6) and the units, exactly as when a pack carries bn and every unit; packs
that are not valid SenML, or name another node, are rejected with kind 'senml' (undecodable
CBOR: 'cbor').
"""

import base64
import struct
import sys
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))

from node import cbor, senml

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.agent.units import UNITS as CANONICAL

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


def same_reading(got, want):
    """What survives the gateway: ints exactly; a float32 as the same float32 (the gateway shows
    its shortest decimal, protocol.f32_decimal); any other float bit for bit."""
    if type(got) is not type(want):
        return False
    if isinstance(want, float) and abs(want) <= 3.4028234663852886e38 and (
            struct.unpack(">f", struct.pack(">f", want))[0] == want):
        return struct.pack(">f", got) == struct.pack(">f", want)
    return same(got, want)


def resolve_firmware_pack(bt, records):
    """What the gateway makes of a pack the node built and encoded (no bn: the kid's)."""
    return protocol.resolve_pack(cbor.dumps(senml.pack(None, bt, records)), node=NODE)


def test_base_name():
    assert senml.base_name(NODE) == protocol.base_name(NODE) == BN


# docs/protocol.md §4: the pack of SL-0042, seq 5 (tests/vectors/frames/sl0042-seq5-v2.json).
DOC_PACK = bytes.fromhex(
    "85"
    "a3" "0069686561705f66726565" "021a00018000" "221a69298ec0"
    "a2" "006868756d6964697479" "02f95208"
    "a2" "00687072657373757265" "021a00018bcd"
    "a2" "006b74656d7065726174757265" "02fa41aaf5c3"
    "a2" "0066757074696d65" "02190e10")
DOC_RESOLVED = [
    {"n": BN + "heap_free", "t": BT, "u": "B", "v": 98304},
    {"n": BN + "humidity", "t": BT, "u": "%RH", "v": 48.25},
    {"n": BN + "pressure", "t": BT, "u": "Pa", "v": 101325},
    {"n": BN + "temperature", "t": BT, "u": "Cel", "v": 21.37},
    {"n": BN + "uptime", "t": BT, "u": "s", "v": 3600},
]


def test_doc_pack_vector():
    values = {"heap_free": 98304, "humidity": senml.quantize(48.25, 2),
              "pressure": senml.quantize(101325.31, 0),
              "temperature": senml.quantize(21.37, 2), "uptime": 3600}
    records = [senml.record(n, senml.quantize(values[n])) for n in sorted(values)]
    payload = cbor.dumps(senml.pack(None, BT, records))
    assert len(payload) == 90
    assert payload == DOC_PACK
    assert protocol.resolve_pack(payload, node=NODE) == DOC_RESOLVED
    assert struct.pack(">f", DOC_RESOLVED[3]["v"]) == bytes.fromhex("41aaf5c3")


def test_v1_pack_resolves_to_the_same_records():
    """A pack with bn and every unit (protocol v1, third-party nodes) means the same."""
    old = [senml.record(n[len(BN):], r["v"], r["u"]) for n, r in
           ((r["n"], r) for r in DOC_RESOLVED)]
    payload = cbor.dumps(senml.pack(BN, BT, old))
    assert len(payload) > len(DOC_PACK) + 40
    assert protocol.resolve_pack(payload, node=NODE) == DOC_RESOLVED
    assert protocol.resolve_pack(payload) == DOC_RESOLVED  # no kid needed: bn is in the pack


def test_pack_puts_base_fields_on_first_record_only():
    first, second = senml.record("a", 1), senml.record("b", 2)
    out = senml.pack(BN, BT, [first, second])
    assert out == [{senml.N: "a", senml.V: 1, senml.BN: BN, senml.BT: BT},
                   {senml.N: "b", senml.V: 2}]
    assert first == {senml.N: "a", senml.V: 1}  # the caller's record is not modified
    assert senml.pack(None, BT, [first, second]) == [{senml.N: "a", senml.V: 1, senml.BT: BT},
                                                     {senml.N: "b", senml.V: 2}]


# ------------------------------------------------------------- base name from the COSE kid


def one(rec, node=NODE):
    return protocol.resolve_pack(cbor2.dumps([rec]), node=node)[0]


@pytest.mark.parametrize(("rec", "name"), [
    pytest.param({0: "temperature", 2: 1}, BN + "temperature", id="implied"),
    pytest.param({-2: BN, 0: "temperature", 2: 1}, BN + "temperature", id="explicit-same"),
    pytest.param({-2: "", 0: BN + "temperature", 2: 1}, BN + "temperature", id="absolute-n"),
    pytest.param({-2: BN + "lamp_", 0: "power", 2: 1}, BN + "lamp_power", id="longer-bn"),
    pytest.param({-2: "urn:dev:lantern:SL-00", 0: "42:x", 2: 1}, BN + "x", id="split-bn"),
])
def test_names_of_the_kids_node_are_accepted(rec, name):
    assert one(rec)["n"] == name


@pytest.mark.parametrize("rec", [
    pytest.param({-2: "urn:dev:lantern:SL-0001:", 0: "temperature", 2: 1}, id="other-node"),
    pytest.param({-2: "urn:dev:lantern:SL-00420:", 0: "x", 2: 1}, id="longer-node-id"),
    pytest.param({-2: "urn:dev:lantern:SL-004", 0: "1:x", 2: 1}, id="split-other"),
    pytest.param({-2: "urn:dev:mac:0024befffe804ff1:", 0: "x", 2: 1}, id="foreign-urn"),
    pytest.param({-2: "", 0: "temperature", 2: 1}, id="empty-bn-relative-n"),
    pytest.param({-2: "", 0: "urn:dev:lantern:SL-0001:x", 2: 1}, id="absolute-other"),
    pytest.param({-2: BN, 2: 1}, id="bn-alone"),
    pytest.param({2: 1}, id="no-name"),
])
def test_names_of_another_node_are_refused(rec):
    with pytest.raises(FrameError) as e:
        one(rec)
    assert e.value.kind == "senml"
    assert "SL-0042" in str(e.value)


def test_a_later_bn_cannot_switch_to_another_node():
    pack = [{0: "a", 2: 1, -3: BT}, {-2: "urn:dev:lantern:SL-0001:", 0: "b", 2: 2}]
    with pytest.raises(FrameError, match="SL-0001"):
        protocol.resolve_pack(cbor2.dumps(pack), node=NODE)
    # without the kid the gateway cannot tell, and the pack is plain SenML
    assert [r["n"] for r in protocol.resolve_pack(cbor2.dumps([{-2: BN, **pack[0]}, pack[1]]))
            ] == [BN + "a", "urn:dev:lantern:SL-0001:b"]


def test_no_base_name_needs_the_kid():
    with pytest.raises(FrameError, match="COSE kid") as e:
        protocol.resolve_pack(cbor2.dumps([{0: "temperature", 2: 1}]))
    assert e.value.kind == "senml"


# ------------------------------------------------------------- units from the canonical names


@pytest.mark.parametrize(("rec", "unit"), [
    pytest.param({0: "temperature", 2: 1}, "Cel", id="restored"),
    pytest.param({0: "heap_free", 2: 1}, "B", id="restored-health"),
    pytest.param({0: "temperature", 1: "K", 2: 1}, "K", id="explicit-wins"),
    pytest.param({0: "temperature", -4: "K", 2: 1}, "K", id="base-unit-wins"),
    pytest.param({0: "no2", 1: "ppb", 2: 1}, "ppb", id="non-canonical-with-unit"),
    pytest.param({0: "no2", 2: 1}, None, id="non-canonical-without"),
    pytest.param({0: "temperature.q", 2: 1}, None, id="quality-flags"),
    pytest.param({0: "outbox", 2: 1}, None, id="outbox"),
    pytest.param({-2: BN + "lamp_", 0: "power", 2: 1}, "W", id="by-resolved-name"),
])
def test_units(rec, unit):
    assert one(rec).get("u") == unit


def test_units_of_a_v1_pack_without_kid():
    rec = {-2: BN, 0: "pressure", 2: 101325}
    assert protocol.resolve_pack(cbor2.dumps([rec]))[0]["u"] == "Pa"
    rec = {-2: "urn:dev:other:", 0: "pressure", 2: 101325}
    assert "u" not in protocol.resolve_pack(cbor2.dumps([rec]))[0]


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
    pytest.param(("cycles", 1.25, None, 60), {"v": 1.25}, 60, id="t-no-unit"),
    pytest.param(("temperature", 21.5), {"u": "Cel", "v": 21.5}, 0, id="canonical-no-unit"),
    pytest.param(("energy", 1.25, None, 60), {"u": "J", "v": 1.25}, 60, id="t-canonical"),
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
    pytest.param([{-2: BN, 0: "x", 1: "Cel", 6: 5}], id="no-value-with-base"),
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


def check_rejects(payload, kind, node=NODE):
    try:
        got = protocol.resolve_pack(payload, node=node)
    except FrameError as e:
        assert e.kind == kind
        return str(e)
    pytest.fail(f"accepted as {got!r}")


@pytest.mark.parametrize("obj", SENML_REJECTS)
def test_resolve_rejects_invalid_senml(obj):
    why = check_rejects(cbor2.dumps(obj), "senml")
    if "is not a reading of node" in why:  # each case fails for its own reason, not its name
        assert obj in ([{2: 1}], [{0: "", 2: 1}]), why


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
        unit = unit or CANONICAL.get(name)
        assert set(r) == {"n", "t", field} | ({"u"} if unit else set())
        assert r["n"] == BN + name
        assert r.get("u") == unit
        assert same_reading(r[field], want), (r[field], want)  # ints stay ints, floats keep bits
        assert same(r["t"], bt + t if t else bt)


@settings(max_examples=300, deadline=None)
@given(st.lists(FINITE | st.integers(-(2**64), 2**64 - 1), min_size=1, max_size=30))
def test_numbers_survive_bit_exactly(values):
    recs = [senml.record(f"m{i}", v) for i, v in enumerate(values)]
    got = [r["v"] for r in resolve_firmware_pack(BT, recs)]
    assert [type(v) for v in got] == [type(v) for v in values]
    assert all(same_reading(g, v) for g, v in zip(got, values, strict=True)), (got, values)


# Any CBOR a node could send: ingest only catches FrameError, so nothing else may escape.
ANY_ITEM = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.integers(-8, 9), inner,
                                                                max_size=3),
    max_leaves=12)
ANY_RECORD = st.dictionaries(st.sampled_from(sorted(protocol.SENML_LABELS)), ANY_ITEM, max_size=6)


@settings(max_examples=500, deadline=None)
@given(st.one_of(ANY_ITEM, st.lists(ANY_RECORD, min_size=1, max_size=4)),
       st.sampled_from([None, NODE]))
def test_resolve_raises_only_frame_error(obj, node):
    try:
        protocol.resolve_pack(cbor2.dumps(obj), node=node)
    except FrameError as e:
        assert e.kind == "senml"
