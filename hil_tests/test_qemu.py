"""The node frozen into the QEMU Cortex-M3 image, ESP32-sized heap, against the real gateway.

Same end-to-end assertions as the unix tier (check_delivery), plus what only a microcontroller
build can show: heap high-water under 64 KB, the board's flash driven by mpremote, and a soak.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lantern.tools.street.sim import ROOT
from tests.helpers.quantize import expected_lines, script_text

from .harness.delivery import check_delivery
from .harness.qemu import QEMU_IMAGE, UNAVAILABLE, QemuTopology, heap_stats, missing_tools
from .harness.topology import SAMPLE_LINE

pytestmark = pytest.mark.qemu

HEAP_LIMIT = 64 * 1024  # the node's steady state must fit an ESP32 (~110 KB free) with room
ESP32_HEAP = range(100_000, 114_689)  # MICROPY_HEAP_SIZE 114688 minus the GC's own tables


@pytest.fixture(scope="session")
def qemu_image(request: pytest.FixtureRequest) -> Path:
    """The image, rebuilt if its sources changed (incremental: seconds when nothing did)."""
    missing = missing_tools()
    if missing and UNAVAILABLE.exists():
        reason = (f"QEMU TIER SKIPPED: {', '.join(missing)} could not be installed here "
                  f"({UNAVAILABLE.read_text().strip()})")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # shown even under -q, once
                reporter.write_line(f"\n{'!' * 78}\n{reason}\n{'!' * 78}", red=True, bold=True)
        pytest.skip(reason)
    assert not missing, f"{missing} not installed: `make qemu-image` installs and builds"
    build = subprocess.run([str(ROOT / "scripts/build-qemu-image.sh")], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, f"image build failed:\n{build.stdout}\n{build.stderr}"
    assert QEMU_IMAGE.exists()
    return QEMU_IMAGE


@pytest.fixture
async def qemu_topology(tmp_path: Path, qemu_image: Path) -> AsyncIterator[QemuTopology]:
    topo = QemuTopology(tmp_path)
    yield topo
    await topo.stop()


async def drained(topo: QemuTopology, samples: int, timeout: float = 60) -> None:
    """Every node took `samples` packs, all acknowledged, all readings upstream."""
    # (a QEMU board's clock starts at 2000 at every boot: its first samples are held and a
    # time request goes first; docs/time.md)
    await topo.wait_for(
        lambda: all(len(topo.samples(n)) == samples and not topo.outbox(n) for n in topo.nodes),
        timeout, f"{samples} samples per node, all acknowledged")
    await topo.wait_for(
        lambda: len(topo.upstream.readings) >= sum(sum(topo.sampled(n).values())
                                                   for n in topo.nodes),
        30, "all readings upstream")


def assert_times_right(topo: QemuTopology, t0: float, t1: float) -> None:
    """Every reading upstream dated within the run (the board's clock starts at 2000), the
    samples in the order they were taken, the time requests flagged (docs/time.md)."""
    for node in topo.qemu_nodes():
        assert topo.time_requests(node), f"{node.node_id}: its clock was known at boot?"
        times: dict[int, set[float]] = {}
        for rid, r in topo.upstream.readings.items():
            nid, seq, _ = rid.rsplit(":", 2)
            if nid == node.node_id:
                times.setdefault(int(seq), set()).add(r["t"])
                if int(seq) in topo.time_requests(node):
                    assert r["n"].endswith(":time.q") and r["v"] == 1, r
        assert set(times) == set(topo.sampled(node))
        for seq, ts in times.items():
            (t,) = ts  # one time per pack
            assert t0 - 1 <= t <= t1 + 1, (node.node_id, seq, t - t0)
        ordered = [min(times[s]) for s in sorted(topo.samples(node))]
        assert ordered == sorted(ordered), ordered


async def test_every_reading_arrives_once_bit_exact(qemu_topology: QemuTopology) -> None:
    topo = qemu_topology
    topo.sample_limit = 12
    topo.interval_ms = 300
    t0 = time.time()
    await topo.start()
    await drained(topo, 12)
    total = check_delivery(topo)
    assert total >= 12 * 4 * len(topo.nodes)
    assert topo.upstream.duplicates == 0
    assert_times_right(topo, t0, time.time())
    for node in topo.qemu_nodes():
        # the node's own figures ride in every sample (held ones too), not in time requests
        samples = topo.samples(node)
        packs = {s: p for s, p in topo.packs(node).items() if s in samples}
        assert len(packs) == 12 and all("heap_peak" in p for p in packs.values()), packs
        reported_peak = max(p["heap_peak"] for p in packs.values())
        assert 0 < reported_peak < HEAP_LIMIT, f"{node.node_id}: heap_peak {reported_peak}"
        first = min(packs)
        assert all(p["cycle_ms"] > 0 for s, p in packs.items() if s > first), "cycle time missing"
        assert all(64 * 1024 < p["heap_free"] < max(ESP32_HEAP) for p in packs.values())
        # the board's flash, read over mpremote (this stops the node): nothing left to send
        assert await topo.device_outbox(node) == []
        # the board watched every collection: its high-water covers what the node reported
        stats = await heap_stats(node)
        assert stats.size in ESP32_HEAP
        assert reported_peak <= stats.high_water < HEAP_LIMIT, stats
        assert stats.live_peak <= stats.high_water


# docs/protocol.md §4, built on the board from the readings as its drivers would give them
DOC_PACK_SCRIPT = """
import binascii, struct
from node import cbor, cose, frame, senml
print("SINGLE", 1.0 + 2.0 ** -30 == 1.0)
READINGS = %r
values = {}
for name, bits, places in READINGS:
    x = struct.unpack(">d", binascii.unhexlify(bits[1:]))[0] if bits[0] == "d" else int(bits)
    values[name] = senml.quantize(senml.quantize(x, places))
recs = [senml.record(n, values[n]) for n in sorted(values)]
payload = cbor.dumps(senml.pack(None, %d, recs))
prot = {cose.H_ALG: cose.ALG_HMAC_256_64, cose.H_KID: b"SL-0042", cose.H_PIV: cose.piv(5)}
wire = frame.encode(frame.DATA, cose.mac0_create(bytes(range(32)), payload, prot))
print("WIRE", binascii.hexlify(wire).decode())
"""


async def test_same_bytes_on_a_single_precision_vm(qemu_topology: QemuTopology,
                                                   tmp_path: Path) -> None:
    """Values on the wire (docs/protocol.md §1): the Cortex-M3 image, single-precision floats
    as on an ESP32, prints byte for byte what CPython and the unix port print."""
    topo = qemu_topology
    topo.n_nodes = 1
    await topo.start(gateway=False)
    node = topo.qemu_nodes()[0]
    vec = json.loads((ROOT / "tests/vectors/frames/sl0042-seq5-v2.json").read_text())
    readings = [(n, "d" + struct.pack(">d", v).hex() if isinstance(v, float) else str(v), p)
                for n, v, p in vec["readings"]]
    doc = tmp_path / "doc_pack.py"
    doc.write_text(DOC_PACK_SCRIPT % (readings, vec["bt"]))
    out = await node.mpremote("resume", "run", str(doc), timeout=120)
    assert "SINGLE True" in out, out  # the VM really has single-precision floats
    assert f"WIRE {vec['data']['wire']}" in out, out
    cases = tmp_path / "quantize_cases.py"
    cases.write_text(script_text())
    out = await node.mpremote("resume", "run", str(cases), timeout=300)
    got = [ln.strip() for ln in out.splitlines() if re.match(r"[0-9a-f]{8} ", ln.strip())]
    want = expected_lines()
    assert len(got) == len(want), out[-2000:]
    assert [(a, b) for a, b in zip(got, want, strict=True) if a != b] == []


async def test_gateway_sigkill_mid_stream_loses_nothing(qemu_topology: QemuTopology) -> None:
    topo = qemu_topology
    topo.n_nodes = 1
    topo.sample_limit = 24
    topo.interval_ms = 150
    await topo.start()
    node = topo.qemu_nodes()[0]
    await topo.wait_for(lambda: len(topo.upstream.readings) > 20, 30, "first readings")
    topo.kill_gateway(signal.SIGKILL)
    await topo.wait_for(lambda: len(topo.outbox(node)) >= 5, 30,
                        "packs piling up on the board while the gateway is dead")
    topo.start_gateway()
    await drained(topo, 24)
    check_delivery(topo)
    assert await topo.device_outbox(node) == []


async def test_mpremote_drives_the_board(qemu_topology: QemuTopology, tmp_path: Path) -> None:
    """exec, eval, run, fs cp onto the board's littlefs, soft-reset; the node survives it all."""
    topo = qemu_topology
    topo.n_nodes = 1
    topo.sample_limit = 4
    topo.interval_ms = 200
    await topo.start()
    node = topo.qemu_nodes()[0]
    assert node.console is not None
    await drained(topo, 4)
    first_boot = dict(topo.sampled(node))  # its time request(s) included

    # exec: Ctrl-C stops the running node (asyncio loop and all), then the raw REPL answers
    mark = len(node.console.text)
    out = await node.mpremote("resume", "exec", "import sys; print('PLATFORM', sys.platform)",
                              "eval", "sum(range(10))")
    assert "PLATFORM qemu" in out and re.search(r"^45\r?$", out, re.M), out
    assert b"KeyboardInterrupt" in node.console.text[mark:], "the node was not interrupted"

    # fs cp onto the littlefs flash, checked on the board itself
    blob = os.urandom(5000)
    (tmp_path / "blob.bin").write_bytes(blob)
    out = await node.mpremote(
        "resume", "fs", "cp", str(tmp_path / "blob.bin"), ":blob.bin", "+",
        "exec", "import hashlib, binascii; "
                "print('SHA', binascii.hexlify(hashlib.sha256(open('blob.bin', 'rb').read())"
                ".digest()).decode())", "+", "fs", "ls")
    assert f"SHA {hashlib.sha256(blob).hexdigest()}" in out
    for name in ("blob.bin", "node.json", "node.key", "board.json", "state/"):
        assert name in out, f"{name} not on the board:\n{out}"

    # run: a host script on the board
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nst = os.statvfs('/')\n"
                     "print('FS', st[0], st[2], sorted(os.listdir('state')))\n")
    out = await node.mpremote("resume", "run", str(probe))
    # 2 MB of 4 KB blocks, like an ESP32; key_id names the key the counters belong to;
    # untimed holds samples taken before the clock was set (docs/time.md)
    assert "FS 4096 512 ['key_id', 'outbox', 'seq', 'untimed']" in out, out

    # soft-reset: RAM forgotten, flash kept
    out = await node.mpremote("resume", "exec", "marker = 42", "soft-reset", "exec",
                              "import os; print('MARK', 'marker' in globals(), "
                              "'blob.bin' in os.listdir())")
    assert "MARK False True" in out, out

    # Ctrl-D at the friendly REPL boots the node again from its flash: same identity and key,
    # sequence numbers never reused (the next block of reserved numbers), all delivered
    # (its clock starts at 2000 again: a time request, then the held sample, timed)
    mark = len(node.console.text)
    requests = len(topo.time_requests(node))
    node.console.type(b"\x04")
    await topo.wait_for(lambda: len(topo.samples(node)) == 8 and not topo.outbox(node), 60,
                        "4 more samples after the reboot, acknowledged")
    second = [int(m.group(1)) for m in SAMPLE_LINE.finditer(node.console.text, mark)]
    assert len(second) == 5 and min(second) > max(first_boot), second
    assert len(topo.time_requests(node)) == requests + 1 and second[0] in topo.time_requests(node)
    await topo.wait_for(
        lambda: all(f"{node.node_id}:{seq}:0" in topo.upstream.readings for seq in second), 30,
        "the packs sampled after the reboot upstream")

    # a main.py deployed onto the flash takes over from the frozen one at the next boot
    (tmp_path / "main.py").write_text("print('DEPLOYED MAIN', 6 * 7)\n")
    await node.mpremote("resume", "fs", "cp", str(tmp_path / "main.py"), ":main.py")
    mark = len(node.console.text)
    node.console.type(b"\x04")
    await node.console.expect(rb"DEPLOYED MAIN 42\r\n", 30, since=mark)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    assert m, f"no VmRSS for {pid}"
    return int(m.group(1))


