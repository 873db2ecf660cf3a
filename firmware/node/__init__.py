"""The Lantern node firmware (MicroPython): see node/app.py."""


class ConfigError(ValueError):
    """node.json, the board file or the key is wrong: the node says what and stops."""
