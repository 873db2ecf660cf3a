"""The node as `lantern provision` deploys it: .mpy files on a stock MicroPython, 32-bit.

The board is the QEMU Cortex-M3 (32-bit, as an ESP32's Xtensa or RISC-V core) built without
Lantern frozen in: asyncio frozen as in the esp32 port's own image, nothing else of ours
(tests/esp32_twin/qemu_stock/manifest.py). Its GC heap is the ESP32's: 112 KB (docs/esp32.md,
"Fits as deployed"). Provisioning's own compile step (tools/field/provision.py step_compile:
mpy-cross -O2) makes the .mpy files; mpremote copies them onto the board's littlefs beside
main.py, node.json, board.json and the key, as provisioning's deploy step does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

from hil_tests.harness.qemu import PROMPT, QemuNode, cp_args
from lantern.tools.field import provision
from lantern.tools.street.sim import ROOT

STOCK_IMAGE = ROOT / ".build/qemu-stock/build/firmware.elf"
MANIFEST = Path(__file__).resolve().parent / "qemu_stock" / "manifest.py"
BOARD_DIR = ROOT / "boards/qemu-mps2-an385"


def build_stock_image() -> Path:
    """The stock-like image (incremental: seconds when nothing changed)."""
    subprocess.run(
        ["make", "-s", "-C", str(ROOT / ".build/micropython-src/ports/qemu"), "-j2",
         "BOARD=LANTERN", f"BOARD_DIR={BOARD_DIR}", f"BUILD={STOCK_IMAGE.parent}",
         f"FROZEN_MANIFEST={MANIFEST}"], check=True, capture_output=True, timeout=600)
    return STOCK_IMAGE


def compile_as_provision(stage: Path) -> Path:
    """provision's compile step into `stage`: node/**/*.mpy (-O2) and main.py."""
    plan = SimpleNamespace(firmware="mpy", args=SimpleNamespace(mpy_cross=None), device=None,
                           stage=stage)
    provision.step_compile(plan, dry=False)  # type: ignore[arg-type]
    return stage


class DeployedNode(QemuNode):
    """A QEMU board provisioned with the compiled firmware on its filesystem."""

    image: Path = STOCK_IMAGE

    async def _provision_and_run(self) -> None:
        assert self.console is not None and self.ready is not None
        try:
            await self.console.expect(PROMPT, 30)
            stage = compile_as_provision(self.dir / "stage")
            dev = self.device_dir
            await self.mpremote(*cp_args([dev / "node.json", dev / "node.key",
                                          dev / "board.json", stage / "main.py"]),
                                "+", "fs", "cp", "-r", str(stage / "node"), ":", timeout=180)
            mark = len(self.console.text)
            self.console.type(b"\x04")  # soft reset: _boot.py, then main.py from the flash
            await self.console.expect(rb"lantern node \S+ firmware", 60, since=mark)
            self.ready.set_result(None)
        except Exception as e:  # reported through `ready`
            self.ready.set_exception(e)
