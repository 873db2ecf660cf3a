"""ota_verify: what checking a signed update bundle costs a node (issue 16, docs/updates.md).

The firmware's own code (node/ed25519.py, node/sha512.py, node/update.py, as .mpy) on
  - the MicroPython unix port (64-bit host), and
  - the QEMU Cortex-M3 board (.build/qemu/firmware.elf, `-icount shift=3`: 8 ns per
    instruction, a 125 MIPS core), where the modules are copied onto the board's littlefs as a
    package of their own (the image's frozen `node` package predates them) and imported from
    there: the bytecode is the same.

Figures: one Ed25519 verification (RFC 8032 TEST 1), the node's check of the real release
manifest (a bundle of the whole firmware for one board: SHA-512 of the Sig_structure, then the
verification, then decoding the manifest), and on the unix port the whole bundle read and
hashed from a file. Heap: on the unix port, the smallest `-X heapsize` the manifest check runs
in, less the smallest the imports alone need; on QEMU, the board's high-water mark during the
check (mps2.heap_stats(), sampled at every collection, here every 1 KB allocated) less the
heap live before it: an upper bound, exact when `heap_peak_is_the_checks`. Times are taken
with the collector as the board's _boot.py sets it (gc.threshold 16384 on QEMU).

    python -m bench.ota [--qemu-runs N]      # prints one JSON object

ota_transfer: a whole bundle (the firmware for one board, ~96 KB) from the gateway's real
serial link and command channel (agent/ota/transfer.py push, window 4) to the firmware on the
unix port, over a pty paced as a UART at each baud (bench/line.py: 8N1, baud/10 bytes per
second each way, a 256-byte TX buffer), while the node keeps sampling and its packs keep
flowing. Figures: OFFER sent to APPLY answered (signature check, every chunk, APPLY), and the
chunk phase alone, each as bundle (file) bytes per second over the line rate; the issue's
target is >= 0.8. What it does not measure: a real UART's driver and interrupt latency, an
ESP32's flash write time (the node writes to the host's filesystem), line noise (no chunk is
lost, so no resend), and BLE.

    python -m bench.ota --transfer [--baud B ...] [--window W]

ota_transfer_ble: the same over the gateway's BLE link through the virtual radio, at node
MTU 247 and 23, with an estimate for a real radio (bench/ota_ble.py says what it means).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lantern.tools.field import provision_steps as ps
from lantern.tools.field import release
from lantern.tools.street.sim import COMPILED, MICROPYTHON, MPY_CROSS, compiled_firmware

ROOT = Path(__file__).resolve().parents[1]
QEMU_IMAGE = ROOT / ".build/qemu/firmware.elf"
ICOUNT = "shift=3,sleep=on,align=on"  # as hil_tests/harness/qemu.py runs the board
PACKAGE = "otab"  # the modules' package on the QEMU board's filesystem
MODULES = ("cbor", "sha512", "ed25519", "update")
# RFC 8032 §7.1 TEST 1
TEST1_PUB = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
TEST1_SIG = ("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc6"
             "1e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")

# Runs on the VM: PKG, RUNS, HEAD (the bundle's head file), PUB, BUNDLE (or None) are set first.
SCRIPT = """
import gc, json, time
threshold = gc.threshold()
try:
    import mps2
    gc.threshold(1024)
except ImportError:
    mps2 = None
exec("from %s import ed25519, update" % PKG)
with open(HEAD, "rb") as f:
    head = f.read()
pub = bytes.fromhex(PUB)
sig = bytes.fromhex(SIG)

