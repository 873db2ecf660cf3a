"""Mount the board's flash (littlefs) at /, formatting it the first time, as ESP32 does."""

import gc

import mps2
import vfs

_flash = mps2.Flash()
try:
    vfs.mount(vfs.VfsLfs2(_flash), "/")
except OSError:
    # blank flash (every QEMU start): make a filesystem, as esp32's inisetup does
    vfs.VfsLfs2.mkfs(_flash)
    vfs.mount(vfs.VfsLfs2(_flash), "/")
del _flash
gc.collect()
# Collect after every 16 KB allocated, not only when the heap is full: heap in use is then the
# live data plus under 16 KB of garbage, so its high-water mark (mps2.heap_stats) measures what
# the firmware holds rather than how long ago the last collection happened.
gc.threshold(16384)
