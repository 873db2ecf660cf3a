"""The Lantern node firmware (MicroPython): see node/app.py."""


class ConfigError(ValueError):
    """node.json, the board file or the key is wrong: the node says what and stops."""


def unload(*names):
    """Give modules' bytecode back to the heap: node.<name> leaves sys.modules and its package
    (names relative to this package, e.g. "start", "drivers.corrections")."""
    import gc
    import sys

    for name in names:
        full = "node." + name
        sys.modules.pop(full, None)
        parent, _, leaf = full.rpartition(".")
        pkg = sys.modules.get(parent)
        if pkg is not None and leaf in getattr(pkg, "__dict__", ()):
            delattr(pkg, leaf)
    gc.collect()