def median(fn, n):
    ts = []
    for _ in range(n):
        gc.collect()
        t = time.ticks_us()
        fn()
        ts.append(time.ticks_diff(time.ticks_us(), t))
    ts.sort()
    return ts[len(ts) // 2] / 1000

def manifest():
    return update.Verifier(pub, "unix-sim", mpy=None).manifest(head)

out = {"envelope_bytes": len(head) - 8, "files": len(manifest().files)}
if mps2:
    # the board records the heap in use at each collection: collect every 1 KB allocated
    gc.collect()
    live = gc.mem_alloc()
    before = mps2.heap_stats()[2]
    manifest()
    gc.collect()
    hw = mps2.heap_stats()[2]
    out["heap_peak_bytes"] = hw - live
    # False: the imports set the mark, and the check's own peak is lower than this
    out["heap_peak_is_the_checks"] = hw > before
    gc.threshold(threshold)  # timed as the node runs: with the board's threshold
out["verify_ms"] = median(lambda: ed25519.verify(pub, b"", sig), RUNS)
out["manifest_ms"] = median(manifest, RUNS)
if BUNDLE:
    def whole():
        with open(BUNDLE, "rb") as f:
            update.Verifier(pub, "unix-sim", mpy=None).check_stream(f)
    out["bundle_ms"] = median(whole, RUNS)
print("OTA " + json.dumps(out))
"""


def release_bundle(workdir: Path) -> tuple[Path, Path, str]:
    """A bundle of the real firmware for unix-sim under a throwaway key: (bundle, head, key)."""
    key = Ed25519PrivateKey.generate()
    tool = ps.find_mpy_cross()
    found = ps.mpy_cross_version(tool)
    mpy = found[1] if found else (6, 3)
    data = release.bundle(key, "0.0.0-bench", 0, "0.1.0", ["unix-sim"], mpy,
                          release.firmware_files(tool, ["unix-sim"]))
    bundle, head = workdir / "bench.lub", workdir / "bench.head"
    bundle.write_bytes(data)
    head.write_bytes(data[:8 + int.from_bytes(data[4:8], "big")])
    return bundle, head, key.public_key().public_bytes_raw().hex()


def _prelude(pkg: str, runs: int, head: str, pub: str, bundle: str | None) -> str:
    return (f"PKG = {pkg!r}\nRUNS = {runs}\nHEAD = {head!r}\nPUB = {pub!r}\n"
            f"SIG = {TEST1_SIG!r}\nBUNDLE = {bundle!r}\n")


def _result(out: str) -> dict[str, Any]:
    m = re.search(r"^OTA (\{.*\})\s*$", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no figures from the board:\n{out[-1500:]}")
    return dict(json.loads(m.group(1)))


def _unix_runs(script: Path, heap: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MICROPYTHON), "-X", f"heapsize={heap}", str(script)],
                          env={"MICROPYPATH": str(COMPILED)}, capture_output=True, text=True,
                          timeout=300, check=False)


def _least_heap(script: Path) -> int:
    """Smallest heap (bytes, to 256) in which script runs to the end on the unix port."""
    lo, hi = 4096, 512 * 1024
    while hi - lo > 256:
        mid = (lo + hi) // 2
        if _unix_runs(script, str(mid)).returncode == 0:
            hi = mid
        else:
            lo = mid
    return hi


def unix(workdir: Path, runs: int = 21) -> dict[str, Any]:
    """The figures on the MicroPython unix port, the firmware compiled to .mpy."""
    compiled_firmware()
    bundle, head, pub = release_bundle(workdir)
    script = workdir / "ota_unix.py"
    script.write_text(_prelude("node", runs, str(head), pub, str(bundle)) + SCRIPT)
    proc = _unix_runs(script, "110K")
    if proc.returncode:
        raise RuntimeError(f"unix port: {proc.stderr[-1500:]}")
    res = _result(proc.stdout)
    # the heap the manifest check needs beyond what importing its modules takes
    imports = workdir / "ota_imports.py"
    imports.write_text("from node import update, ed25519\n")
    check = workdir / "ota_check.py"
    check.write_text(_prelude("node", 1, str(head), pub, None)
                     + "from node import update\nwith open(HEAD, 'rb') as f:\n    h = f.read()\n"
                     "update.Verifier(bytes.fromhex(PUB), 'unix-sim', mpy=None).manifest(h)\n")
    res["least_heap_imports_bytes"] = _least_heap(imports)
    res["least_heap_check_bytes"] = _least_heap(check)
    res["heap_peak_bytes"] = res["least_heap_check_bytes"] - res["least_heap_imports_bytes"]
    res["runs"] = runs
    return res


def _mpremote(port: str, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode:
        raise RuntimeError(f"mpremote {' '.join(args[:3])}: {proc.stdout[-800:]}"
                           f"{proc.stderr[-800:]}")
    return proc.stdout


def _board(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """QEMU booted with its REPL on a pty: (process, that pty)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["qemu-system-arm", "-machine", "mps2-an385", "-nographic", "-monitor", "none",
             "-semihosting", "-icount", ICOUNT, "-kernel", str(QEMU_IMAGE),
             "-serial", "pty", "-serial", "null", "-serial", "null"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"redirected to (/dev/pts/\d+) \(label serial0\)",
                          log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"QEMU gave no REPL pty: {log.read_text(errors='replace')}")


def on_board(log: Path, package: str, modules: tuple[str, ...], bench_mpy: Path,
             extra: tuple[tuple[Path, str], ...] = ()) -> str:
    """Boot the QEMU board, copy the compiled node `modules` and the bench module (compiled
    here: compiling it on the board would set the heap's high-water mark) into `package` on
    its flash, with `extra` (local path, board path), then import the bench after a soft
    reset (the heap's statistics start again): what it printed."""
    if not QEMU_IMAGE.exists() or shutil.which("qemu-system-arm") is None:
        raise RuntimeError(f"{QEMU_IMAGE} or qemu-system-arm missing: run `make qemu-image`")
    proc, port = _board(log)
    try:
        cp = ["fs", "mkdir", f":{package}"]
        for src, dst in extra:
            cp += ["+", "fs", "cp", str(src), dst]
        for name in modules:
            cp += ["+", "fs", "cp", str(COMPILED / "node" / f"{name}.mpy"),
                   f":{package}/{name}.mpy"]
        cp += ["+", "fs", "cp", str(bench_mpy), f":{package}/{bench_mpy.name}"]
        with tempfile.NamedTemporaryFile("w", suffix=".py") as init:
            cp += ["+", "fs", "cp", init.name, f":{package}/__init__.py"]
            _mpremote(port, *cp)
        _mpremote(port, "soft-reset")
        return _mpremote(port, "exec", f"import {package}.{bench_mpy.stem}")
    finally:
        proc.kill()
        proc.wait()


def qemu(workdir: Path, runs: int = 3) -> dict[str, Any]:
    """The figures on the QEMU Cortex-M3 board (the modules copied onto its flash)."""
    compiled_firmware()
    _, head, pub = release_bundle(workdir)
    script = workdir / "ota_bench.py"
    script.write_text(_prelude(PACKAGE, runs, "bench.head", pub, None) + SCRIPT)
    subprocess.run([str(MPY_CROSS), "-o", str(workdir / "ota_bench.mpy"), str(script)],
                   check=True, timeout=60)
    res = _result(on_board(workdir / "qemu.log", PACKAGE, MODULES, workdir / "ota_bench.mpy",
                           extra=((head, ":bench.head"),)))
    res["runs"] = runs
    res["icount"] = ICOUNT
    return res

def run(workdir: Path, qemu_runs: int = 3, unix_runs: int = 21) -> dict[str, Any]:
    """bench.run's section: the unix port's figures and the QEMU board's."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {"unix": unix(workdir, unix_runs), "qemu": qemu(workdir, qemu_runs)}


# ---- ota_transfer: a whole bundle over a serial line at a baud rate

TRANSFER_BOARD = "unix-sim-lite"
TRANSFER_HEAP = "1M"  # at the board's 192 KB the node's OFFER check runs out of heap today
REBOOT_EXIT = 75  # node/commands.py: the unix board's reset


class _Timed:
    """The gateway's command channel, noting when the transfer's steps are answered."""

    def __init__(self, channel: Any) -> None:
        self._ch = channel
        self.t: dict[str, float] = {}
        self.chunks = 0

    async def command(self, node_id: str, op: int, args: dict[int, Any] | None = None,
                      timeout: float = 5.0, retries: int = 2) -> Any:
        name = {9: "offer", 10: "chunk", 11: "apply"}.get(op)
        if name:
            self.t.setdefault(f"{name}_sent", time.perf_counter())
        out = await self._ch.command(node_id, op, args, timeout=timeout, retries=retries)
        if name:
            self.t[f"{name}_answered"] = time.perf_counter()
        if op == 10:
            self.chunks += 1
        return out


async def transfer_one(workdir: Path, baud: int, bundle: bytes, pub: bytes,
                       window: int = 4) -> dict[str, Any]:
    """One whole update of one node (unix port) at `baud`, through the gateway's serial link
    and agent/ota/transfer.py push(); the node keeps sampling every 2 s meanwhile."""
    import asyncio
    import contextlib

    from lantern.agent.ingest import Ingest
    from lantern.agent.links import serial as serial_link
    from lantern.agent.metrics import Metrics
    from lantern.agent.ota.transfer import TransferStats, push, split
    from lantern.agent.plugins import LinkContext
    from lantern.agent.queue.store import Store
    from lantern.tools.street.sim import SimNode

    from .line import PacedLine

    work = workdir / f"transfer-{baud}"
    line = PacedLine(baud)
    node = SimNode("SL-0001", work / "nodes", port=line.node_port, interval_ms=2000,
                   board=TRANSFER_BOARD, release_pub=pub,
                   extra={"link": {"port": line.node_port, "baud": baud, "rto_ms": 500},
                          "update_trial_s": 60})
    node.write_config()
    state = work / "gw"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = {node.node_id.encode(): node.key}
    metrics = Metrics()
    log = open(work / "node.log", "ab")  # noqa: SIM115 - closed below, after the node
    boots = 1

    async def supervise() -> None:
        nonlocal boots
        while True:
            await asyncio.sleep(0.05)
            if node.proc is not None and node.proc.poll() == REBOOT_EXIT:
                boots += 1
                node.proc = None
                node.start(stdout=log.fileno(), heap=TRANSFER_HEAP)

    line.start()
    async with Store(state / "queue.sqlite") as store:
        ingest = Ingest(store, keys, metrics)
        await ingest.start()
        link = serial_link.make(serial_link.SerialLinkConfig(line.gateway_port, baud),
                                LinkContext(ingest, keys, store, state))
        tasks = [asyncio.create_task(ingest.run()), asyncio.create_task(link.run()),
                 asyncio.create_task(supervise())]
        try:
            node.start(stdout=log.fileno(), heap=TRANSFER_HEAP)
            deadline = time.monotonic() + 60
            while metrics.frames_received[node.node_id] < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no pack: {(work / 'node.log').read_text()[-2000:]}")
                await asyncio.sleep(0.05)
            down0, up0 = line.carried("down"), line.carried("up")
            packs0 = metrics.frames_received[node.node_id]
            timed = _Timed(link.commander)
            stats = TransferStats()
            out = await push(timed, node.node_id, bundle, window=window, stats=stats,
                             confirm_s=120)
            t = timed.t
            down, up = line.carried("down") - down0, line.carried("up") - up0
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            node.close()
            log.close()
            await line.close()
    rate = baud / 10  # 8N1: bytes per second the line carries
    whole = t["apply_answered"] - t["offer_sent"]
    files = len(split(bundle).files)
    chunks = t["chunk_answered"] - t["chunk_sent"]
    return {
        "baud": baud,
        "window": window,
        "outcome": out.status,
        "boots": boots,
        "bundle_bytes": len(bundle),
        "file_bytes": files,
        "chunks": timed.chunks,
        "chunks_resent": stats.chunks_resent,
        "offer_to_apply_s": round(whole, 3),
        "bundle_fraction_of_line_rate": round(len(bundle) / whole / rate, 3),
        "chunk_phase_s": round(chunks, 3),
        "chunk_fraction_of_line_rate": round(files / chunks / rate, 3),
        "line_rate_bytes_per_s": rate,
        "confirm_s": round(time.perf_counter() - t["apply_answered"], 1),
        "bytes_down_whole_update": down,
        "bytes_up_whole_update": up,
        "packs_taken_during_update": metrics.frames_received[node.node_id] - packs0,
    }


def ota_transfer(workdir: Path, bauds: tuple[int, ...] = (115200, 921600), window: int = 4
                 ) -> dict[str, Any]:
    """bench.run's section: update transfer time of a full bundle at each baud over a paced
    pty (bench/line.py), as a fraction of the line rate (the issue's target: >= 0.8)."""
    import asyncio

    workdir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    tool = ps.find_mpy_cross()
    found = ps.mpy_cross_version(tool)
    assert found is not None, f"{tool} does not state its version"
    files = release.firmware_files(tool, [TRANSFER_BOARD])
    bundle = release.bundle(key, "9.9.9", 0, "0.0.1", [TRANSFER_BOARD], found[1], files)
    pub = key.public_key().public_bytes_raw()
    return {str(b): asyncio.run(transfer_one(workdir, b, bundle, pub, window)) for b in bauds}


def ota_transfer_ble(workdir: Path, mtus: tuple[int, ...] = (247, 23), window: int = 4
                     ) -> dict[str, Any]:
    """bench.run's section: a whole bundle over the gateway's BLE link through the virtual
    radio at each node MTU (bench/ota_ble.py), with an estimate for a real radio. In a process
    of its own: the BLE harness installs a fake `bluetooth` module and MicroPython's names."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.ota_ble", "--workdir", str(workdir),
           "--window", str(window)]
    for mtu in mtus:
        cmd += ["--mtu", str(mtu)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    (workdir / "ota_ble.log").write_text(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"bench.ota_ble: {proc.stderr[-1500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qemu-runs", type=int, default=3)
    p.add_argument("--unix-runs", type=int, default=21)
    p.add_argument("--transfer", action="store_true",
                   help="ota_transfer instead: a whole bundle at 115200 and 921600 baud")
    p.add_argument("--baud", type=int, action="append", help="with --transfer: these bauds")
    p.add_argument("--window", type=int, default=4, help="with --transfer: chunks in flight")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lantern-ota-") as d:
        if args.transfer:
            res = ota_transfer(Path(d), tuple(args.baud or (115200, 921600)), args.window)
        else:
            res = run(Path(d), args.qemu_runs, args.unix_runs)
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
