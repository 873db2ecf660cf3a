"""The node's boot: its key, its counters' binding, its config, its sensors.

Run once per boot by node/app.py, then unloaded (app.py drops it from sys.modules): on an
ESP32 the node's modules are bytecode in RAM, and none of this is needed again while the node
samples and sends. `lantern provision` and the tests import it as any module.
"""

import gc
import hashlib
import json
import os
import sys

from . import ConfigError
from .outbox import _write_atomic


def load_key(path):
    """The 256-bit node key from a hex file; refuses a file other users can read.

    littlefs and FAT keep no permission bits (os.stat gives 0o100000): there the check cannot
    be made, and the node says so instead of passing it (docs/security.md).
    """
    try:
        mode = os.stat(path)[0]
    except OSError:
        raise ConfigError("key file %s: not found" % path)
    if not mode & 0o777:
        print("warning: key file %s: this filesystem keeps no permission bits, so nothing "
              "here stops whoever reads the board's flash or its REPL (docs/security.md)" % path)
    elif mode & 0o077:
        raise ConfigError(
            "key file %s: mode %o lets other users read it; chmod 600 it" % (path, mode & 0o777))
    with open(path) as f:
        text = f.read().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError("key file %s: expected 64 hex digits (a 256-bit key)" % path)
    global _key_file
    _key_file = (key_id(key), path)
    return key


# The last key load_key read: (key id, path). bind_state keeps that key's use beside it.
_key_file = None


def _file_key_use(kid):
    """(key_used, mark_key_used) for a key kept as a file (unix and qemu boards), or None.

    `<key file>.used` names the key that has run: it sits outside state_dir, so deleting the
    state directory does not make the key look unused, and it goes with a reformat that also
    takes the key. The ESP32 HAL keeps the same fact in NVS (hal/esp32.py key_used).
    """
    if _key_file is None or _key_file[0] != kid:
        return None
    marker = _key_file[1] + ".used"

    def used(k):
        try:
            with open(marker) as f:
                return f.read().strip() == k
        except OSError:
            return False

    def mark(k):
        if not used(k):
            try:
                _write_atomic(marker, k.encode())
            except OSError as e:
                print("warning: cannot record key %s in use at %s: %r" % (k, marker, e))

    return used, mark


def node_key(cfg, hal):
    """The node key from where node.json says: the HAL's key store (ESP32 NVS) or a file."""
    if cfg.get("key_store") == "nvs":
        if not hasattr(hal, "load_key"):
            raise ConfigError("key_store nvs: board %s has no NVS" % cfg["board"])
        try:
            return hal.load_key()
        except ValueError as e:
            raise ConfigError(str(e))
    return load_key(cfg["key_file"])


def keys(node, cfg, hal):
    """node.key and its rotation state: version, previous key, first sequence under it.

    A key rotated over the air (node/rekey.py) is the key store's key, its version in the
    rotation record beside it; a commit a power cut interrupted is finished here.
    """
    global _key_file
    key = node_key(cfg, hal)
    node.key, node.key_version, node.key_prev, node.key_first = key, 0, None, None
    try:
        os.stat(cfg["state_dir"] + "/key.rk")  # node/rekey.py RECORD
    except OSError:
        return  # never rotated: its code is not even loaded
    from . import unload
    from .rekey import boot

    node.key, node.key_version, node.key_prev, node.key_first = boot(cfg, hal, key)
    unload("rekey")
    if node.key != key and _key_file is not None:  # rolled forward: the file holds it now
        _key_file = (key_id(node.key), _key_file[1])


def key_id(key):
    """A key's public name (16 hex digits; tools/field/provision_steps.py key_id gives the same)."""
    return hashlib.sha256(b"lantern key id v1" + key).digest()[:8].hex()


def bind_state(state_dir, key, hal):
    """Tie the counters in state_dir to the key: none of them may start again under it.

    The frame sequence, the command floor and the BTHome counter live in state_dir; a wiped or
    reformatted filesystem restarts them. `state_dir/key_id` names the key they count for, and
    `lantern provision` reuses a key only where the node shows that file (docs/security.md).
    Where the key outlives state_dir (ESP32: NVS; a key file beside a deleted state directory),
    the HAL or a marker beside the key file remembers which key has been in use: that key
    with counters gone is refused rather than used again from zero.
    Call it once the outbox has made state_dir. Returns the key id.
    """
    kid = key_id(key)
    path = state_dir + "/key_id"
    try:
        with open(path) as f:
            held = f.read().strip()
    except OSError:
        held = None
    used = getattr(hal, "key_used", None)
    mark = getattr(hal, "mark_key_used", None)
    if used is None:
        use = _file_key_use(kid)
        if use is not None:
            used, mark = use
    if held != kid:
        if held is None and used is not None and used(kid):
            raise ConfigError(
                "node key %s was in use on this board, but %s has lost its counters (deleted, "
                "or the filesystem reformatted): under this key old ACKs, commands and BTHome "
                "adverts would be valid again. Re-provision the node: `lantern provision node` "
                "issues a new key" % (kid, state_dir))
        # counters of another key (a key replaced with --new-key) only ever go on: keep them
        _write_atomic(path, kid.encode())
    if mark is not None:
        mark(kid)
    return kid


