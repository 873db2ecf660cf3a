"""OP_CONFIG: versioned settings from the gateway, checked, written into node.json, applied.

Loaded with the command and given back after it (node/commands.py NodeActions.fleet): a
node's configuration changes a few times a year. docs/protocol.md, "Key rotation and
configuration", is the normative description.

Each setting is written where node/start.py and the modules that read it at boot find it, so
a reboot gives the same node; what can change live does at once (the interval, the send
window, the hold's size, offsets and kappa on a board that corrects), the rest at next boot.
"""

import json
import sys

from . import unload
from .outbox import _write_atomic

E_ARG = 2
OFFSET_NAMES = ("temperature", "humidity", "sound")
OFFSET_MAX = 20  # °C, %RH, dB: more is a broken sensor, not a calibration
# name: (low, high, integers only)
LIMITS = {
    "interval_ms": (1000, 86400000, True),
    "kappa": (0, 1.5, False),
    "max_untimed": (0, 4096, True),
    "window": (1, 8, True),
}


def _number(x, whole):
    if isinstance(x, bool) or not isinstance(x, (int, float) if not whole else int):
        return False
    return x - x == 0  # not inf or nan


def check(settings):
    """None if every setting is known and in range, else the error text naming the first."""
    if not isinstance(settings, dict):
        return "settings must be a map {name: value}"
    for name in settings:
        value = settings[name]
        if name == "offsets":
            if not isinstance(value, dict):
                return "offsets: expected a map {name: number}"
            for k in value:
                v = value[k]
                if k not in OFFSET_NAMES:
                    return "offsets.%s: unknown (one of %s)" % (k, ", ".join(OFFSET_NAMES))
                if not _number(v, False) or not -OFFSET_MAX <= v <= OFFSET_MAX:
                    return "offsets.%s: expected a number -%d..%d" % (k, OFFSET_MAX, OFFSET_MAX)
            continue
        lim = LIMITS.get(name) if isinstance(name, str) else None
        if lim is None:
            return "%s: unknown setting" % (name,)
        if not _number(value, lim[2]) or not lim[0] <= value <= lim[1]:
            return "%s: expected %s %s..%s" % (
                name, "an integer" if lim[2] else "a number", lim[0], lim[1])
    return None


def _put(cfg, settings, version):
    """Write the settings into a node.json dict where the boot reads them."""
    for name in settings:
        value = settings[name]
        if name == "offsets":
            offsets = {}
            for k in value:
                if k == "sound":  # both sound levels (node/drivers/corrections.py OFFSETS)
                    offsets["LAeq"] = offsets["LAmax"] = value[k]
                else:
                    offsets[k] = value[k]
            cfg["offsets"] = offsets
        elif name == "kappa":
            corr = cfg.get("corrections") or {}
            corr["kappa"] = value
            cfg["corrections"] = corr
        elif name == "window":
            cfg["link"]["window"] = value
        else:
            cfg[name] = value
    cfg["config_version"] = version


def config_path(node):
    boot = getattr(sys.modules.get("node"), "BOOT", None) or {}
    return getattr(node, "config_path", None) or boot.get("config") or "node.json"


def configure(actions, version, settings):
    """(code, result) of OP_CONFIG for the node behind `actions` (node/commands.py)."""
    n = actions.n
    have = n.cfg.get("config_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        return E_ARG, {"error": "config is {1: version (integer), 2: {settings}}"}
    if version <= have:
        return 0, {1: have}  # this version or a newer one is applied: nothing to do
    err = check(settings)
    if err is not None:
        return E_ARG, {"error": err}
    path = config_path(n)
    with open(path) as f:
        cfg = json.load(f)
    _put(cfg, settings, version)
    ms = settings.get("interval_ms")
    if ms is not None:
        # first: state/interval_ms (and NVS) win over node.json at boot (node/app.py)
        actions.set_interval(ms)
    _write_atomic(path, json.dumps(cfg).encode())  # the commit point
    _put(n.cfg, settings, version)
    _live(n, settings)
    return 0, {1: version}


def _live(n, settings):
    """Apply at once what the running node can take without a reboot."""
    if "window" in settings and n.link is not None and hasattr(n.link, "_window"):
        n.link._window = settings["window"]
    hold = getattr(n, "_untimed", None)
    if "max_untimed" in settings and hold and settings["max_untimed"] > 0:
        hold.limit = settings["max_untimed"]
    fix = getattr(n.sensors, "fix", None)
    if fix is not None and ("offsets" in settings or "kappa" in settings):
        from .drivers import corrections

        new = corrections.setup(n.cfg)
        new["pressure"] = fix["pressure"]
        new["places"] = fix["places"]
        n.sensors.fix = new
        unload("drivers.corrections")
