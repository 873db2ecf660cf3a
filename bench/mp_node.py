"""Runs on MicroPython (unix port): the node's own code, timed. Prints one JSON line.

  micropython mp_node.py cycle node.json N   sample -> encode -> MAC -> frame, N times; then
                                             one typical pack (every sensor fresh)
  micropython mp_node.py fill node.json N    N packs sealed into the persistent outbox

bench/node_cycle.py and bench/link.py drive it; it only uses firmware/node.
"""

import asyncio
import binascii
import gc
import json
import sys
import time

from node import app, cose, frame, link_uart
from node.hal import unix as hal

# loaded as on a running node, so that the heap figures include them
_RUNTIME = (asyncio, link_uart)


class MemOutbox:
    """Stands in for the flash outbox so the cycle is timed without the flash write."""

    def __init__(self):
        self.seq = 0
        self.last = None

    def next_seq(self):
        self.seq += 1
        return self.seq

    def put(self, seq, data):
        self.last = data

    def __len__(self):
        return 3


def make_node(cfg_path):
    # as app.main does: node/start.py is loaded for the boot and given back (app._unload)
    cfg = app._boot().load_config(cfg_path)
    with open(cfg["board"]) as f:
        board = json.load(f)
    return app.Node(cfg, hal, board)


def settle(node):
    """Wait until every sensor has new data past its warm-up, as at a node's real interval.

    Back to back, the cycles above read the slow chips (SCD4x: every 5 s; SPS30: 1 s) between
    their conversions, so that pack carries "stale" flags instead of their values.
    """
    scale = getattr(node.sensors, "time_scale", 1)
    now = time.ticks_ms()
    wait = 0
    for slot in node.sensors:
        d = slot.driver
        if d is not None:
            warm = d.WARMUP_MS / scale - time.ticks_diff(now, slot.started)
            wait = max(wait, warm, d.PERIOD_MS / scale)
    time.sleep_ms(int(wait) + 20)


def typical(node, cycle_us, peak):
    """One pack as a node sends it at its interval: all sensors fresh, health filled in."""
    settle(node)
    node.cycle_ms = max(1, cycle_us // 1000)  # what the sampler task records for the next pack
    node.heap_peak = peak
    now, values = node.sample()
    node.seal(now, values)
    _, _, payload = cose.mac0_verify(node.key, node.outbox.last)
    return payload, frame.encode(frame.DATA, node.outbox.last)


def cycle(node, n):
    node.outbox = MemOutbox()
    t_sample = t_seal = t_frame = 0
    wire = b""
    worst = 0
    for _ in range(n):
        t0 = time.ticks_us()
        now, values = node.sample()
        t1 = time.ticks_us()
        seq = node.seal(now, values)
        t2 = time.ticks_us()
        wire = frame.encode(frame.DATA, node.outbox.last)
        t3 = time.ticks_us()
        t_sample += time.ticks_diff(t1, t0)
        t_seal += time.ticks_diff(t2, t1)
        t_frame += time.ticks_diff(t3, t2)
        worst = max(worst, time.ticks_diff(t3, t0))
    # the MAC alone, over the last payload, to split encode from MAC
    protected, _, payload = cose.mac0_verify(node.key, node.outbox.last)
    t0 = time.ticks_us()
    for _ in range(n):
        cose.mac0_create(node.key, payload, protected)
    t_mac = time.ticks_diff(time.ticks_us(), t0)
    # heap: everything a node holds, plus all one cycle allocates with the collector off
    gc.collect()
    base = gc.mem_alloc()
    total = base + gc.mem_free()
    gc.disable()
    now, values = node.sample()
    node.seal(now, values)
    frame.encode(frame.DATA, node.outbox.last)
    peak = gc.mem_alloc()
    gc.enable()
    gc.collect()
    typical_payload, typical_wire = typical(node, (t_sample + t_seal + t_frame) // n, peak)
    return {
        "cycles": n,
        "sample_us": t_sample // n,
        "seal_us": t_seal // n,
        "mac_us": t_mac // n,
        "frame_us": t_frame // n,
        "cycle_us": (t_sample + t_seal + t_frame) // n,
        "worst_cycle_us": worst,
        "heap_total": total,
        "heap_in_use_idle": base,
        "heap_high_water": peak,
        "heap_per_cycle": peak - base,
        "values_sampled": len(values),
        "seq": seq,
        "payload_hex": binascii.hexlify(payload).decode(),
        "wire_hex": binascii.hexlify(wire).decode(),
        "typical_payload_hex": binascii.hexlify(typical_payload).decode(),
        "typical_wire_hex": binascii.hexlify(typical_wire).decode(),
    }


def fill(node, n):
    """A backlog for the link bench: real seals into the flash outbox; the sensors are read
    every 50 packs only (simulated buses are slow and the link bench is not about them)."""
    t0 = time.ticks_ms()
    for i in range(n):
        if i % 50 == 0:
            now, values = node.sample()
        node.seal(now, values)
        if i % 8 == 0:
            gc.collect()
    return {"filled": len(node.outbox), "evicted": node.outbox.evicted,
            "ms": time.ticks_diff(time.ticks_ms(), t0)}


def main():
    mode, cfg_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    node = make_node(cfg_path)
    out = cycle(node, n) if mode == "cycle" else fill(node, n)
    print(json.dumps(out))


main()
