"""COSE_Mac0 / HMAC-SHA256 in firmware/node/cose.py: RFC vectors, COSE WG examples, pycose."""

import base64
import hashlib
import hmac
import json
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.algorithms import HMAC256, HMAC25664
from pycose.headers import KID, Algorithm
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))
from node import cbor, cose

KEY = bytes(range(32))
PAYLOAD = b"\xa2\x00\x67SL-0001\x02\xfb\x40\x35\x00\x00\x00\x00\x00\x00"


def _hdr(alg, seq=5):
    return {cose.H_ALG: alg, cose.H_KID: b"SL-0001", cose.H_PIV: cose.piv(seq)}


def _rebuild(data, cbor_tag=17, **change):
    """Re-encode a valid message with elements of the Mac0 array replaced."""
    arr = cbor.loads(data).value
    for i, name in enumerate(("protected", "unprotected", "payload", "mac")):
        if name in change:
            arr[i] = change[name]
    return cbor.dumps(cbor.Tag(cbor_tag, arr))


# ---------------------------------------------------------------- HMAC-SHA256 (RFC 2104)

# RFC 4231 §4; case 5 is omitted because it only specifies a truncated output.
RFC4231 = [
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (
        b"Jefe",
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
    (
        b"\xaa" * 20,
        b"\xdd" * 50,
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
    ),
    (
        bytes(range(1, 26)),
        b"\xcd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    ),
    (
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data."
        b" The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
]


@pytest.mark.parametrize(("key", "msg", "want"), RFC4231, ids=["1", "2", "3", "4", "6", "7"])
def test_hmac_rfc4231(key, msg, want):
    assert cose.hmac_sha256(key, msg).hex() == want


@settings(max_examples=300, deadline=None)
@given(key=st.binary(max_size=200), msg=st.binary(max_size=600))
def test_hmac_matches_cpython(key, msg):
    want = hmac.new(key, msg, hashlib.sha256).digest()
    assert cose.hmac_sha256(key, msg) == want
    assert cose.hmac_sha256(bytearray(key), memoryview(msg)) == want


@pytest.mark.parametrize("n", [63, 64, 65, 128])
def test_hmac_block_size_boundary(n):
    # 64 is used as is, 65 must be hashed first: the edge where a wrong comparison shows.
    key = bytes(range(n))
    assert cose.hmac_sha256(key, b"m") == hmac.new(key, b"m", hashlib.sha256).digest()


# ---------------------------------------------------------------- Partial IV


@pytest.mark.parametrize(
    ("seq", "enc"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (255, b"\xff"),
        (256, b"\x01\x00"),
        (65535, b"\xff\xff"),
        (65536, b"\x01\x00\x00"),
        (2**40 - 1, b"\xff" * 5),
        (2**64, b"\x01" + bytes(8)),
    ],
)
def test_piv_known(seq, enc):
    assert cose.piv(seq) == enc
    assert cose.piv_int(enc) == seq


@given(st.integers(min_value=0, max_value=2**72))
def test_piv_round_trip(seq):
    enc = cose.piv(seq)
    assert enc == seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")
    assert cose.piv_int(enc) == seq


@given(st.binary(min_size=1, max_size=9))
def test_piv_int_only_shortest(b):
    if len(b) > 1 and b[0] == 0:
        with pytest.raises(cose.CoseError):
            cose.piv_int(b)
    else:
        assert cose.piv(cose.piv_int(b)) == b


@pytest.mark.parametrize("bad", [b"", b"\x00\x00", b"\x00\x01", b"\x00\xff\xff"])
def test_piv_int_rejects(bad):
    with pytest.raises(cose.CoseError):
        cose.piv_int(bad)


@pytest.mark.parametrize("bad", [-1, -256, 1.0, "1", None])
def test_piv_rejects(bad):
    with pytest.raises(cose.CoseError):
        cose.piv(bad)


# ---------------------------------------------------------------- COSE WG examples

VEC_DIR = Path(__file__).resolve().parents[1] / "vectors" / "cose"
# What our verifier must make of each upstream file: "ok", "badtag" (MAC mismatch) or
# "refused" (CoseError before any MAC check: structure, unsupported or unprotected alg).
VECTORS = {
    "mac0-tests/HMac-01.json": "ok",
    "hmac-examples/HMac-enc-01.json": "ok",
    "hmac-examples/HMac-enc-05.json": "ok",
    "mac0-tests/mac-fail-02.json": "badtag",
    "mac0-tests/mac-fail-06.json": "badtag",
    "mac0-tests/mac-fail-07.json": "badtag",
    "hmac-examples/HMac-enc-04.json": "badtag",
    "mac0-tests/mac-fail-01.json": "refused",  # CBOR tag 992
    "mac0-tests/mac-fail-03.json": "refused",  # alg -999
    "mac0-tests/mac-fail-04.json": "refused",  # alg "Unknown"
    "mac0-tests/mac-pass-01.json": "refused",  # alg only in the unprotected bucket
    "mac0-tests/mac-pass-02.json": "refused",  # same, plus external AAD
    "mac0-tests/mac-pass-03.json": "refused",  # same, plus no CBOR tag
}
ALG_NAMES = {"HS256/64": cose.ALG_HMAC_256_64, "HS256": cose.ALG_HMAC_256_256}
HDR_NAMES = {"alg": 1, "ctyp": 3}


def _load(name):
    v = json.loads((VEC_DIR / name).read_text())
    m = v["input"]["mac0"]
    k = m["recipients"][0]["key"]["k"]
    key = base64.urlsafe_b64decode(k + "=" * (-len(k) % 4))
    # The header map the example was MACed with, before any "failures" mutation.
    prot = {HDR_NAMES[n]: ALG_NAMES.get(x, x) for n, x in m.get("protected", {}).items()}
    return v, key, prot, v["input"]["plaintext"].encode()


def test_vector_files_all_listed():
    on_disk = {p.relative_to(VEC_DIR).as_posix() for p in VEC_DIR.rglob("*.json")}
    assert on_disk == set(VECTORS)
    algs = {
        ALG_NAMES[json.loads((VEC_DIR / n).read_text())["input"]["mac0"]["alg"]] for n in VECTORS
    }
    assert algs == {4, 5}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_mac_structure(name):
    v, key, prot, pt = _load(name)
    to_mac = bytes.fromhex(v["intermediates"]["ToMac_hex"])
    ext = bytes.fromhex(v["input"]["mac0"].get("external", ""))
    assert cbor.dumps(["MAC0", cose._bucket(prot), ext, pt]) == to_mac
    if not ext:
        assert cose._to_mac(cose._bucket(prot), pt) == to_mac
    assert key == bytes.fromhex(v["intermediates"]["CEK_hex"])
    # The example's tag is HMAC over ToMac unless the failure injected is a changed tag.
    wire = bytes.fromhex(v["output"]["cbor"])
    tag = cbor.loads(wire)
    tag = (tag.value if isinstance(tag, cbor.Tag) else tag)[3]
    tampered = "ChangeTag" in v["input"].get("failures", {})
    assert (cose.hmac_sha256(key, to_mac)[: len(tag)] == tag) is not tampered


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_verify(name):
    v, key, prot, pt = _load(name)
    wire = bytes.fromhex(v["output"]["cbor"])
    expect = VECTORS[name]
    if expect == "ok":
        assert cose.mac0_verify(key, wire) == (prot, {}, pt)
        p, u, payload, tag = cose.mac0_parse(wire)
        assert (p, u, payload) == (prot, {}, pt)
        assert len(tag) == (8 if prot[1] == 4 else 32)
    elif expect == "badtag":
        with pytest.raises(cose.BadTag):
            cose.mac0_verify(key, wire)
        cose.mac0_parse(wire)  # structurally fine: only the MAC is wrong
    else:
        with pytest.raises(cose.CoseError) as ei:
            cose.mac0_verify(key, wire)
        assert not isinstance(ei.value, cose.BadTag)
        with pytest.raises(cose.CoseError):
            cose.mac0_parse(wire)


@pytest.mark.parametrize(
    "name",
    sorted(n for n, e in VECTORS.items() if e != "refused" or n.startswith("mac0-tests/mac-fail")),
)
def test_vector_create(name):
    v, key, prot, pt = _load(name)
    wire = bytes.fromhex(v["output"]["cbor"])
    ours = cose.mac0_create(key, pt, prot)
    # Our deterministic encoding matches the examples byte for byte, so an untampered
    # example is reproduced exactly and a tampered one differs from our honest message.
    assert (ours == wire) is (VECTORS[name] == "ok")
    assert cose.mac0_verify(key, ours) == (prot, {}, pt)


# ---------------------------------------------------------------- pycose cross-check


@pytest.mark.parametrize(("alg", "pyalg"), [(4, HMAC25664), (5, HMAC256)])
def test_pycose_verifies_ours(alg, pyalg):
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(alg))
    msg = Mac0Message.decode(data)
    msg.key = SymmetricKey(k=KEY)
    assert msg.get_attr(Algorithm) is pyalg
    assert msg.phdr[KID] == b"SL-0001"
    assert msg.payload == PAYLOAD
    assert msg.verify_tag()
    msg.key = SymmetricKey(k=bytes(32))
    assert not msg.verify_tag()


@pytest.mark.parametrize(("alg", "pyalg"), [(4, HMAC25664), (5, HMAC256)])
def test_ours_verifies_pycose(alg, pyalg):
    msg = Mac0Message(phdr={Algorithm: pyalg, KID: b"SL-0001"}, uhdr={}, payload=PAYLOAD)
    msg.key = SymmetricKey(k=KEY)
    data = msg.encode()
    prot, unprot, payload = cose.mac0_verify(KEY, data)
    assert prot == {1: alg, 4: b"SL-0001"}
    assert (unprot, payload) == ({}, PAYLOAD)
    # Same headers inserted in the same order: pycose's bytes equal our deterministic ones.
    assert data == cose.mac0_create(KEY, PAYLOAD, {1: alg, 4: b"SL-0001"})
    with pytest.raises(cose.BadTag):
        cose.mac0_verify(KEY[::-1], data)


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    payload=st.binary(max_size=300),
    alg=st.sampled_from([4, 5]),
    kid=st.binary(max_size=16),
    seq=st.integers(min_value=0, max_value=2**40 - 1),
)
def test_pycose_agrees_random(key, payload, alg, kid, seq):
    # pycose only accepts 16, 24 or 32 byte symmetric keys.
    data = cose.mac0_create(key, payload, {1: alg, 4: kid, 6: cose.piv(seq)})
    msg = Mac0Message.decode(data)
    msg.key = SymmetricKey(k=key)
    assert msg.verify_tag()
    assert msg.compute_tag() == cose.mac0_parse(data)[3]


# ---------------------------------------------------------------- round trip and API


@pytest.mark.parametrize("alg", [4, 5])
def test_round_trip(alg):
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(alg, 70000), {33: "note"})
    prot, unprot, payload = cose.mac0_verify(KEY, data)
    assert prot == _hdr(alg, 70000)
    assert cose.piv_int(prot[cose.H_PIV]) == 70000
    assert unprot == {33: "note"}
    assert payload == PAYLOAD
    p, u, pl, tag = cose.mac0_parse(data)
    assert (p, u, pl) == (prot, unprot, payload)
    full = hmac.new(KEY, cose._to_mac(cbor.dumps(prot), PAYLOAD), hashlib.sha256).digest()
    assert tag == full[: 8 if alg == 4 else 32]


