# ruff: noqa: F821 - include/module/package are provided by MicroPython's makemanifest.py
# Frozen into the QEMU image as bytecode: asyncio, the board's boot script and the node
# firmware exactly as it runs on the unix port and on ESP32.
include("$(MPY_DIR)/extmod/asyncio")
module("_boot.py", base_path="$(BOARD_DIR)")
package("node", base_path="$(BOARD_DIR)/../../firmware")
module("main.py", base_path="$(BOARD_DIR)/../../firmware")
# the simulated street's wire format: the board's sensor buses speak it over UART2
package("sim", ("__init__.py", "wire.py"), base_path="$(BOARD_DIR)/../../firmware")
