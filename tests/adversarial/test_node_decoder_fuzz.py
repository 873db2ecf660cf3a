"""The node's CBOR decoder and COSE envelope reader against peer-controlled sizes and nesting.

A seeded generator builds inputs of at most one frame (1024 bytes) whose heads lie: counts
and lengths larger than the input, huge (up to 2**64 - 1), indefinite, nested past any limit,
maps keyed by NaN and floats, containers of containers, plus mutations of real node
traffic. They run through node.cbor.loads and node.cose.mac0_peek on the MicroPython unix
port at the simulated board's heap (boards/unix-sim.json), with ballast taking the heap down
to the headroom a running node has at its peak, and with the garbage collector off while
each input is decoded, so that every byte it allocates counts and nothing is freed behind
the measurement's back. Only the module's own error may escape; no input may exhaust the heap
or cost more than LIMITS bytes.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from pathlib import Path

import cbor2
import pytest

from lantern.agent import protocol
from lantern.tools.street.reliability import record, size
from lantern.tools.street.sim import MICROPYTHON, SimNode

pytestmark = pytest.mark.micropython

ROOT = Path(__file__).resolve().parents[2]
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
MAX_INPUT = protocol.MAX_FRAME - 3  # a frame body: type byte and CRC take the rest
# What a running node on the simulated board has free at its peak (status over the link:
# heap peak 161 KB of 192 KB): the ballast leaves this much for the decoder.
HEADROOM = 32 * 1024
# Bytes one call may allocate in all (64-bit unix port; an ESP32 needs about half): decoding
# as an ACK or a command is decoded (cbor.loads' default budget), as the node decodes its own
# pack (the largest budget), and reading a COSE_Mac0 envelope by position (cose.mac0_peek).
LIMITS = {"ack_or_command": 8 * 1024, "own_pack": 28 * 1024, "envelope": 4 * 1024}

HARNESS = r"""
import gc, sys
from node import cbor, cose

# The harness's own reading allocates nothing once the ballast is in: inputs arrive
# length-prefixed into buffers made first, and the ballast list never grows (a growing list
# leaves holes), so the headroom is one free stretch and only the decoder spends it.
stdin = sys.stdin.buffer
frame = bytearray(MAX_INPUT)
view = memoryview(frame)
head = memoryview(bytearray(2))


def fill(mv):
    got = 0
    while got < len(mv):
        n = stdin.readinto(mv[got:])
        if not n:
            return got
        got += n
    return got


gc.collect()
ballast = [None] * 512
i = 0
while gc.mem_free() > HEADROOM + 1024:
    ballast[i] = bytearray(1024)
    i += 1
gc.collect()
print("free", gc.mem_free())
while fill(head) == 2:
    size = head[0] << 8 | head[1]
    fill(view[:size])
    data = bytes(view[:size])
    out = []
    for fn, arg in ((cbor.loads, 64), (cbor.loads, 256), (cose.mac0_peek, (4,))):
        gc.collect()
        gc.disable()
        before = gc.mem_alloc()
        try:
            fn(data, arg)
            res = "ok"
        except cbor.CBORDecodeError:
            res = "cbor_error"
        except cose.CoseError:
            res = "cose_error"
        except BaseException as e:
            res = type(e).__name__
        used = gc.mem_alloc() - before
        gc.enable()
        out.append("%s:%d" % (res, used))
    print(" ".join(out))
