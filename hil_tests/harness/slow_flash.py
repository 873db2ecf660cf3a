"""MicroPython entry for power-cut tests: the unchanged firmware on a slow simulated flash.

Files the outbox opens for writing first wait as a flash chip erases a sector, then take
their data in small pieces with a pause after each, as it programs page by page; so a
SIGKILL sent while a `.tmp` file exists lands inside the write, as a power cut would.
Settings come from node.json: "slow_flash": {"erase_ms": pause after opening,
"piece": bytes per step, "delay_ms": pause per step, "after_write_ms": pause after a frame's
file is complete and renamed into place, before the node reports the pack (0: none)}.
Run as `micropython hil_tests/harness/slow_flash.py node.json` with firmware/ on MICROPYPATH.
"""

import json
import sys
import time

from node import app, outbox

_open = open


class _SlowFile:
    def __init__(self, f, piece, delay_ms):
        self._f = f
        self._piece = piece
        self._delay = delay_ms

    def write(self, data):
        mv = memoryview(data)
        for i in range(0, len(data), self._piece):
            self._f.write(mv[i : i + self._piece])
            time.sleep_ms(self._delay)
        return len(data)

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def run(path):
    with _open(path) as f:
        flash = json.load(f).get("slow_flash", {})
    piece = flash.get("piece", 16)
    delay_ms = flash.get("delay_ms", 1)
    erase_ms = flash.get("erase_ms", 0)

    def slow_open(name, mode="r"):
        f = _open(name, mode)
        if "w" not in mode:
            return f
        time.sleep_ms(erase_ms)
        return _SlowFile(f, piece, delay_ms)

    # The outbox module looks `open` up in its own globals first: only its writes slow down.
    outbox.open = slow_open
    after_ms = flash.get("after_write_ms", 0)
    if after_ms:
        write_atomic = outbox._write_atomic

        def write_then_pause(name, data):
            write_atomic(name, data)
            if "/outbox/" in name:
                # the frame is durable; a cut now leaves a pack the node never reported
                time.sleep_ms(after_ms)

        outbox._write_atomic = write_then_pause
    app.main(path)


run(sys.argv[1])
