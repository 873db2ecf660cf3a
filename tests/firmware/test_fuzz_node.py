"""Scenario 5, node side: what a node does with hostile bytes from the line, on MicroPython.

The only frames a node acts on are ACKs (they make it forget frames and set its clock). A
seeded fuzzer builds genuine ACKs and mutates them at every layer (line bytes, COBS, CRC,
CBOR, COSE_Mac0 structure, key, kid, payload), adds forgeries and replays, and feeds them
through the firmware's own receive path (node.frame deframer and decoder, then
UartLink._on_ack) on the MicroPython unix port. Only an ACK made with the node's key, for
the node's own id, may remove a frame or set the clock; nothing may raise.
"""

from __future__ import annotations

import random
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cobs import cobs

from lantern.agent import protocol
from lantern.tools.street.reliability import record, size

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KID = b"SL-0001"
IN_FLIGHT = list(range(40, 48))  # what the node waits to hear about in every case

pytestmark = pytest.mark.micropython

# Runs on MicroPython: each input line is "<hex of line bytes>"; each output line is
# "<removed seqs, comma-separated>|<clock set: 0/1>|<exception escaping, or ->".
HARNESS = r"""
import sys, binascii, time
from node import frame
from node.link_uart import UartLink

class Outbox:
    evicted = 0
    def __init__(self): self.seqs = set()
    def remove(self, seq):
        if seq in self.seqs:
            self.seqs.discard(seq)
            return True
        return False

class Clock:
    def __init__(self): self.set = 0
    def set_ms(self, ms): self.set = 1

class Stream:
    pass

KEY = bytes(range(32))
link = UartLink(Stream(), "SL-0001", KEY, Outbox(), Clock())
out = []
for line in sys.stdin:
    data = binascii.unhexlify(line.strip())
    ob = Outbox()
    ob.seqs = set(range(40, 48))
    link._outbox = ob
    link._clock = Clock()
    link._inflight = {}
    for s in range(40, 48):
        link._inflight[s] = (0, 1, 0, time.ticks_ms())
    exc = "-"
    try:
        for chunk in frame.Deframer().feed(data):
            if chunk is None:
                continue
            try:
                ftype, body = frame.decode(chunk)
            except frame.FrameError:
                continue
            if ftype == frame.ACK:
                link._on_ack(body)
    except Exception as e:
        exc = type(e).__name__
    gone = sorted(set(range(40, 48)) - ob.seqs)
    print(",".join(str(s) for s in gone) + "|" + str(link._clock.set) + "|" + exc)
"""


def ack_body(key: bytes, kid: bytes, seqs: Any, now_ms: Any = 1764331201234,
             payload: bytes | None = None) -> bytes:
    if payload is None:
        payload = cbor2.dumps({1: seqs, 2: now_ms}, canonical=True)
    piv = max(seqs) if isinstance(seqs, list) and seqs and all(
        isinstance(s, int) and s >= 0 for s in seqs) else 1
    return protocol.create_mac0(key, kid, piv, payload)


def mutate(rng: random.Random, b: bytes) -> bytes:
    out = bytearray(b)
    for _ in range(rng.choice((1, 1, 2, 3))):
        i = rng.randrange(len(out) + 1)
        op = rng.randrange(5)
        if op == 0 and i < len(out):
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            out.insert(i, rng.randrange(256))
        elif op == 2 and i < len(out):
            del out[i]
        elif op == 3:
            del out[i:]
        else:
            out[i:i] = out[rng.randrange(len(out) + 1):][:8]
    return bytes(out)