def test_create_is_deterministic():
    a = cose.mac0_create(KEY, PAYLOAD, {6: cose.piv(1), 4: b"k", 1: 4})
    b = cose.mac0_create(KEY, PAYLOAD, {1: 4, 4: b"k", 6: cose.piv(1)})
    assert a == b
    assert cbor.loads(a).value[0] == bytes.fromhex("a3010404416b064101")


def test_create_accepts_bytearray_and_empty_payload():
    data = cose.mac0_create(bytearray(KEY), bytearray(b""), {1: 5})
    assert cose.mac0_verify(KEY, data)[2] == b""


def test_parse_needs_no_key():
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(4))
    assert cose.mac0_parse(data)[0][cose.H_KID] == b"SL-0001"


# ---------------------------------------------------------------- negative cases


@pytest.mark.parametrize("alg", [4, 5])
def test_every_bit_flip_rejected(alg):
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(alg))
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(cose.CoseError):
            cose.mac0_verify(KEY, bytes(bad))


@pytest.mark.parametrize("alg", [4, 5])
def test_tag_byte_changes_are_badtag(alg):
    # First and last byte: a compare that stops early or skips the tail would miss one.
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(alg))
    tag = cose.mac0_parse(data)[3]
    for i in (0, len(tag) - 1):
        t = bytearray(tag)
        t[i] ^= 0x80
        with pytest.raises(cose.BadTag):
            cose.mac0_verify(KEY, _rebuild(data, mac=bytes(t)))


