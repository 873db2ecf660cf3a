#!/usr/bin/env bash
# Build the Lantern QEMU image: MicroPython's qemu port (mps2-an385, Cortex-M3) with the board
# in boards/qemu-mps2-an385 and the node firmware frozen in, from the same MicroPython source
# tree as the unix port (scripts/build-micropython.sh). Out of tree: nothing in that source
# tree is edited. Leaves .build/qemu/firmware.elf; incremental, so re-running is cheap.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TREE="$ROOT/.build/micropython-src"
OUT="$ROOT/.build/qemu"
BOARD_DIR="$ROOT/boards/qemu-mps2-an385"

for tool in arm-none-eabi-gcc qemu-system-arm; do
    command -v "$tool" >/dev/null || {
        echo "build-qemu-image: $tool not found (Debian: gcc-arm-none-eabi, qemu-system-arm)" >&2
        exit 2
    }
done
if [[ ! -d "$TREE/ports/qemu" || ! -x "$TREE/mpy-cross/build/mpy-cross" ]]; then
    echo "build-qemu-image: MicroPython source tree missing at $TREE: run 'make micropython'" >&2
    exit 2
fi

mkdir -p "$OUT"
# one build at a time: test sessions running side by side each ask for the image
exec 9>"$OUT/.lock"
flock 9
make -s -C "$TREE/ports/qemu" -j"$(nproc)" BOARD=LANTERN BOARD_DIR="$BOARD_DIR" \
    BUILD="$OUT/build" FROZEN_MANIFEST="$BOARD_DIR/manifest.py"
cp "$OUT/build/firmware.elf" "$OUT/firmware.elf.tmp"
mv "$OUT/firmware.elf.tmp" "$OUT/firmware.elf"
