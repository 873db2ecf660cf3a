# Lantern's QEMU board: the stock MPS2_AN385 (Cortex-M3) plus ticks, select/asyncio, a
# littlefs RAM disk, Ctrl-C, autorun, ESP32-sized heap and the node firmware frozen in.
# Built out of tree: make -C <src>/ports/qemu BOARD=LANTERN BOARD_DIR=<this dir> ...
include boards/MPS2_AN385/mpconfigboard.mk

# ESP32 without PSRAM: ~110 KB free once MicroPython is up
MICROPY_HEAP_SIZE = 114688
MICROPY_VFS_LFS2 = 1

# mpconfigport.h hard-codes time/select/asyncio off; this header includes it and overrides
CFLAGS += -I$(BOARD_DIR) -DMP_CONFIGFILE='"mpconfigboard.h"'

SRC_C += $(BOARD_DIR)/board.c $(BOARD_DIR)/modmps2.c shared/timeutils/timeutils.c
LDSCRIPT = $(BOARD_DIR)/lantern.ld

# Board code runs _boot.py/main.py after mp_init, owns stdin (interrupt-driven, for Ctrl-C)
# and watches every collection for the heap high-water mark.
LDFLAGS += -Wl,--wrap=mp_init -Wl,--wrap=mp_hal_stdin_rx_chr -Wl,--wrap=gc_collect

FROZEN_MANIFEST = $(BOARD_DIR)/manifest.py