def test_payload_and_protected_changes_are_badtag():
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(5))
    with pytest.raises(cose.BadTag):
        cose.mac0_verify(KEY, _rebuild(data, payload=PAYLOAD + b"\x00"))
    with pytest.raises(cose.BadTag):
        cose.mac0_verify(KEY, _rebuild(data, protected=cbor.dumps(_hdr(5, 6))))


@pytest.mark.parametrize("wrong", [bytes(32), KEY[:-1], KEY + b"\x01", b""])
def test_wrong_key(wrong):
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(5))
    with pytest.raises(cose.BadTag):
        cose.mac0_verify(wrong, data)


def test_untagged_and_other_tags_rejected():
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(5))
    arr = cbor.loads(data).value
    for bad in (
        cbor.dumps(arr),
        _rebuild(data, cbor_tag=18),
        _rebuild(data, cbor_tag=16),
        cbor.dumps(cbor.Tag(17, cbor.Tag(17, arr))),
    ):
        with pytest.raises(cose.CoseError) as ei:
            cose.mac0_verify(KEY, bad)
        assert not isinstance(ei.value, cose.BadTag)


@pytest.mark.parametrize(
    "alg", [6, 7, -999, 0, 1, 2**64 - 1, "HS256", b"\x05", 4.0, 5.0, True, None]
)
def test_unknown_alg(alg):
    with pytest.raises(cose.CoseError):
        cose.mac0_create(KEY, PAYLOAD, {1: alg})
    data = cose.mac0_create(KEY, PAYLOAD, {1: 5})
    # A correct HMAC over the forged protected header: only the alg check can stop it.
    prot = cbor.dumps({1: alg})
    good = cose.hmac_sha256(KEY, cose._to_mac(prot, PAYLOAD))
    with pytest.raises(cose.CoseError) as ei:
        cose.mac0_verify(KEY, _rebuild(data, protected=prot, mac=good))
    assert not isinstance(ei.value, cose.BadTag)


