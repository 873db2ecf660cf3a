# ruff: noqa: F821 - include/module/package are provided by MicroPython's makemanifest.py
# The QEMU board as a stock MicroPython build: asyncio frozen (as in the esp32 port's own
# manifest), the board's boot script, and the simulated street's wire format (the board's
# "hardware": its sensor buses speak it over UART2). No Lantern firmware: it goes onto the
# filesystem as .mpy files, as `lantern provision` deploys it (tests/esp32_twin/deployed.py).
include("$(MPY_DIR)/extmod/asyncio")
module("_boot.py", base_path="$(BOARD_DIR)")
package("sim", ("__init__.py", "wire.py"), base_path="$(BOARD_DIR)/../../firmware")
