"""UART framing: firmware/node/frame.py against agent/protocol.py, the `cobs` package and binascii.

docs/protocol.md §3: wire = 00 | COBS(type | body | CRC-16/CCITT-FALSE, big-endian) | 00; a
decoded frame is at most 1024 bytes; rejection kinds cobs, crc, short, type, oversize.
"""

import binascii
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from cobs import cobs
from hypothesis import assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))

from node import cose, frame

from lantern.agent import protocol
from lantern.agent.errors import FrameError as AgentFrameError

TYPES = (frame.DATA, frame.ACK, frame.STATUS, frame.COMMAND, frame.REPLY)
KINDS = {"cobs", "crc", "short", "type", "oversize"}
LIMIT = frame.MAX_FRAME + frame.MAX_FRAME // 254 + 2  # longest COBS chunk of a legal frame
# Lengths of non-zero runs around COBS's 254-byte block boundary.
RUN_LENGTHS = (1, 253, 254, 255, 256, 507, 508, 509, 762)

# The two independent decoders: (decode function, its FrameError class).
SIDES = {
    "firmware": (frame.decode, frame.FrameError),
    "agent": (protocol.decode_frame, AgentFrameError),
}
ENCODERS = {"firmware": frame.encode, "agent": protocol.encode_frame}


def make_feed(side):
    """A fresh deframer of one side as a function: bytes in, list of chunks out."""
    if side == "firmware":
        d = frame.Deframer()
        return lambda data: list(d.feed(data))  # a generator: it only runs when consumed
    return protocol.Deframer().feed


def ref_crc(data):
    """CRC-16/CCITT-FALSE as CPython's binascii computes it."""
    return binascii.crc_hqx(data, 0xFFFF)


def ref_raw(ftype, body):
    """type | body | CRC-16 big-endian, built without the code under test."""
    raw = bytes((ftype,)) + body
    return raw + ref_crc(raw).to_bytes(2, "big")


def ref_chunk(ftype, body):
    """A COBS chunk (no delimiters) built with the `cobs` package."""
    return cobs.encode(ref_raw(ftype, body))


def ref_decode(chunk):
    """(type, body) if chunk is a valid frame by the reference libraries, else None."""
    try:
        raw = cobs.decode(chunk)
    except cobs.DecodeError:
        return None
    if len(raw) < 3 or len(raw) > frame.MAX_FRAME or raw[0] not in TYPES:
        return None
    if ref_crc(raw[:-2]) != int.from_bytes(raw[-2:], "big"):
        return None
    return raw[0], raw[1:-2]


def outcome(side, chunk):
    """("ok", (type, body)) or ("err", kind); any other exception propagates."""
    decode, error = SIDES[side]
    try:
        ftype, body = decode(chunk)
    except error as e:
        return ("err", e.kind)
    return ("ok", (ftype, bytes(body)))


def nonzero(b):
    return b.replace(b"\x00", b"\x01")


# ------------------------------------------------------------------------------------- COBS

@st.composite
def cobs_inputs(draw):
    """Byte strings rich in the COBS edge cases: runs near 254, all-zero stretches."""
    segment = st.one_of(
        st.binary(max_size=64),
        st.sampled_from(RUN_LENGTHS).flatmap(
            lambda n: st.binary(min_size=n, max_size=n).map(nonzero)),
        st.tuples(st.sampled_from(RUN_LENGTHS), st.integers(1, 255)).map(
            lambda nb: bytes((nb[1],)) * nb[0]),
        st.integers(0, 600).map(bytes),  # all zeros
    )
    return b"".join(draw(st.lists(segment, max_size=4)))


COBS_EDGES = (
    [pytest.param(b"", id="empty")]
    + [pytest.param(bytes(n), id=f"zeros-{n}") for n in (1, 2, 253, 254, 255, 600)]
    + [pytest.param(b"\x01" * n, id=f"run-{n}") for n in RUN_LENGTHS]
    + [pytest.param(b"\xff" * n + b"\x00", id=f"run-{n}-then-zero") for n in (253, 254, 255)]
    + [pytest.param(b"\x00" + b"\xff" * n, id=f"zero-then-run-{n}") for n in (253, 254, 255)]
    + [pytest.param(bytes(range(1, 256)) * 3, id="ramp-765")]
)


def check_cobs_round_trip(data):
    enc = frame.cobs_encode(data)
    assert b"\x00" not in enc
    assert frame.cobs_decode(enc) == data
    # Each implementation decodes the other's encoding.
    assert cobs.decode(enc) == data
    assert frame.cobs_decode(cobs.encode(data)) == data


