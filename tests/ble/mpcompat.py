"""The MicroPython-only names the firmware uses, added to CPython's modules for the BLE tier.

The firmware's BLE link runs under CPython here only because the virtual radio (bumble) is a
CPython library; these are the few MicroPython APIs it touches beyond the fake `bluetooth`
and `cryptolib` modules in tests/ble/upy. Each is added only where CPython lacks the name, so
nothing CPython code relies on changes. Semantics follow MicroPython's documentation
(ticks wrap at 2**30 on every port; ThreadSafeFlag clears on wake).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

UPY = Path(__file__).resolve().parent / "upy"
FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
_PERIOD = 1 << 30
T = TypeVar("T")


def ticks_ms() -> int:
    return (time.monotonic_ns() // 1_000_000) % _PERIOD


def ticks_add(t: int, delta: int) -> int:
    return (t + delta) % _PERIOD


def ticks_diff(a: int, b: int) -> int:
    return ((a - b + _PERIOD // 2) % _PERIOD) - _PERIOD // 2


async def sleep_ms(ms: int) -> None:
    await asyncio.sleep(ms / 1000)


async def wait_for_ms(aw: Awaitable[T], ms: int) -> T:
    return await asyncio.wait_for(aw, ms / 1000)


class ThreadSafeFlag:
    """MicroPython's flag: set() from an IRQ, one waiter woken, cleared when it wakes."""

    def __init__(self) -> None:
        self._ev = asyncio.Event()

    def set(self) -> None:
        self._ev.set()

    def clear(self) -> None:
        self._ev.clear()

    async def wait(self) -> None:
        await self._ev.wait()
        self._ev.clear()


def _mem_alloc() -> int:
    return 0


def _mem_free() -> int:
    return 100_000


class MicroGC:
    """`gc` as firmware modules see it here: MicroPython's names, and a collect() that does
    not run CPython's full collector (tens of ms with bumble loaded) on every sample."""

    collect = staticmethod(lambda: None)
    mem_alloc = staticmethod(_mem_alloc)
    mem_free = staticmethod(_mem_free)
    enable = staticmethod(gc.enable)
    disable = staticmethod(gc.disable)


_ADDED: list[tuple[Any, str, Any]] = [
    (time, "ticks_ms", ticks_ms), (time, "ticks_add", ticks_add),
    (time, "ticks_diff", ticks_diff), (time, "sleep_ms", lambda ms: time.sleep(ms / 1000)),
    (asyncio, "sleep_ms", sleep_ms), (asyncio, "wait_for_ms", wait_for_ms),
    (asyncio, "ThreadSafeFlag", ThreadSafeFlag),
    (gc, "mem_alloc", _mem_alloc), (gc, "mem_free", _mem_free),
]


def install() -> None:
    """Make `import node...` (firmware) and the fake MicroPython modules importable."""
    for mod, name, value in _ADDED:
        if not hasattr(mod, name):
            setattr(mod, name, value)
    for p in (str(FIRMWARE), str(UPY)):
        if p not in sys.path:
            sys.path.insert(0, p)