def test_missing_or_unprotected_alg():
    with pytest.raises(cose.CoseError):
        cose.mac0_create(KEY, PAYLOAD, {})
    with pytest.raises(cose.CoseError):
        cose.mac0_create(KEY, PAYLOAD, {4: b"k"}, {1: 5})
    data = cose.mac0_create(KEY, PAYLOAD, {1: 5})
    tag = cose.hmac_sha256(KEY, cose._to_mac(b"", PAYLOAD))
    with pytest.raises(cose.CoseError, match="alg"):
        cose.mac0_verify(KEY, _rebuild(data, protected=b"", unprotected={1: 5}, mac=tag))


def test_float_or_bool_labels_cannot_pose_as_alg():
    # 1.0 and True hash equal to 1, so without a label type check they would be read as alg.
    for label in (1.0, True):
        prot = cbor.dumps({label: 5})
        tag = cose.hmac_sha256(KEY, cose._to_mac(prot, PAYLOAD))
        data = cose.mac0_create(KEY, PAYLOAD, {1: 5})
        with pytest.raises(cose.CoseError):
            cose.mac0_verify(KEY, _rebuild(data, protected=prot, mac=tag))


@pytest.mark.parametrize("alg", [4, 5])
def test_tag_length_must_match_alg(alg):
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(alg))
    full = cose.hmac_sha256(KEY, cose._to_mac(cbor.dumps(_hdr(alg)), PAYLOAD))
    for t in (full[:8], full[:16], full, full + b"\x00", b""):
        if len(t) == (8 if alg == 4 else 32):
            continue
        with pytest.raises(cose.CoseError) as ei:
            cose.mac0_verify(KEY, _rebuild(data, mac=t))
        assert not isinstance(ei.value, cose.BadTag)