def assert_same_bytes(fw, ref, ref_name):
    """Byte-for-byte equality with a readable message for long outputs."""
    assert fw == ref, (f"firmware: {len(fw)} bytes ending {fw[-3:].hex()}, "
                       f"{ref_name}: {len(ref)} bytes ending {ref[-3:].hex()}")


def check_cobs_matches_package(data):
    assert_same_bytes(frame.cobs_encode(data), cobs.encode(data), "cobs package")


@pytest.mark.parametrize("data", COBS_EDGES)
def test_cobs_round_trip_edges(data):
    check_cobs_round_trip(data)


@settings(max_examples=300, deadline=None)
@given(cobs_inputs())
def test_cobs_round_trip(data):
    check_cobs_round_trip(data)


@pytest.mark.parametrize("data", COBS_EDGES)
def test_cobs_matches_package_edges(data):
    check_cobs_matches_package(data)


@settings(max_examples=300, deadline=None)
@given(cobs_inputs())
def test_cobs_matches_package(data):
    check_cobs_matches_package(data)


# -------------------------------------------------------------------------------------- CRC

@pytest.mark.parametrize("crc16", [frame.crc16, protocol.crc16], ids=["firmware", "agent"])
@pytest.mark.parametrize(("data", "want"), [(b"123456789", 0x29B1), (b"", 0xFFFF)],
                         ids=["check-value", "empty"])
def test_crc_catalogue(crc16, data, want):
    assert crc16(data) == want


@given(st.binary(max_size=300))
def test_crc_matches_binascii(data):
    assert frame.crc16(data) == ref_crc(data) == protocol.crc16(data)


@given(st.binary(max_size=100), st.binary(max_size=100))
def test_crc_firmware_incremental(a, b):
    assert frame.crc16(b, frame.crc16(a)) == frame.crc16(a + b)


# ------------------------------------------------------------------- encode / decode, both ways

def _body_with_final_run(run):
    """A DATA body whose raw frame (type | body | crc) is `run` non-zero bytes, CRC included."""
    for fill in range(1, 256):
        body = bytes((fill,)) * (run - 3)
        if b"\x00" not in ref_raw(frame.DATA, body):
            return body
    raise AssertionError("no fill byte gives a zero-free frame")


BODY_EDGES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00", id="zero"),
    pytest.param(bytes(300), id="zeros-300"),
    pytest.param(bytes(frame.MAX_FRAME - 3), id="max-zeros"),
    pytest.param(b"\x41" * (frame.MAX_FRAME - 3), id="max-nonzero"),
    *[pytest.param(_body_with_final_run(n), id=f"raw-run-{n}") for n in (253, 254, 255, 508)],
]


def check_encode_decode(ftype, body):
    fw = frame.encode(ftype, body)
    ag = protocol.encode_frame(ftype, body)
    for wire in (fw, ag):
        assert wire[0] == 0 and wire[-1] == 0 and b"\x00" not in wire[1:-1]
    # Each side decodes the other's frames (and its own).
    for side in SIDES:
        for wire in (fw, ag):
            assert outcome(side, wire[1:-1]) == ("ok", (ftype, body))
    assert_same_bytes(fw, ag, "agent encode_frame")


@pytest.mark.parametrize("ftype", TYPES)
@pytest.mark.parametrize("body", BODY_EDGES)
def test_encode_decode_edges(ftype, body):
    check_encode_decode(ftype, body)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TYPES),
       st.one_of(st.binary(max_size=frame.MAX_FRAME - 3),
                 cobs_inputs().filter(lambda b: len(b) <= frame.MAX_FRAME - 3)))
def test_encode_decode(ftype, body):
    check_encode_decode(ftype, body)


# docs/protocol.md §4: the ACK for seq 5 of SL-0042 at gateway time 1764331201234 ms.
DOC_KEY = bytes(range(32))
DOC_ACK_WIRE = bytes.fromhex(
    "001c02d1844fa301040447534c2d30303432064105a04ea2018105021b0112019aca55a2d248591dbe5ad26ab8"
    "03b9bb00")


def test_doc_ack_vector():
    assert protocol.encode_ack(DOC_KEY, b"SL-0042", [5], 1764331201234) == DOC_ACK_WIRE
    for side in SIDES:
        kind, (ftype, body) = outcome(side, DOC_ACK_WIRE[1:-1])
        assert (kind, ftype) == ("ok", frame.ACK)
        assert frame.encode(ftype, body) == protocol.encode_frame(ftype, body) == DOC_ACK_WIRE
    # The node accepts the gateway's ACK under its key.
    prot, _, payload = cose.mac0_verify(DOC_KEY, body)
    assert prot[cose.H_PIV] == b"\x05"
    assert payload == bytes.fromhex("a201810502" "1b0000019aca55a2d2")


