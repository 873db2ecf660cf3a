"""Entry point and boot loader: `micropython main.py node.json` (unix port); main.py on a board.

Signed updates (docs/updates.md) run from code slots: FW/a and FW/b, FW being node.json's
fw_dir, else STATE_DIR/fw. The boot record FW/boot.json (replaced atomically, by node/ota.py
and here) names the active slot and a candidate on trial. The chosen slot goes first on
sys.path before `node` is imported; without one, the provisioned firmware runs. A candidate
has update_trial_boots boots (default 3) to confirm itself; one that raises is left at once.
An update never replaces this file: the loader that rolls back changes only by provisioning.
"""

import gc
import json
import os
import sys

REBOOT_EXIT = 75  # the unix board's reset (node/commands.py): its supervisor starts it again


def _read(fw):
    try:
        with open(fw + "/boot.json") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _save(fw, rec):
    tmp = fw + "/boot.json.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(rec))
    os.rename(tmp, fw + "/boot.json")


def _complete(fw, slot):
    """A slot node/ota.py finished staging and checking (it writes .done last)."""
    try:
        os.stat(fw + "/" + slot + "/.done")
        return True
    except OSError:
        return False


def _leave(fw, rec, reason):
    """The candidate failed: record why; the previous slot runs from now on, and the previous
    app image if the candidate brought one (hal/esp32.py image_rollback: it sets that image
    to boot, has the record written by this function, then resets)."""
    if rec.get("cimg"):
        try:
            _image_hal().image_rollback(fw, rec, reason, _leave)
        except Exception as e:  # noqa: BLE001 - the record stays: left at the next boot
            print("boot: %r" % (e,))
        return
    print("update: release %s rolled back: %s" % (rec.get("cver"), reason))
    rec.update({"cand": None, "tries": 0, "state": "rolled_back", "reason": reason})
    _save(fw, rec)


def _image_hal():
    """hal/esp32.py, for a record that names an app image (docs/updates.md); the node
    package it loads is unloaded again: the slot chosen next imports its own."""
    from node.hal import esp32

    _unload()
    return esp32


def choose(config):
    """(fw dir, boot record, slot to run or None for the provisioned firmware, on trial)."""
    try:
        with open(config) as f:
            cfg = json.load(f)
        fw = cfg.get("fw_dir") or cfg["state_dir"] + "/fw"
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}, None, False  # node/app.py tells what is wrong with node.json
    rec = _read(fw)
    cand = rec.get("cand")
    if cand:
        tries = rec.get("tries") or 0
        if rec.get("cimg") and not _image_hal().image_trial(fw, rec, _save, _leave):
            pass  # the old image runs (the bootloader went back): left, the old slot runs
        elif tries >= cfg.get("update_trial_boots", 3):
            _leave(fw, rec, "trial_boots: %d boots without a pack ACKed" % tries)
        elif not _complete(fw, cand):
            _leave(fw, rec, "slot %s incomplete" % cand)
        else:
            rec["tries"] = tries + 1
            _save(fw, rec)  # counted before it runs: a candidate that hangs or resets uses it up
            return fw, rec, cand, True
    if rec.get("cprev") and rec.get("state") == "rolled_back":
        _image_hal().image_kept(fw, rec, _save)  # the old image, set to boot again, stays
    slot = rec.get("active")
    if slot and not _complete(fw, slot):
        print("boot: slot %s incomplete; running the provisioned firmware" % slot)
        slot = None
    return fw, rec, slot, False


def _unload():
    for name in list(sys.modules):
        if name == "node" or name.startswith("node."):
            del sys.modules[name]


def _reset():
    for name in ("node.hal.esp32", "node.hal.qemu"):
        hal = sys.modules.get(name)
        if hal is not None and hasattr(hal, "reset"):
            hal.reset()
    raise SystemExit(REBOOT_EXIT)


def run(config):
    try:
        fw, rec, slot, trial = choose(config)
    except Exception as e:  # noqa: BLE001 - a flash that fails here must not stop the boot
        print("boot: %r; running the provisioned firmware" % (e,))
        fw, rec, slot, trial = None, {}, None, False
    if slot:
        sys.path.insert(0, fw + "/" + slot)
    try:
        from node import app
    except Exception as e:  # noqa: BLE001 - a candidate that cannot even load is left now
        if not trial:
            raise
        _unload()  # the candidate's modules: main.py leaves it with the provisioned HAL
        sys.path.pop(0)
        _leave(fw, rec, "boot_exception: %r" % (e,))
        slot, trial = rec.get("active"), False
        if slot and _complete(fw, slot):
            sys.path.insert(0, fw + "/" + slot)
        else:
            slot = None
        from node import app
    ver = rec.get("cver") if trial else rec.get("ver") if slot else None
    sys.modules["node"].BOOT = {"fw": fw, "slot": slot, "trial": trial, "rec": rec,
                                "config": config}
    if ver:
        app.FIRMWARE_VERSION = ver  # the signed release's version, whatever its code says
    try:
        app.main(config)
    except Exception as e:  # noqa: BLE001
        if not trial or _read(fw).get("cand") != slot:
            raise
        _leave(fw, _read(fw), "boot_exception: %r" % (e,))
        _reset()


def boot(config):
    """run(config); on a board whose resets main.py does, again after each one, with the
    node's modules unloaded and sys.path as it was: a reset that keeps the flash."""
    base = len(sys.path)
    while True:
        try:
            return run(config)
        except SystemExit as e:
            # a board whose HAL has main.py do its resets (hal/qemu.py WARM_RESET)
            if e.args[:1] != (REBOOT_EXIT,) or not getattr(
                    sys.modules.get("node.hal.qemu"), "WARM_RESET", False):
                raise
        while len(sys.path) > base:
            sys.path.pop(0)
        _unload()
        # the old node's tasks are still queued (asyncio.run leaves them when SystemExit goes
        # through it): a new loop drops them, or two nodes would run in one heap; and the
        # task SystemExit left, asyncio's cur_task, holds the old node's frames
        import asyncio

        asyncio.new_event_loop()
        core = sys.modules.get("asyncio.core")
        if core is not None:
            core.cur_task = None
        gc.collect()
        print("boot: reset (warm: the flash is kept), heap free %d" % gc.mem_free())


boot(sys.argv[1] if len(sys.argv) > 1 else "node.json")
