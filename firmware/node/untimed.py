"""Samples and the node's clock (docs/time.md): sealed at once while the time is known, held
unsealed while it is not.

This part stays loaded and is all an ordinary cycle runs. The hold (node/hold.py) is loaded
only while it has work — the clock not known yet, or samples left on flash from before — and
given back once it is empty: on a deployed ESP32 its bytecode would sit in the heap for nothing.
"""

import os

from . import unload

# node._untimed: None (not looked yet this boot), False (the time known and nothing held: every
# sample sealed at once from here on; a clock once set stays set), or the loaded hold


async def take(node, now, values):
    """Seal this sample (its seq), or hold it while the clock is not known (None)."""
    hold = getattr(node, "_untimed", None)
    if hold is None:
        clock = node.clock
        hold = False
        if not (clock.synced or clock.known) or _waiting(node):
            from .hold import Hold

            hold = Hold(node, lambda: _release(node))
        node._untimed = hold
    if hold is False:
        return node.seal(now, values)
    return await hold.take(now, values)


def _waiting(node):
    """Whether samples held in an earlier boot wait on flash."""
    try:
        names = os.listdir(node.cfg["state_dir"] + "/untimed")
    except OSError:
        return False
    for name in names:
        if name.isdigit():
            return True
    return False


def _release(node):
    """The hold is empty and the clock known: its code and state are given back."""
    node.clock.on_set = None  # (the hold's)
    if node.link is not None:
        node.link.on_late = None
    node._untimed = False
    unload("hold")


def held(node):
    """Samples the hold keeps unsealed (node STATUS "held"); 0 when it is not loaded."""
    hold = getattr(node, "_untimed", None)
    return len(hold) if hold else 0
