"""The gateway's hand-built CBOR on the hot path (agent/protocol.py) against cbor2 and pycose.

NodeKey verifies and acknowledges without cbor2; every byte it builds must equal what cbor2's
canonical encoder (and pycose's MAC_structure) makes of the same values.
"""

from __future__ import annotations

import io
import os
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.headers import KID, Algorithm
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

from lantern.agent import protocol
from lantern.agent.errors import AuthError, FrameError

# lengths on both sides of every CBOR head form (RFC 8949 §3: 23/24, 255/256, 65535/65536)
EDGES = [0, 1, 23, 24, 25, 255, 256, 257, 1000, 65535, 65536, 65537]
UINT_EDGES = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]


@pytest.mark.parametrize("n", UINT_EDGES)
@pytest.mark.parametrize("major", [0, 2, 4])
def test_cbor_head_is_cbor2s_shortest_form(major: int, n: int) -> None:
    fp = io.BytesIO()
    cbor2.CBOREncoder(fp).encode_length(major, n)
    assert protocol.cbor_head(major, n) == fp.getvalue()
    if major == 0:
        assert protocol.cbor_head(0, n) == cbor2.dumps(n, canonical=True)


@pytest.mark.parametrize("plen", EDGES)
@pytest.mark.parametrize("prot", [b"", b"\xa1\x01\x04", bytes(30), bytes(300)])
def test_mac_structure_at_every_head_boundary(plen: int, prot: bytes) -> None:
    payload = os.urandom(plen)
    want = cbor2.dumps(["MAC0", prot, b"", payload], canonical=True)
    assert protocol.mac_structure_head(prot, len(payload)) + payload == want


@settings(max_examples=300, deadline=None)
@given(prot=st.binary(max_size=300), payload=st.binary(max_size=2000))
def test_mac_structure_random(prot: bytes, payload: bytes) -> None:
    assert (protocol.mac_structure_head(prot, len(payload)) + payload
            == cbor2.dumps(["MAC0", prot, b"", payload]))


@settings(max_examples=150, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), kid=st.binary(min_size=1, max_size=40),
       seq=st.integers(0, 2**63 - 1), payload=st.binary(max_size=1200),
       alg=st.sampled_from([4, 5]))
def test_node_key_agrees_with_cbor2_path_and_pycose(key: bytes, kid: bytes, seq: int,
                                                    payload: bytes, alg: int) -> None:
    data = protocol.create_mac0(key, kid, seq, payload, alg)  # the cbor2 reference encoder
    m = protocol.parse_mac0(data)
    nk = protocol.NodeKey(key, kid)
    nk.verify(m)  # raises if the hand-built MAC_structure differed by one byte
    assert nk.tag(m.protected_bytes, m.payload, alg) == m.tag
    py = Mac0Message.decode(data)
    py.key = SymmetricKey(k=key)
    assert py.get_attr(Algorithm).identifier == alg
    assert py.phdr[KID] == kid
    assert py._mac_structure == protocol.mac_structure_head(m.protected_bytes,
                                                            len(payload)) + payload
    assert py.compute_tag() == m.tag


def test_node_key_refuses_every_single_bit_flip() -> None:
    key = bytes(range(32))
    data = protocol.create_mac0(key, b"SL-0001", 77, b"\x81\xa1\x00\x61x")
    nk = protocol.NodeKey(key, b"SL-0001")
    nk.verify(protocol.parse_mac0(data))
    refused = 0
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        try:
            m = protocol.parse_mac0(bytes(bad))
        except FrameError:
            refused += 1  # broke the structure: refused before the MAC
            continue
        with pytest.raises(AuthError):
            nk.verify(m)
        refused += 1
    assert refused == len(data) * 8
    with pytest.raises(AuthError):
        protocol.NodeKey(bytes(32), b"SL-0001").verify(protocol.parse_mac0(data))


@settings(max_examples=300, deadline=None)
@given(kid=st.binary(min_size=1, max_size=300),
       seqs=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=40),
       now_ms=st.integers(0, 2**64 - 1))
def test_ack_is_encode_ack_byte_for_byte(kid: bytes, seqs: list[int], now_ms: int) -> None:
    key = bytes(range(32))
    assert protocol.NodeKey(key, kid).ack(seqs, now_ms) == protocol.encode_ack(key, kid, seqs,
                                                                              now_ms)


