"""What an idle gateway keeps resident (issue 22): no update code before a rollout, and the
start's freed memory handed back to the kernel (agent/gateway.py release_memory)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from lantern.agent import gateway


def test_release_memory_trims_the_c_heap_with_glibc() -> None:
    assert platform.libc_ver()[0] == "glibc"  # this machine's C library (Debian)
    assert gateway.release_memory() is True


@pytest.mark.parametrize("libc", ["no_malloc_trim", "no_library"])
def test_release_memory_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch,
                                                  libc: str) -> None:
    def cdll(name: Any) -> SimpleNamespace:
        if libc == "no_library":
            raise OSError("no C library to load")
        return SimpleNamespace()  # musl: no malloc_trim

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert gateway.release_memory() is False


def test_the_gateway_loads_the_update_transfer_only_for_a_rollout() -> None:
    """agent/ota/transfer.py is imported by the first node a rollout sends to, not at start."""
    code = ("import sys, lantern.agent.gateway\n"
            "print('lantern.agent.ota.rollout' in sys.modules,"
            " 'lantern.agent.ota.transfer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["True", "False"]
