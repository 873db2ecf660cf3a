"""Fits as deployed: the node as `lantern provision` puts it on a stock MicroPython (.mpy files
on the filesystem, bytecode in RAM), on a 32-bit board with an ESP32's heap, BLE loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hil_tests.harness.qemu import QemuTopology, heap_stats, missing_tools

from .deployed import DeployedNode, build_stock_image

pytestmark = pytest.mark.qemu

ESP32_HEAP = 112_000  # the GC pool of a 114,688-byte heap: 2 x the esp32 port's 56 KB start
MARGIN = 8 * 1024  # free at the peak of a cycle with BLE loaded, at least
SAMPLES = 8
BLE_DELTA = Path(__file__).parent / "qemu_stock" / "ble_delta.py"


async def test_the_deployed_node_fits_an_esp32_heap_with_ble(tmp_path: Path) -> None:
    assert not missing_tools(), f"{missing_tools()} missing: `make qemu-image` installs them"
    build_stock_image()
    topo = QemuTopology(tmp_path, n_nodes=1, interval_ms=2000, node_class=DeployedNode)
    try:
        await topo.start()
        node = topo.qemu_nodes()[0]
        await topo.wait_for(lambda: len(topo.sampled(node)) >= SAMPLES
                            and not topo.outbox(node), 120, f"{SAMPLES} samples acknowledged")
        assert topo.upstream.duplicates == 0
        fw = await node.mpremote("resume", "exec", "import node.app as a; print('FW', a.__file__)")
        assert "FW node/app.mpy" in fw, fw  # bytecode from the filesystem, nothing frozen
        stats = await heap_stats(node)
        assert stats.size == ESP32_HEAP
        out = await node.mpremote("resume", "run", str(BLE_DELTA))
    finally:
        await topo.stop()
    m = re.search(r"BLEDELTA (\d+) (\d+) (\d+) (\d+)", out)
    assert m, out
    _radio, ble_code, ble_link, _ = (int(g) for g in m.groups())
    free_uart = stats.size - stats.high_water
    free_ble = free_uart - ble_code - ble_link
    print(f"deployed: heap {stats.size}, high water {stats.high_water} (live peak "
          f"{stats.live_peak}), free at peak {free_uart}; BLE code {ble_code} + link {ble_link}"
          f" -> free at peak with BLE {free_ble}")
    assert free_ble >= MARGIN, (free_uart, ble_code, ble_link)