@pytest.mark.parametrize("n", [1, 23, 24, 255, 256])
def test_ack_head_edges(n: int) -> None:
    key = os.urandom(32)
    seqs = list(range(1000, 1000 + n))
    for now in UINT_EDGES[:-1]:
        assert protocol.NodeKey(key, b"SL-0042").ack(seqs, now) == protocol.encode_ack(
            key, b"SL-0042", seqs, now)


# ---------------------------------------------------------------- the pack's array head


def _pack(n: int) -> list[dict[int, Any]]:
    recs: list[dict[int, Any]] = [{0: f"m{i}", 2: float(i)} for i in range(n)]
    recs[0].update({-2: "urn:dev:lantern:SL-0001:", -3: 1764331200})
    return recs


@pytest.mark.parametrize("n", [1, 7, 20, 23, 24, 25, 255, 256, 300])
def test_pack_size_counts_records(n: int) -> None:
    payload = cbor2.dumps(_pack(n), canonical=True)
    assert protocol.pack_size(payload) == n == len(protocol.resolve_pack(payload))


def test_pack_size_of_an_indefinite_array() -> None:
    recs = _pack(3)
    payload = b"\x9f" + b"".join(cbor2.dumps(r) for r in recs) + b"\xff"
    assert protocol.pack_size(payload) == 3 == len(protocol.resolve_pack(payload))


@pytest.mark.parametrize("payload", [
    b"", b"\x80", b"\x81", b"\xa1\x00\x61x", b"\x61x", b"\x81\x01", b"\x82\x01\xa0",
    b"\x98", b"\x99\x00", b"\x9c\x00", b"\x9f\xff", b"\x9f\x01\xff", b"\x9a\xff\xff\xff\xff\xa0",
    b"\x9b" + b"\xff" * 8 + b"\xa0",
])
def test_pack_size_refuses_what_is_not_an_array_of_maps(payload: bytes) -> None:
    with pytest.raises(FrameError) as e:
        protocol.pack_size(payload)
    assert e.value.kind in ("senml", "cbor")


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=64))
def test_pack_size_never_fails_otherwise(payload: bytes) -> None:
    """Any bytes: a count no larger than the bytes, or a FrameError (never another error)."""
    try:
        n = protocol.pack_size(payload)
    except FrameError:
        return
    assert 1 <= n <= len(payload)


# ---------------------------------------------------------------- parse_mac0's usual layout


def _outcome(fn: Any, data: bytes) -> Any:
    try:
        return fn(data)
    except FrameError as e:
        return ("refused", e.kind)


@settings(max_examples=400, deadline=None)
@given(kid=st.binary(min_size=1, max_size=30), seq=st.integers(0, 2**63 - 1),
       payload=st.binary(max_size=700), alg=st.sampled_from([4, 5]),
       flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=3),
       cut=st.integers(0, 3))
def test_the_usual_layout_parses_as_the_general_parser_does(
        kid: bytes, seq: int, payload: bytes, alg: int, flips: list[tuple[int, int]],
        cut: int) -> None:
    data = bytearray(protocol.create_mac0(bytes(32), kid, seq, payload, alg))
    for i, b in flips:  # damage here and there (often in the heads the fast path reads)
        data[i % len(data)] = b
    if cut:
        del data[-cut:]
    raw = bytes(data)
    assert _outcome(protocol.parse_mac0, raw) == _outcome(protocol._parse_mac0_any, raw)
    if not flips and not cut:
        assert protocol._parse_mac0_usual(raw) is not None  # the firmware's layout: fast


def test_other_layouts_take_the_general_parser() -> None:
    # unprotected header not empty, protected keys in another order: still parsed right
    m = protocol.parse_mac0(protocol.create_mac0(bytes(32), b"SL-0001", 5, b"\x80"))
    odd = cbor2.dumps(cbor2.CBORTag(17, [cbor2.dumps({4: b"SL-0001", 1: 4, 6: b"\x05"}),
                                         {5: b"x"}, b"\x80", m.tag]))
    assert protocol._parse_mac0_usual(odd) is None
    got = protocol.parse_mac0(odd)
    assert (got.kid, got.seq, got.payload, got.unprotected) == (b"SL-0001", 5, b"\x80",
                                                               {5: b"x"})


def test_a_bytearray_parses_to_bytes_as_cbor2_gives_them() -> None:
    data = protocol.create_mac0(bytes(32), b"SL-0001", 5, b"\x80")
    m = protocol.parse_mac0(bytearray(data))
    assert m == protocol._parse_mac0_any(data)
    assert type(m.kid) is bytes and type(m.payload) is bytes and type(m.tag) is bytes