def load_config(path):
    with open(path) as f:
        cfg = json.load(f)
    for k in ("id", "board", "state_dir", "link"):
        if k not in cfg:
            raise ConfigError("%s: missing key '%s'" % (path, k))
    if cfg.get("key_store") != "nvs" and "key_file" not in cfg:
        raise ConfigError("%s: missing key 'key_file' (or key_store: nvs)" % path)
    return cfg


def boot_record(hal):
    """Why this boot happened, as the HAL tells: reset and wake cause, resets counted in NVS."""
    rec = {"reset": None, "wake": None, "counts": None}
    if hasattr(hal, "reset_cause"):
        rec["reset"] = hal.reset_cause()
        rec["wake"] = hal.wake_cause()
        if rec["reset"] != "deep_sleep":  # wake-ups are counted in RTC memory (rtc_counters)
            try:
                rec["counts"] = hal.count_reset(rec["reset"])
            except OSError as e:  # NVS full or worn: the boot goes on
                print("reset counters: %r" % (e,))
        print("boot: reset %s, wake %s" % (rec["reset"], rec["wake"]))
    return rec


def open_sensors(hal, board, cfg):
    """The board's sensors behind the sampler (node/sampler.py), on the buses the HAL gives.

    A HAL without sensor_buses() still hands over its own list of sensor objects.
    """
    if not hasattr(hal, "sensor_buses"):
        return hal.sensors(board, cfg["id"])
    from . import board as boards

    for w in boards.validate(board, cfg["board"]):
        print("warning:", w)
    # validation is needed once: give its code back before the drivers load
    del boards
    sys.modules.pop("node.board", None)
    delattr(sys.modules["node"], "board")
    gc.collect()
    from .sampler import Sampler

    buses, time_scale = hal.sensor_buses(board, cfg)
    sampler = Sampler(board, buses, time_scale, cfg=cfg)
    if cfg.get("deep_sleep") and hasattr(hal, "rtc_counters"):
        # each wake-up is a fresh boot: the cycle count (which sensors are due, node
        # cadence_ms) goes on from the wake-ups RTC memory counted
        sampler.cycle = hal.rtc_counters()[0]
    return sampler


def setup(node, cfg, hal, board):
    """The boot half of Node.__init__: key, outbox, counters, boot record, watchdog, sensors."""
    from .clock import Clock
    from .outbox import Outbox

    keys(node, cfg, hal)
    node.outbox = Outbox(cfg["state_dir"], cfg.get("max_frames", 1000))
    node.key_id = bind_state(cfg["state_dir"], node.key, hal)
    node.clock = Clock(hal)
    node.boot = boot_record(hal)
    if node.boot["reset"] == "watchdog":  # a task hung last time: the technician sees it
        node.fault("watchdog_reset", "the watchdog reset the node")
    # armed before the sensors: a bus that hangs while they are probed resets the node too
    wdt_ms = cfg.get("watchdog_ms", 30000)
    node.wdt = hal.watchdog(wdt_ms) if wdt_ms and hasattr(hal, "watchdog") else None
    node.wdt_ms = wdt_ms
    node.sensors = open_sensors(hal, board, cfg)


def prepare(config_path):
    """(cfg, hal, board, locked) for node/app.py main: the config, its board and HAL."""
    cfg = load_config(config_path)
    with open(cfg["board"]) as f:
        board = json.load(f)
    if board["hal"] == "unix":
        from .hal import unix as hal
    elif board["hal"] == "qemu":
        from .hal import qemu as hal
    elif board["hal"] == "esp32":
        from .hal import esp32 as hal
    else:
        raise ConfigError("board %s: unknown hal '%s'" % (cfg["board"], board["hal"]))
    return cfg, hal, board, lock_repl(cfg, hal, board)


def lock_repl(cfg, hal, board):
    """node.json lock_repl: Ctrl-C at the board's REPL no longer stops the node.

    It narrows, not closes, the way in: Ctrl-C works again for the moment between a reset and
    this call (docs/security.md says what closes it).
    """
    if not cfg.get("lock_repl"):
        return False
    if not hasattr(hal, "lock_repl"):
        print("warning: lock_repl: board %s has no REPL lock; ignored" % board.get("name"))
        return False
    hal.lock_repl()
    print("REPL locked: Ctrl-C no longer stops the node")
    return True