# ------------------------------------------------------------------------------- deframing

FRAME = st.tuples(st.sampled_from(TYPES), st.binary(max_size=200), st.sampled_from(tuple(ENCODERS)))


def cut_short(frame_and_length):
    """The first bytes of a frame's chunk, never all of it."""
    (ftype, body, enc), k = frame_and_length
    chunk = ENCODERS[enc](ftype, body)[1:-1]
    return chunk[:min(k, len(chunk) - 1)]


NOISE = st.one_of(
    st.binary(max_size=40),  # may hold delimiters
    st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"")),  # one zero-free run
    st.tuples(FRAME, st.integers(0, 60)).map(cut_short),  # e.g. the sender was reset
    st.integers(LIMIT + 1, 2 * LIMIT).map(lambda n: b"\x55" * n),  # over-long garbage
)
OVER = "over-long run"


def normalise(chunks):
    """None and an over-long chunk both mean "an over-long run was dropped"."""
    return [OVER if c is None or len(c) > LIMIT else c for c in chunks]


@st.composite
def streams(draw):
    """(frames, noise around them, the stream, the chunks a deframer must yield)."""
    frames = draw(st.lists(FRAME, min_size=1, max_size=6))
    noise = draw(st.lists(NOISE, min_size=len(frames) + 1, max_size=len(frames) + 1))
    stream = bytearray()
    expected = []
    for (ftype, body, enc), before in zip(frames, noise, strict=False):
        wire = ENCODERS[enc](ftype, body)
        stream += before + wire
        # Every piece of noise ends at a delimiter: its own or the frame's leading 00.
        expected += [p for p in before.split(b"\x00") if p]
        expected.append(wire[1:-1])
    stream += noise[-1]
    expected += [p for p in noise[-1].split(b"\x00")[:-1] if p]  # the last piece is pending
    # Noise must not be a valid frame by itself (a 1-in-65536 CRC coincidence).
    assume(not any(ref_decode(p) for n in noise for p in n.split(b"\x00")))
    return [(t, b) for t, b, _ in frames], bytes(stream), normalise(expected)


@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=200, deadline=None)
@given(streams(), st.data())
def test_deframer_stream(side, case, data):
    frames, stream, expected = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    feed = make_feed(side)
    chunks = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        chunks += feed(stream[a:b])
    assert normalise(chunks) == expected
    decoded = [outcome(side, c) for c in chunks if c is not None]
    assert [r for kind, r in decoded if kind == "ok"] == frames
    # Every other chunk was rejected with a known kind.
    assert {r for kind, r in decoded if kind == "err"} <= KINDS


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("piece", [1, 7, 100, 4096], ids=lambda n: f"reads-of-{n}")
def test_deframer_over_long_run_reported_once(side, piece):
    wire = ENCODERS[side](frame.DATA, b"after the garbage")
    stream = b"\x55" * (3 * LIMIT) + wire + wire
    feed = make_feed(side)
    chunks = []
    for i in range(0, len(stream), piece):
        chunks += feed(stream[i:i + piece])
    assert normalise(chunks) == [OVER, wire[1:-1], wire[1:-1]]
    if piece < LIMIT:  # the run spans reads: the deframer drops it and reports None
        assert chunks[0] is None


# ------------------------------------------------------------------------------ rejections

def _zero_in_block():
    # A single COBS block whose data holds the frame's 0x00 instead of a code byte: not COBS.
    raw = ref_raw(frame.DATA, b"\x00")
    assert b"\x00" not in raw[2:]
    return bytes((len(raw) + 1,)) + raw


def _swapped_crc():
    raw = bytearray(ref_raw(frame.DATA, b"hello"))
    assert raw[-1] != raw[-2]
    raw[-2], raw[-1] = raw[-1], raw[-2]
    return cobs.encode(bytes(raw))


def _flipped(index, mask=0x01):
    raw = bytearray(ref_raw(frame.DATA, b"hello, gateway"))
    raw[index] ^= mask
    return cobs.encode(bytes(raw))


def _oversize_raw(n):
    # A decoded frame of n > 1024 bytes whose COBS chunk still fits in LIMIT bytes.
    chunk = ref_chunk(frame.DATA, bytes(n - 3))
    assert len(chunk) <= LIMIT
    return chunk