""".replace("HEADROOM", str(HEADROOM)).replace("MAX_INPUT", str(MAX_INPUT))


def head(rng: random.Random, major: int, n: int) -> bytes:
    """A head for n, in its shortest form or (sometimes) a longer one."""
    mt = major << 5
    if n < 24 and rng.random() < 0.8:
        return bytes((mt | n,))
    for ai, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width) and (rng.random() < 0.7 or width == 8):
            return bytes((mt | ai,)) + n.to_bytes(width, "big")
    raise AssertionError(n)


def count(rng: random.Random, real: int) -> int:
    """A declared count or length: true, a little off, or absurd."""
    r = rng.random()
    if r < 0.6:
        return real
    if r < 0.8:
        return max(0, real + rng.randint(-2, 40))
    return rng.choice((255, 1000, 65535, 2**31, 2**32 - 1, 2**63, 2**64 - 1))


NAN_KEYS = (b"\xf9\x7e\x00", b"\xfa\x7f\xc0\x00\x00", b"\xfb\x7f\xf8" + bytes(6))


def tree(rng: random.Random, depth: int, budget: list[int]) -> bytes:
    """One hostile data item; budget[0] is the bytes still allowed."""
    if budget[0] <= 0:
        return b"\x00"
    r = rng.random()
    if depth > 40 or r < 0.3:  # a leaf
        leaf = rng.choice((
            b"\x00", b"\x17", b"\x1b" + bytes(8), b"\x38\xff", b"\xf6", b"\xf7", b"\xf5",
            *NAN_KEYS, b"\xf9\x3c\x00", b"\xfa\x7f\x80\x00\x00", b"\x40", b"\x60",
            b"\x61a", b"\x62\xc3\xbc", b"\x63\xed\xa0\x80", b"\xff", b"\xf8\x20", b"\x1c"))
        if rng.random() < 0.15:  # a string with a declared length
            n = rng.randrange(0, 60)
            leaf = head(rng, rng.choice((2, 3)), count(rng, n)) + b"a" * n
        budget[0] -= len(leaf)
        return leaf
    if r < 0.4:  # an indefinite string of many (often empty) chunks
        major = rng.choice((2, 3))
        chunk = bytes((major << 5,)) if rng.random() < 0.7 else bytes((major << 5 | 1,)) + b"a"
        n = rng.randrange(1, budget[0] // len(chunk) + 2)
        budget[0] -= n * len(chunk) + 2
        return bytes((major << 5 | 31,)) + chunk * n + b"\xff"
    if r < 0.5:  # a tag
        budget[0] -= 2
        return head(rng, 6, rng.choice((0, 1, 2, 4, 5, 17, 2**64 - 1))) + tree(rng, depth + 1,
                                                                             budget)
    major = rng.choice((4, 4, 5))
    n = rng.randrange(0, 6) if rng.random() < 0.7 else rng.randrange(0, 300)
    indefinite = rng.random() < 0.15
    out = bytearray(bytes((major << 5 | 31,)) if indefinite else head(rng, major, count(rng, n)))
    budget[0] -= len(out)
    for _ in range(n):
        if budget[0] <= 0:
            break
        if major == 5:
            key = rng.choice(NAN_KEYS) if rng.random() < 0.3 else tree(rng, depth + 1, budget)
            out += key
        out += tree(rng, depth + 1, budget)
    if indefinite:
        out += b"\xff"
    return bytes(out)


def repeated(rng: random.Random) -> bytes:
    """A container head declaring many items, then one cheap item over and over."""
    unit = rng.choice((b"\x80", b"\xa0", b"\x40", b"\x60", b"\xf9\x7e\x00", b"\xc1\x00",
                       b"\x81\x80", b"\xa1\xf9\x7e\x00\x80", b"\x9f\xff", b"\x61a",
                       b"\xfa\x3f\x80\x00\x01"))
    n = (MAX_INPUT - 3) // len(unit)
    major = rng.choice((4, 5)) if len(unit) > 1 or unit != b"\xa0" else 4
    items = n // 2 if major == 5 else n
    return head(rng, major, count(rng, items)) + unit * n


def genuine(rng: random.Random) -> bytes:
    """Real traffic a node reads: an ACK, a command, a node's pack, or its COSE envelope."""
    seqs = sorted(rng.sample(range(1, 2**32), rng.randrange(1, 33)))
    payload = rng.choice((
        cbor2.dumps({1: seqs, 2: 1764331201234}, canonical=True),
        cbor2.dumps({1: [], 2: 1764331201234, 3: bytes(8)}, canonical=True),
        cbor2.dumps({1: 3, 2: {1: 30000}}, canonical=True),
        cbor2.dumps([{0: f"m{i}", 2: rng.random() * 100} for i in range(25)], canonical=True)))
    if rng.random() < 0.5:
        return payload
    return protocol.create_mac0(bytes(32), b"SL-0001", max(seqs), payload)


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(out) + 1)
        op = rng.randrange(4)
        if op == 0 and i < len(out):
            out[i] = rng.choice((0x5F, 0x7F, 0x9F, 0xBF, 0xFF, 0x1B, 0x5B, 0x9B, 0xBB,
                                 rng.randrange(256)))
        elif op == 1:
            out[i:i] = bytes((rng.choice((0x9F, 0x81, 0xA1, 0x5F, 0xF9)),))
        elif op == 2 and i < len(out):
            del out[i:i + rng.randrange(1, 4)]
        else:
            out += rng.choice((b"\x00", b"\xff", b"\x40" * 50))
    return bytes(out)