def test_truncated_and_trailing():
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(4))
    for n in range(len(data)):
        with pytest.raises(cose.CoseError):
            cose.mac0_verify(KEY, data[:n])
    with pytest.raises(cose.CoseError):
        cose.mac0_verify(KEY, data + b"\x00")


@pytest.mark.parametrize(
    "change",
    [
        {"protected": cbor.dumps([1, 5])},  # protected bstr holds an array
        {"protected": b"\xa1\x01"},  # protected bstr is truncated CBOR
        {"protected": cbor.dumps({1: 5}) + b"\x00"},  # trailing byte inside protected
        {"protected": "a10105"},  # tstr instead of bstr
        {"unprotected": [1]},
        {"unprotected": None},
        {"unprotected": {4: b"second kid"}},  # label already in the protected bucket
        {"unprotected": {1.5: 0}},
        {"payload": None},  # detached payload
        {"payload": "text"},
        {"mac": None},
        {"mac": [1, 2]},
    ],
)
def test_structure_rejected(change):
    data = cose.mac0_create(KEY, PAYLOAD, _hdr(4))
    with pytest.raises(cose.CoseError) as ei:
        cose.mac0_verify(KEY, _rebuild(data, **change))
    assert not isinstance(ei.value, cose.BadTag)
    with pytest.raises(cose.CoseError):
        cose.mac0_parse(_rebuild(data, **change))


@pytest.mark.parametrize("arr", [[], [b"", {}, b""], [b"", {}, b"", b"", b""]])
def test_wrong_array_length(arr):
    with pytest.raises(cose.CoseError):
        cose.mac0_verify(KEY, cbor.dumps(cbor.Tag(17, arr)))


@pytest.mark.parametrize("obj", [{}, b"", 17, None, cbor.Tag(17, {1: 2}), cbor.Tag(17, b"")])
def test_not_an_array(obj):
    with pytest.raises(cose.CoseError):
        cose.mac0_verify(KEY, cbor.dumps(obj))


def test_create_rejects_bad_arguments():
    for args in (
        (PAYLOAD, [(1, 5)]),
        ("text", {1: 5}),
        (None, {1: 5}),
        (PAYLOAD, {1: 5}, [1]),
        (PAYLOAD, {1: 5, 4: b"k"}, {4: b"k2"}),
        (PAYLOAD, {1: 5, 1.5: 0}),
    ):
        with pytest.raises(cose.CoseError):
            cose.mac0_create(KEY, *args)


def _mutate(rng, data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i] = rng.randrange(256)
        elif op == 2:
            b.insert(i, rng.randrange(256))
        elif op == 3 and b:
            del b[i]
        elif op == 4:
            del b[rng.randrange(len(b) + 1) :]
        elif op == 5 and b:
            j = rng.randrange(len(b))
            b[i], b[j] = b[j], b[i]
        elif op == 6 and b:
            # Interesting CBOR heads: length prefixes, indefinite-length markers, break.
            b[i] = rng.choice((0x40, 0x58, 0x5F, 0x80, 0x84, 0x9F, 0xA0, 0xBF, 0xD1, 0xFF))
    return bytes(b)


def test_fuzz_only_cose_error_and_nothing_verifies():
    rng = random.Random(7)
    bases = [
        cose.mac0_create(KEY, PAYLOAD, _hdr(4)),
        cose.mac0_create(KEY, PAYLOAD, _hdr(5)),
        cose.mac0_create(KEY, b"", {1: 4}),
        cose.mac0_create(KEY, b"x" * 40, {1: 5}),
    ]
    counts = {"badtag": 0, "refused": 0}
    done = 0
    while done < 20000:
        base = bases[done % len(bases)]
        bad = _mutate(rng, base)
        if bad == base:
            continue
        done += 1
        try:
            got = cose.mac0_verify(KEY, bad)
        except cose.BadTag:
            counts["badtag"] += 1
            continue
        except cose.CoseError:
            counts["refused"] += 1
            continue
        pytest.fail(f"mutated message verified: {bad.hex()} -> {got!r}")
    # Both layers were exercised: the structure checks and the MAC comparison.
    assert counts["badtag"] > 500
    assert counts["refused"] > 5000


