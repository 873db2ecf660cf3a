"""The seeded fault-injecting line (tools/street/faults.py): rates, reproducibility, order."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random

import pytest

from lantern.agent import protocol
from lantern.tools.street.faults import HOLD_S, Faults, FaultSpec


def frames(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [protocol.encode_frame(protocol.DATA, i.to_bytes(4, "big") + rng.randbytes(
        rng.randrange(20, 200))) for i in range(n)]


def run_line(spec: FaultSpec, seed: int, stream: bytes, piece: int = 97,
             direction: str = "up") -> tuple[bytes, Faults]:
    """Feed the stream in odd-sized pieces, as a pty read would hand it over."""
    out = bytearray()
    f = Faults(spec, seed)
    for i in range(0, len(stream), piece):
        f.feed(direction, stream[i:i + piece], out.extend)
    return bytes(out), f


def decoded(stream: bytes) -> list[bytes]:
    good = []
    for chunk in protocol.Deframer().feed(stream):
        if chunk is None:
            continue
        with contextlib.suppress(protocol.FrameError):
            good.append(protocol.decode_frame(chunk)[1])
    return good


async def test_no_faults_is_a_wire() -> None:
    stream = b"".join(frames(300))
    out, f = run_line(FaultSpec(), 7, stream)
    assert out == stream
    assert f.stats["up"]["frames"] == 300
    assert f.stats["up"]["bytes_out"] == len(stream)


async def test_same_seed_same_faults_other_seed_other_faults() -> None:
    spec = FaultSpec(drop=0.002, flip=0.01, burst=4, lose=0.05, duplicate=0.02, truncate=0.02)
    stream = b"".join(frames(500))
    a, fa = run_line(spec, 11, stream, piece=97)
    b, fb = run_line(spec, 11, stream, piece=31)  # how reads split the bytes does not matter
    c, _ = run_line(spec, 12, stream)
    assert a == b and fa.summary() == fb.summary()
    assert a != c


async def test_directions_have_independent_dice() -> None:
    spec = FaultSpec(flip=0.02, lose=0.1)
    stream = b"".join(frames(200))
    up_alone, _ = run_line(spec, 3, stream)
    f = Faults(spec, 3)
    up = bytearray()
    for i in range(0, len(stream), 50):
        f.feed("down", stream[i:i + 50], lambda d: None)  # traffic the other way, interleaved
        f.feed("up", stream[i:i + 50], up.extend)
    assert bytes(up) == up_alone


async def test_flip_rate_and_burst_length() -> None:
    spec = FaultSpec(flip=0.01, burst=16)
    stream = bytes(random.Random(5).randrange(1, 256) for _ in range(400_000))
    out, f = run_line(spec, 5, stream, piece=4096)
    assert len(out) == len(stream)
    bad = [i for i, (x, y) in enumerate(zip(stream, out, strict=True)) if x != y]
    assert bad and all(bin(stream[i] ^ out[i]).count("1") == 1 for i in bad)  # one bit each
    assert len(bad) == f.stats["up"]["bytes_corrupted"]
    assert 0.008 < len(bad) / len(stream) < 0.012
    runs = 1 + sum(1 for a, b in itertools.pairwise(bad) if b != a + 1)
    assert 12 < len(bad) / runs < 20, "bursts should average about 16 bytes"


async def test_frame_loss_rate_and_survivors_intact() -> None:
    sent = frames(4000)
    out, f = run_line(FaultSpec(lose=0.05), 9, b"".join(sent))
    got = decoded(out)
    lost = f.stats["up"]["frames_lost"]
    assert 150 < lost < 250
    assert len(got) == 4000 - lost
    bodies = [protocol.decode_frame(protocol.Deframer().feed(s)[0] or b"")[1] for s in sent]
    it = iter(bodies)
    assert all(any(g == b for b in it) for g in got), "survivors must be intact and in order"


async def test_truncation_and_duplication_are_rejected_or_repeated() -> None:
    sent = frames(2000)
    out, f = run_line(FaultSpec(truncate=0.1, duplicate=0.1), 4, b"".join(sent))
    st = f.stats["up"]
    assert 150 < st["frames_truncated"] < 250 and 150 < st["frames_duplicated"] < 250
    got = decoded(out)
    dupes = len(got) - len(set(got))
    assert dupes > 100  # duplicated (and not truncated) frames arrive twice
    # every truncated frame is lost; with its delimiter gone, never is its neighbour
    assert len(set(got)) == 2000 - st["frames_truncated"]


async def test_byte_drops() -> None:
    stream = b"".join(frames(1000))
    out, f = run_line(FaultSpec(drop=0.01), 2, stream)
    assert len(out) == len(stream) - f.stats["up"]["bytes_dropped"]
    assert 0.008 < f.stats["up"]["bytes_dropped"] / len(stream) < 0.012


async def test_delays_keep_order() -> None:
    sent = frames(200)
    out = bytearray()
    f = Faults(FaultSpec(delay=0.3, delay_max_s=0.05), 1)
    for s in sent:
        f.feed("up", s, out.extend)
    assert f.stats["up"]["frames_delayed"] > 30
    assert bytes(out) != b"".join(sent)  # something is still held back
    await asyncio.sleep(0.2)
    assert bytes(out) == b"".join(sent)


async def test_partial_unit_is_passed_on_after_a_while() -> None:
    out = bytearray()
    f = Faults(FaultSpec(), 1)
    f.feed("up", b"\x00\x05abc", out.extend)  # a frame still being written
    assert bytes(out) == b"\x00"
    await asyncio.sleep(HOLD_S * 3)
    assert bytes(out) == b"\x00\x05abc"
    f.close()


async def test_disconnect_silences_both_directions_then_recovers() -> None:
    spec = FaultSpec(disconnect=1.0, disconnect_s=0.1)
    f = Faults(spec, 1)
    up, down = bytearray(), bytearray()
    fr = frames(3)
    f.feed("up", fr[0], up.extend)  # its body triggers the disconnect: lost, and all after it
    f.feed("down", fr[1], down.extend)
    assert f.stats["up"]["disconnects"] == 1
    assert up == b"\x00" and down == b""  # only the leading delimiter got through
    assert f.stats["down"]["frames_lost_disconnected"] == 1
    f.spec = FaultSpec()  # no further disconnects: once the window is over, bytes flow again
    f.feed("up", fr[2], up.extend)
    assert bytes(up) == b"\x00"  # still inside the window
    await asyncio.sleep(0.15)
    f.feed("up", fr[2], up.extend)
    assert bytes(up) == b"\x00" + fr[2]


@pytest.mark.parametrize("bad", [{"lose": 1.5}, {"flip": -0.1}, {"burst": 0.5},
                                 {"delay_max_s": -1.0}])
def test_spec_rejects_out_of_range(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        FaultSpec(**bad)