def _windows(values: list[int], n: int = 10) -> list[list[int]]:
    """values cut into n consecutive windows of (nearly) equal length."""
    k = len(values)
    return [values[i * k // n:(i + 1) * k // n] for i in range(n)]


SOAK_S = float(os.environ.get("LANTERN_SOAK_S", 1800))
SOAK_INTERVAL_MS = 500  # a pack every 500 ms instead of every minute: 30 min = 2.5 days of packs


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 900)
async def test_soak(qemu_topology: QemuTopology) -> None:
    """Compressed operation: heap, outbox and gateway memory flat; no sequence gaps."""
    topo = qemu_topology
    topo.n_nodes = 1
    topo.interval_ms = SOAK_INTERVAL_MS
    topo.sample_limit = samples = int(SOAK_S * 1000 / SOAK_INTERVAL_MS)
    await topo.start()
    node = topo.qemu_nodes()[0]
    assert topo.gateway is not None
    rss: list[int] = []

    def progress() -> bool:
        assert topo.gateway is not None and topo.gateway.poll() is None, "gateway died"
        rss.append(_rss_kib(topo.gateway.pid))
        return len(topo.samples(node)) == samples and not topo.outbox(node)

    await topo.wait_for(progress, SOAK_S * 1.5 + 120, f"{samples} packs, all acknowledged")
    await topo.wait_for(lambda: len(topo.upstream.readings) >= sum(topo.sampled(node).values()),
                        60, "all readings upstream")
    total = check_delivery(topo)  # every seq 0..n-1 once, bit-exact, pycose-verified
    assert topo.upstream.duplicates == 0
    assert await topo.device_outbox(node) == []
    board = await heap_stats(node)

    packs = [p for s, p in sorted(topo.packs(node).items()) if s in topo.samples(node)]
    peak = _windows([p["heap_peak"] for p in packs])
    free = _windows([p["heap_free"] for p in packs])
    depth = _windows([p["outbox"] for p in packs])
    cycle = _windows([p["cycle_ms"] for p in packs])
    gw = _windows(rss)
    figures = {
        "samples": samples, "readings": total, "board": board,
        "heap_peak_by_tenth": [max(w) for w in peak],
        "heap_free_min_by_tenth": [min(w) for w in free],
        "outbox_max_by_tenth": [max(w) for w in depth],
        "cycle_ms_median_by_tenth": [sorted(w)[len(w) // 2] for w in cycle],
        "gateway_rss_kib_max_by_tenth": [max(w) for w in gw],
    }
    print("soak figures:", figures)
    # The first tenth is warm-up (imports, first collections, the clock set by the first ACK).
    assert max(peak[-1]) - max(peak[1]) <= 1024, figures  # high-water flat
    assert min(free[-1]) >= min(free[1]) - 1024, figures  # live data not growing
    assert board.high_water < HEAP_LIMIT, figures
    assert max(max(w) for w in depth[5:]) <= max(max(w) for w in depth[1:5]) + 1, figures
    assert max(gw[-1]) <= max(gw[1]) + 4096, figures  # gateway RSS: no growth beyond noise
    # Cycle times are reported, not asserted: each bus transaction is a round trip through the
    # host (UART2 → street process), so they follow the host's load, not only the firmware.