# ------------------------------------------ the node's receive path: Lantern's fixed layout
# What a gateway or a tool sends a node is read by position (cose.mac0_peek) and its MAC
# checked (mac0_check) before any decoder sees it: tests/adversarial/test_node_bombs.py.


def _gateway_bodies():
    """Bodies as the gateway and the tools really build them (agent/, tools/), each with its
    external AAD: ACKs from both ACK encoders, a BLE start ACK, a COMMAND."""
    from lantern.agent import protocol
    from lantern.agent.links.ble_session import start_message
    from lantern.tools.field import nodelink

    kid = b"SL-0001"
    out = []
    for seqs in ([0], [5], [40, 41, 47], list(range(2**32 - 32, 2**32)), [2**63]):
        fast = protocol.NodeKey(KEY, kid).ack(seqs, 1764331201234)
        slow = protocol.encode_ack(KEY, kid, seqs, 1764331201234)
        assert fast == slow
        out.append((protocol.decode_frame(fast[1:-1])[1], b"", max(seqs)))
    out.append((start_message(KEY, "SL-0001", bytes(range(8)))[1:], b"", 0))
    frame = nodelink.command_frame(KEY, "SL-0001", 1764331201234, 3, {1: 30000})
    out.append((protocol.decode_frame(frame[1:-1])[1], b"\x04", 1764331201234))
    return out


def test_open_reads_what_gateways_and_tools_send():
    for body, aad, seq in _gateway_bodies():
        kid, got_seq, payload = cose.mac0_open(KEY, body, aad)
        assert (kid, got_seq) == (b"SL-0001", seq)
        assert payload == cose.mac0_parse(body)[2]  # the general parser reads the same
        with pytest.raises(cose.BadTag):
            cose.mac0_open(KEY[::-1], body, aad)
        with pytest.raises(cose.BadTag):  # a COMMAND is no ACK, nor the other way round
            cose.mac0_open(KEY, body, b"\x04" if not aad else b"")


def test_peek_gives_the_parts_without_a_key():
    body, _, _ = _gateway_bodies()[1]
    protected, kid, seq, payload, tag = cose.mac0_peek(body)
    assert protected == cbor.dumps(_hdr(cose.ALG_HMAC_256_64))
    assert (kid, seq, len(tag)) == (b"SL-0001", 5, 8)
    cose.mac0_check(KEY, protected, payload, tag)
    assert cose.mac0_peek(bytearray(body)) == (protected, kid, seq, payload, tag)
    assert cose.mac0_peek(memoryview(body)) == (protected, kid, seq, payload, tag)


def _mac0(protected, unprotected=b"\xa0", payload=b"\xa0", tag=None, prefix=b"\xd1\x84"):
    """COSE_Mac0 bytes assembled by hand, so any layout (also the wrong ones) can be built."""
    if tag is None:
        tag = cose.hmac_sha256(KEY, cbor.dumps(["MAC0", protected, b"", payload]))[:8]
    return (prefix + cbor.dumps(protected) + unprotected + cbor.dumps(payload)
            + cbor.dumps(tag))


GOOD_PROT = cbor.dumps(_hdr(cose.ALG_HMAC_256_64))


