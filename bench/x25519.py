"""x25519: what a key rotation's agreement costs a node (issue 17, docs/protocol.md "Key
rotation and configuration").

The firmware's own node/x25519.py (as .mpy) on
  - the MicroPython unix port (64-bit host), and
  - the QEMU Cortex-M3 board (.build/qemu/firmware.elf, `-icount shift=3`: 8 ns per
    instruction, a 125 MIPS core), the module copied onto the board's littlefs as a package of
    its own with the two it imports (the image's frozen `node` package predates it).

Figures: one X25519 (a whole Montgomery ladder, 255 steps, and the inversion), one public key,
the HKDF-SHA256 a rekey derives, and the REKEY's whole work (a public key, the shared secret,
HKDF): median of the runs. Heap: on the unix port, the smallest `-X heapsize` one agreement
runs in less the smallest the imports need; on QEMU, the board's high-water mark during one
agreement (mps2.heap_stats(), collections every 1 KB) less the heap live before it.

    python -m bench.x25519 [--qemu-runs N] [--unix-runs N]     # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lantern.tools.street.sim import MPY_CROSS, compiled_firmware

from .ota import ICOUNT, _least_heap, _unix_runs, on_board

PACKAGE = "xb"  # the modules' package on the QEMU board's filesystem
MODULES = ("cbor", "cose", "x25519")

SCRIPT = """
import gc, json, time
try:
    import mps2
except ImportError:
    mps2 = None
x = __import__(PKG + ".x25519", None, None, ["x25519"])

K = bytes(range(32))
U = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")


def median(fn, n):
    ts = []
    for _ in range(n):
        gc.collect()
        t = time.ticks_us()
        fn()
        ts.append(time.ticks_diff(time.ticks_us(), t))
    ts.sort()
    return ts[len(ts) // 2] / 1000


def rekey():
    pub = x.public(K)
    shared = x.x25519(K, U)
    return pub, x.hkdf(shared, K, b"lantern rekey v1SL-0001" + bytes(4), 32)


out = {}
if mps2:
    threshold = gc.threshold()
    gc.threshold(1024)  # the board records the heap at each collection
    gc.collect()
    live = gc.mem_alloc()
    rekey()
    gc.collect()
    out["heap_peak_bytes"] = mps2.heap_stats()[2] - live
    gc.threshold(threshold)
out["x25519_ms"] = median(lambda: x.x25519(K, U), RUNS)
out["public_ms"] = median(lambda: x.public(K), RUNS)
out["hkdf_ms"] = median(lambda: x.hkdf(U, K, b"lantern rekey v1", 32), RUNS)
out["rekey_ms"] = median(rekey, RUNS)
print("X25519 " + json.dumps(out))
"""


def _result(out: str) -> dict[str, Any]:
    m = re.search(r"^X25519 (\{.*\})\s*$", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no figures from the board:\n{out[-1500:]}")
    return dict(json.loads(m.group(1)))


def unix(workdir: Path, runs: int = 21) -> dict[str, Any]:
    """The figures on the MicroPython unix port, the firmware compiled to .mpy."""
    compiled_firmware()
    script = workdir / "x25519_unix.py"
    script.write_text(f"PKG = 'node'\nRUNS = {runs}\n" + SCRIPT)
    proc = _unix_runs(script, "110K")
    if proc.returncode:
        raise RuntimeError(f"unix port: {proc.stderr[-1500:]}")
    res = _result(proc.stdout)
    imports = workdir / "x25519_imports.py"
    imports.write_text("from node import x25519\n")
    once = workdir / "x25519_once.py"
    once.write_text("from node import x25519\nk = bytes(range(32))\n"
                    "x25519.hkdf(x25519.x25519(k, x25519.public(k)), k, b'', 32)\n")
    res["least_heap_imports_bytes"] = _least_heap(imports)
    res["least_heap_rekey_bytes"] = _least_heap(once)
    res["heap_peak_bytes"] = res["least_heap_rekey_bytes"] - res["least_heap_imports_bytes"]
    res["runs"] = runs
    return res


def qemu(workdir: Path, runs: int = 5) -> dict[str, Any]:
    """The figures on the QEMU Cortex-M3 board (the modules copied onto its flash)."""
    compiled_firmware()
    script = workdir / "x25519_bench.py"
    script.write_text(f"PKG = {PACKAGE!r}\nRUNS = {runs}\n" + SCRIPT)
    subprocess.run([str(MPY_CROSS), "-o", str(workdir / "x25519_bench.mpy"), str(script)],
                   check=True, timeout=60)
    res = _result(on_board(workdir / "qemu-x25519.log", PACKAGE, MODULES,
                           workdir / "x25519_bench.mpy"))
    res["runs"] = runs
    res["icount"] = ICOUNT
    return res

def run(workdir: Path, qemu_runs: int = 5, unix_runs: int = 21) -> dict[str, Any]:
    """bench.run's section: the unix port's figures and the QEMU board's."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {"unix": unix(workdir, unix_runs), "qemu": qemu(workdir, qemu_runs)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.x25519", description=__doc__)
    p.add_argument("--qemu-runs", type=int, default=5)
    p.add_argument("--unix-runs", type=int, default=21)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(Path(d), args.qemu_runs, args.unix_runs), indent=2))


if __name__ == "__main__":
    main()