def make_case(rng: random.Random) -> tuple[str, bytes, frozenset[int] | None]:
    """(category, line bytes, the seqs it may remove: None when it may remove nothing)."""
    seqs = sorted(rng.sample(IN_FLIGHT, rng.randrange(1, 5)))
    good = ack_body(KEY, KID, seqs)
    cat = rng.choice(("genuine", "replay", "forged", "other_node", "wrong_kid", "wire", "crc",
                      "cbor", "cose", "type", "noise", "authentic_payload"))
    if cat == "genuine":
        return cat, protocol.encode_frame(protocol.ACK, good), frozenset(seqs)
    if cat == "replay":  # an old ACK, for frames no longer in flight
        return cat, protocol.encode_ack(KEY, KID, [rng.randrange(40)], 1), None
    if cat == "forged":
        key = rng.choice((OTHER_KEY, bytes(32), rng.randbytes(32)))
        return cat, protocol.encode_frame(protocol.ACK, ack_body(key, KID, seqs)), None
    if cat == "other_node":
        return cat, protocol.encode_ack(OTHER_KEY, b"SL-0002", seqs, 1), None
    if cat == "wrong_kid":  # our key, someone else's id: still not for us
        return cat, protocol.encode_frame(protocol.ACK, ack_body(KEY, b"SL-0002", seqs)), None
    if cat == "wire":
        return cat, mutate(rng, protocol.encode_frame(protocol.ACK, good)), frozenset(seqs)
    if cat == "crc":
        raw = bytes((protocol.ACK,)) + good
        raw += protocol.crc16(raw).to_bytes(2, "big")
        return cat, b"\x00" + bytes(cobs.encode(mutate(rng, raw))) + b"\x00", None
    if cat == "cbor":
        return cat, protocol.encode_frame(protocol.ACK, mutate(rng, good)), None
    if cat == "cose":
        prot, unprot, payload, tag = cbor2.loads(good).value
        hdr = cbor2.loads(prot)
        op = rng.randrange(5)
        if op == 0:
            hdr[1] = rng.choice((5, 4.0, True, 99))
        elif op == 1:
            hdr[4] = b"SL-0002"
        elif op == 2:
            payload = cbor2.dumps({1: IN_FLIGHT, 2: 5}, canonical=True)  # more than was acked
        elif op == 3:
            tag = rng.choice((tag[:-1], tag + b"\x00", bytes(8)))
        else:
            unprot = {4: KID}
            del hdr[4]
        body = cbor2.dumps(cbor2.CBORTag(17, [cbor2.dumps(hdr), unprot, payload, tag]))
        return cat, protocol.encode_frame(protocol.ACK, body), None
    if cat == "type":  # a DATA or REPLY frame carrying a genuine ACK body: not an ACK
        ftype = rng.choice((protocol.DATA, protocol.STATUS, protocol.REPLY, 0x07))
        raw = bytes((ftype,)) + good
        raw += protocol.crc16(raw).to_bytes(2, "big")
        return cat, b"\x00" + bytes(cobs.encode(raw)) + b"\x00", None
    if cat == "noise":
        return cat, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))), None
    # authentic but odd payloads (as only a buggy gateway could send): never a crash
    weird: Any = rng.choice(([], [[40]], "40", 40, None, {1: 41}, {1: [41, "x"]},
                             {1: [-1, 2**70, 41.0]}, {1: [42], 2: "now"}, {2: 5}))
    payload = cbor2.dumps(weird)
    return cat, protocol.encode_frame(protocol.ACK, ack_body(KEY, KID, [41, 42], payload=payload)
                                      ), frozenset({41, 42})


def oracle(wire: bytes) -> frozenset[int] | None:
    """Seqs an independent decoder (agent.protocol: cobs, cbor2, hmac) finds authentically
    acknowledged in these bytes; None if none. A mutation can leave an ACK authentic (it may
    only touch the unprotected header, which COSE does not MAC): then it may act."""
    seqs: set[int] = set()
    found = False
    for chunk in protocol.Deframer().feed(wire):
        try:
            ftype, body = protocol.decode_frame(chunk or b"")
            if ftype != protocol.ACK:
                continue
            m = protocol.parse_mac0(body)
            protocol.verify_mac0(KEY, m)
            payload = cbor2.loads(m.payload)
        except (protocol.FrameError, ValueError, cbor2.CBORDecodeError):
            continue
        if m.kid == KID and isinstance(payload, dict) and isinstance(payload.get(1), list):
            found = True
            seqs |= {x for x in payload[1] if isinstance(x, int)}
    return frozenset(seqs) if found else None


def test_fuzz_node_ack_path_on_micropython(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    n = size(3_000, 100_000)
    rng = random.Random(6)
    cases = [make_case(rng) for _ in range(n)]
    (tmp_path / "harness.py").write_text(HARNESS)
    proc = subprocess.run(
        [str(MICROPYTHON), "-X", "heapsize=110K", str(tmp_path / "harness.py")],
        input="".join(c[1].hex() + "\n" for c in cases), capture_output=True, text=True,
        env={"MICROPYPATH": MP_PATH}, timeout=900)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == n, proc.stderr[-2000:]
    by_cat: Counter[str] = Counter()
    crashes, forged, wrong = [], Counter(), []
    genuine_ok = 0
    for (cat, wire, meant), line in zip(cases, lines, strict=True):
        by_cat[cat] += 1
        allowed = oracle(wire)
        if cat in ("wire", "crc", "cbor", "cose") and allowed is not None:
            by_cat["authentic_after_mutation"] += 1  # e.g. only the unprotected header changed
        gone_s, clock, exc = line.split("|")
        gone = {int(s) for s in gone_s.split(",") if s}
        if exc != "-":
            crashes.append((cat, wire.hex(), exc))
        if allowed is None and (gone or clock == "1"):
            forged[cat] += 1  # a frame forgotten (or the clock moved) without the key
        elif allowed is not None and (not gone <= allowed or (clock == "1" and not gone)):
            wrong.append((cat, wire.hex(), sorted(gone), clock))  # more than it said, or the
            # clock moved by an ACK that acknowledged nothing in flight (a replay)
        if cat == "genuine":
            genuine_ok += gone == meant and clock == "1"
    record({"scenario": "5 fuzz: node ACK path on MicroPython (COBS, CRC, CBOR, COSE)",
            "sent": n, "delivered": None, "lost": None, "duplicates_upstream": None,
            "accepted_forged": sum(forged.values()), "accepted_corrupt": len(wrong),
            "crashes": len(crashes), "cases_by_layer": dict(sorted(by_cat.items())),
            "genuine_acks_honoured": genuine_ok})
    assert crashes[:5] == []
    assert not forged, forged
    assert wrong[:5] == []
    assert genuine_ok == by_cat["genuine"] > 0  # the path does work for the real thing
    assert by_cat["authentic_after_mutation"] < n // 100