@pytest.mark.parametrize(("name", "body"), [
    ("empty", b""),
    ("untagged", _mac0(GOOD_PROT, prefix=b"\x84")),
    ("other tag", _mac0(GOOD_PROT, prefix=b"\xd2\x84")),
    ("three elements", _mac0(GOOD_PROT, prefix=b"\xd1\x83")),
    ("indefinite array", _mac0(GOOD_PROT, prefix=b"\xd1\x9f") + b"\xff"),
    ("alg 5 (the gateway sends 4)", _mac0(cbor.dumps(_hdr(cose.ALG_HMAC_256_256)))),
    ("alg 4.0", _mac0(b"\xa3\x01\xf9\x44\x00\x04\x47SL-0001\x06\x41\x05")),
    ("labels out of order", _mac0(b"\xa3\x04\x47SL-0001\x01\x04\x06\x41\x05")),
    ("a fourth label", _mac0(b"\xa4\x01\x04\x04\x47SL-0001\x06\x41\x05\x07\x00")),
    ("no piv", _mac0(b"\xa2\x01\x04\x04\x47SL-0001")),
    ("piv with a leading zero", _mac0(b"\xa3\x01\x04\x04\x47SL-0001\x06\x42\x00\x05")),
    ("piv of 9 bytes", _mac0(b"\xa3\x01\x04\x04\x47SL-0001\x06\x49" + b"\x01" * 9)),
    ("kid of 65 bytes", _mac0(b"\xa3\x01\x04\x04\x58\x41" + b"k" * 65 + b"\x06\x41\x05")),
    ("kid as text", _mac0(b"\xa3\x01\x04\x04\x67SL-0001\x06\x41\x05")),
    ("kid head not shortest", _mac0(b"\xa3\x01\x04\x04\x58\x07SL-0001\x06\x41\x05")),
    ("protected head not shortest",
     b"\xd1\x84\x58" + bytes((len(GOOD_PROT),)) + GOOD_PROT + _mac0(GOOD_PROT)[3 + len(
         GOOD_PROT):]),
    ("unprotected kid", _mac0(GOOD_PROT, unprotected=b"\xa1\x04\x47SL-0002")),
    ("unprotected indefinite", _mac0(GOOD_PROT, unprotected=b"\xbf\xff")),
    ("nil payload", _mac0(GOOD_PROT)[:3 + len(GOOD_PROT) + 1] + b"\xf6" + b"\x48" + bytes(8)),
    ("indefinite payload", _mac0(GOOD_PROT)[:3 + len(GOOD_PROT) + 1] + b"\x5f\x41\xa0\xff"
     + b"\x48" + bytes(8)),
    ("payload longer than the input", _mac0(GOOD_PROT)[:3 + len(GOOD_PROT) + 1]
     + b"\x59\xff\xff\xa0"),
    ("tag of 7 bytes", _mac0(GOOD_PROT, tag=bytes(7))),
    ("tag of 9 bytes", _mac0(GOOD_PROT, tag=bytes(9))),
    ("trailing byte", _mac0(GOOD_PROT) + b"\x00"),
])
def test_peek_refuses_any_other_layout(name, body):
    with pytest.raises(cose.CoseError):
        cose.mac0_peek(body)
    with pytest.raises(cose.CoseError):
        cose.mac0_open(KEY, body)


def test_peek_accepts_the_hand_built_reference():
    assert cose.mac0_open(KEY, _mac0(GOOD_PROT)) == (b"SL-0001", 5, b"\xa0")
    assert cose.mac0_open(KEY, _mac0(cbor.dumps(_hdr(5)), tag=cose.hmac_sha256(
        KEY, cbor.dumps(["MAC0", cbor.dumps(_hdr(5)), b"", b"\xa0"]))), algs=(4, 5))[1] == 5


def test_every_truncation_and_bit_flip_of_an_ack_is_refused():
    body, _, _ = _gateway_bodies()[2]
    for i in range(len(body)):
        with pytest.raises(cose.CoseError):
            cose.mac0_open(KEY, body[:i])
        for bit in range(8):
            bad = bytearray(body)
            bad[i] ^= 1 << bit
            with pytest.raises(cose.CoseError):
                cose.mac0_open(KEY, bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=64))
def test_open_agrees_with_the_general_verifier(payload, seq, kid):
    prot = {cose.H_ALG: cose.ALG_HMAC_256_64, cose.H_KID: kid, cose.H_PIV: cose.piv(seq)}
    data = cose.mac0_create(KEY, payload, prot)
    assert cose.mac0_open(KEY, data) == (kid, seq, payload)
    assert cose.mac0_verify(KEY, data) == (prot, {}, payload)