def make_case(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(("tree", "tree", "repeated", "genuine", "mutated", "deep"))
    if kind == "tree":
        data = tree(rng, 0, [rng.randrange(16, MAX_INPUT)])
    elif kind == "repeated":
        data = repeated(rng)
    elif kind == "genuine":
        data = genuine(rng)
    elif kind == "mutated":
        data = mutate(rng, genuine(rng))
    else:  # nested past the limit, with a wide bottom
        depth = rng.randrange(10, 40)
        data = rng.choice((b"\x81", b"\x9f", b"\xa1\x00", b"\xc1")) * depth + repeated(rng)
    return kind, data[:MAX_INPUT]


def test_node_decoder_on_micropython_at_board_heap(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    heap = SimNode("SL-0001", tmp_path).heap_kb()  # boards/unix-sim.json
    n = size(2_000, 20_000)
    rng = random.Random(21)
    cases = [make_case(rng) for _ in range(n)]
    (tmp_path / "harness.py").write_text(HARNESS)
    proc = subprocess.run(
        [str(MICROPYTHON), "-X", f"heapsize={heap}K", str(tmp_path / "harness.py")],
        input=b"".join(len(c[1]).to_bytes(2, "big") + c[1] for c in cases), capture_output=True,
        env={"MICROPYPATH": MP_PATH}, timeout=900)
    lines = proc.stdout.decode().splitlines()
    assert proc.returncode == 0 and len(lines) == n + 1, (lines[-5:], proc.stderr[-2000:].decode())
    free = int(lines[0].split()[1])
    assert free <= HEADROOM + 1024
    outcomes: Counter[str] = Counter()
    escaped: list[tuple[str, str, str, str]] = []
    worst = {name: (0, "") for name in LIMITS}
    for (kind, data), line in zip(cases, lines[1:], strict=True):
        for name, res in zip(LIMITS, line.split(), strict=True):
            what, used_s = res.split(":")
            used = int(used_s)
            outcomes[f"{name} {what}"] += 1
            if what not in ("ok", "cbor_error", "cose_error"):
                escaped.append((name, kind, what, data.hex()))
            if used > worst[name][0]:
                worst[name] = (used, f"{kind} {data[:24].hex()}")
    record({"scenario": "adversarial: node decoder fuzz on MicroPython at board heap",
            "inputs": n, "heap_kb": heap, "free_for_decoding": free,
            "outcomes": dict(sorted(outcomes.items())),
            **{f"max_alloc_{name}": worst[name][0] for name in LIMITS}})
    print(json.dumps({"free": free, "outcomes": outcomes, "worst": worst}, indent=1))
    assert escaped[:5] == []
    for name, limit in LIMITS.items():
        assert worst[name][0] <= limit, (name, worst[name])
    # both ends exercised: real traffic decodes, hostile input is refused
    for name in ("ack_or_command", "own_pack"):
        assert outcomes[f"{name} ok"] > n // 20 and outcomes[f"{name} cbor_error"] > n // 2
    assert outcomes["envelope ok"] > n // 20