REJECTS = [
    pytest.param("crc", _flipped(3), id="crc-body-bit"),
    pytest.param("crc", _flipped(0, 0x80), id="crc-type-bit"),
    pytest.param("crc", _flipped(-1, 0xFF), id="crc-last-byte"),
    pytest.param("crc", _swapped_crc(), id="crc-little-endian"),
    pytest.param("cobs", b"\x05AB", id="cobs-block-past-end"),
    pytest.param("cobs", b"\x03A", id="cobs-last-block-short"),
    pytest.param("cobs", b"\x00" + ref_chunk(frame.DATA, b"x"), id="cobs-zero-code"),
    pytest.param("cobs", ref_chunk(frame.DATA, b"x") + b"\x00", id="cobs-trailing-zero"),
    pytest.param("cobs", _zero_in_block(), id="cobs-zero-in-block"),
    pytest.param("short", b"", id="short-empty-chunk"),
    pytest.param("short", cobs.encode(b""), id="short-0"),
    pytest.param("short", cobs.encode(b"\x01"), id="short-1"),
    pytest.param("short", cobs.encode(b"\xff\xff"), id="short-2-crc-of-nothing"),
    *[pytest.param("type", ref_chunk(t, b"x"), id=f"type-0x{t:02x}") for t in (0, 6, 0x7F, 0xFF)],
    pytest.param("oversize", b"\x01" * (LIMIT + 1), id="oversize-chunk"),
    pytest.param("oversize", ref_chunk(frame.DATA, b"\x41" * frame.MAX_FRAME), id="oversize-big"),
    *[pytest.param("oversize", _oversize_raw(n), id=f"oversize-raw-{n}")
      for n in (frame.MAX_FRAME + 1, frame.MAX_FRAME + 5)],
]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("kind", "chunk"), REJECTS)
def test_decode_rejects(side, kind, chunk):
    assert outcome(side, chunk) == ("err", kind)


ACCEPTS = [
    *[pytest.param(ref_chunk(t, b""), id=f"empty-body-type-{t}") for t in TYPES],
    pytest.param(ref_chunk(frame.DATA, bytes(frame.MAX_FRAME - 3)), id="raw-1024-zeros"),
    pytest.param(ref_chunk(frame.DATA, _body_with_final_run(frame.MAX_FRAME)),
                 id="raw-1024-nonzero"),
]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("chunk", ACCEPTS)
def test_decode_accepts_limits(side, chunk):
    assert outcome(side, chunk) == ("ok", ref_decode(chunk))


# ------------------------------------------------------------------------------------ fuzz

def _fuzz_input(rng):
    """One random decoder input: noise, or a valid frame with a few mutations."""
    r = rng.random()
    if r < 0.25:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(32)))
    if r < 0.30:
        return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(LIMIT - 40, LIMIT + 40)))
    ftype = rng.choice((*TYPES, *TYPES, 0, 6, 0xFF))
    n = rng.randrange(frame.MAX_FRAME - 8, frame.MAX_FRAME + 4) if r < 0.35 else rng.randrange(40)
    body = bytes(rng.choice((0, rng.randrange(256))) for _ in range(n))
    chunk = bytearray(ref_chunk(ftype, body))
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        i = rng.randrange(len(chunk) + 1)
        op = rng.randrange(5)
        if op == 0 and i < len(chunk):
            chunk[i] ^= 1 << rng.randrange(8)
        elif op == 1 and i < len(chunk):
            del chunk[i]
        elif op == 2:
            chunk.insert(i, rng.randrange(256))
        elif op == 3:
            del chunk[i:]
        else:
            chunk[i:i] = chunk[rng.randrange(len(chunk) + 1):][:8]
    return bytes(chunk)


def test_fuzz_decoders():
    """20,000 seeded inputs: only FrameError escapes; zero-free chunks get the same verdict."""
    rng = random.Random(42)
    seen = Counter()
    problems = []
    for _ in range(20_000):
        chunk = _fuzz_input(rng)
        results = {}
        for side, (decode, error) in SIDES.items():
            try:
                ftype, body = decode(chunk)
                results[side] = ("ok", (ftype, bytes(body)))
            except error as e:
                results[side] = ("err", e.kind)
                if e.kind not in KINDS:
                    problems.append((chunk.hex(), side, f"unknown kind {e.kind!r}"))
            except Exception as e:
                problems.append((chunk.hex(), side, repr(e)))
        # A deframer never hands over a 0x00, so on zero-free chunks both sides must agree.
        if b"\x00" not in chunk and len(set(results.values())) > 1:
            problems.append((chunk.hex(), "disagree", results))
        seen.update(r if kind == "err" else "ok" for kind, r in results.values())
    assert problems[:5] == [], f"{len(problems)} problems"
    # The inputs reached every outcome, so the loop tests every branch.
    assert set(seen) == KINDS | {"ok"}, seen
