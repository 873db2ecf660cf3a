"""Signed updates received over the COMMAND channel: staging, switch, trial and confirmation.

docs/updates.md describes the whole path, docs/protocol.md "Update transfer" the ops. The
files of an offered bundle are staged straight into the code slot that is not running
(fw_dir/a or fw_dir/b): each file is appended to `PATH.part` chunk by chunk, read back and
checked against the signed manifest once complete, and only then renamed to its own name. So
what is staged survives a power cut: the files under their own names are checked, and the one
`.part` file is where a resumed transfer goes on. RAM holds one chunk, never the bundle.

The boot record (fw_dir/boot.json, replaced atomically) names the running slot and the
candidate on trial; main.py reads it before `node` is imported. This module is loaded only
when an update op arrives or a candidate is on trial (node/app.py keeps its heap small).
"""

import gc
import json
import os
import sys
import time

from . import unload
from .outbox import _makedirs, _spare_blocks, _write_atomic

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


CHUNK_MAX = const(768)  # file bytes per CHUNK: a COMMAND carrying them fits one 1024-byte frame
RESERVE_BLOCKS = const(64)  # flash blocks kept for the outbox beside its own FREE_BLOCKS
SLOTS = ("a", "b")
_OFFER = "/.offer"  # the offered head (8 + N bytes) in a slot being staged: what it is for
_DONE = "/.done"  # written once every file is staged and checked (a complete slot)
_IMG = "/.img"  # an app image's progress in the slot (hal/esp32.py Image.resume)


def boot_info():
    """What main.py handed over: {"fw", "slot", "trial", "config", "rec"}; {} without it."""
    return getattr(sys.modules.get("node"), "BOOT", None) or {}


def fw_dir(cfg):
    return cfg.get("fw_dir") or cfg["state_dir"] + "/fw"


def read_record(fw):
    try:
        with open(fw + "/boot.json") as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def write_record(fw, rec):
    _write_atomic(fw + "/boot.json", json.dumps(rec).encode())
    info = boot_info()
    if info:
        info["rec"] = rec


_NVS_FLOOR = "ota_floor"  # NVS keys (ESP32): they outlive an erased or reflashed filesystem
_NVS_KEY = "rel_key"
_NVS_NEXT = "rel_next"
# rel_next holds the next key, then the kids (8 bytes each) of the last 8 next keys a later
# rotation superseded: one value, written at once (docs/updates.md "Rotating the release key")
_RETIRED = const(64)


def read_floor(fw, hal=None):
    """The security floor this node holds: raised only when a release confirms itself. On a
    board with NVS the higher of NVS and the file counts, so erasing the filesystem (or
    writing a lower file) cannot lower it."""
    try:
        with open(fw + "/floor") as f:
            floor = int(f.read())
    except (OSError, ValueError):
        floor = 0
    nvs_get = getattr(hal, "nvs_get", None)
    if nvs_get is not None:
        floor = max(floor, nvs_get(_NVS_FLOOR, 0))
    return floor


def _rmtree(path):
    try:
        names = [e[0] for e in os.ilistdir(path)] if hasattr(os, "ilistdir") else os.listdir(path)
    except OSError:
        return
    for name in names:
        p = path + "/" + name
        try:
            os.remove(p)
        except OSError:
            _rmtree(p)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _unload_crypto():
    """Give back Ed25519 and SHA-512 (about 10 KB of bytecode): only an OFFER needs them."""
    unload("ed25519", "sha512")


def _write_head(path, head):
    """The head's pieces as one file, in place at once: a .tmp file left by a failed write
    is in the slot, which the next offer of another head wipes."""
    tmp = path + ".tmp"
    _write_atomic(tmp, head.parts[0])
    with open(tmp, "ab") as f:
        for part in head.parts[1:]:
            f.write(part)
    os.rename(tmp, path)


def _same(path, head):
    """Whether the file at path holds exactly the head's pieces."""
    if _size(path) != len(head):
        return False
    with open(path, "rb") as f:
        for part in head.parts:
            if f.read(len(part)) != part:
                return False
    return True


def _put_file(path, value):
    """value into path atomically; None removes it."""
    if value is not None:
        _write_atomic(path, value)
        return
    try:
        os.remove(path)
    except OSError:
        pass


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


class Updater:
    """The node's side of OFFER / CHUNK / APPLY / ABORT (node/commands.py dispatches here)."""

    def __init__(self, cfg, board_name, config_path="node.json", hal=None):
        self.cfg = cfg
        self.hal = hal
        # The release key, a rotation's next key and the superseded next keys live in a
        # store the provisioning leaves alone: NVS on ESP32, else files in fw_dir
        # (docs/updates.md "Rotating the release key"); release.pub(.next) mirror it
        self._nvs = hasattr(hal, "nvs_blob")
        self.board = board_name
        self.fw = fw_dir(cfg)
        _makedirs(self.fw)
        d = config_path.rsplit("/", 1)[0] + "/" if "/" in config_path else ""
        self.key_path = cfg.get("release_key") or d + "release.pub"
        self.man = None  # the Manifest of the accepted offer
        self.slot = None  # the directory being staged
        self.have = 0  # file-area bytes staged and consistent
        self.total = 0
        self._i = 0  # index of the file the next byte belongs to
        self._start = 0  # where that file starts in the file area
        self._head = None  # the head of an OFFER (update.Pieces), piece by piece
        self._got = 0
        self._need = 0
        self._verifier = None
        self.refused = {}  # reason -> count (the Verifier's own reasons included)
        self.version = None
        self._old = b""  # kids of superseded next keys (_keys)
        self._img = None  # the HAL's Image (the next OTA partition) of an image entry

    # --- refusals ---

    def _refuse(self, reason, detail):
        from .update import Refused

        self.refused[reason] = self.refused.get(reason, 0) + 1
        print("update refused: %s (%s)" % (reason, detail))
        return Refused(reason, detail)

    def _target(self):
        active = boot_info().get("slot")
        if active is None:
            active = read_record(self.fw).get("active")
        return self.fw + "/" + (SLOTS[1] if active == SLOTS[0] else SLOTS[0])

    def _read_key(self, path, size=32):
        try:
            with open(path, "rb") as f:
                return f.read(size + 1)
        except OSError:
            return None

    def _get(self, name, size=32):
        if self._nvs:
            return self.hal.nvs_blob(name, size)
        return self._read_key(self.fw + "/" + name, size)

    def _put(self, name, value):
        if self._nvs:
            self.hal.nvs_set_blob(name, value)
        else:
            _put_file(self.fw + "/" + name, value)

    def _keys(self):
        """(release key, next key or None). The store wins: a key provisioned in release.pub
        is copied into it at its first use, after which neither an erased filesystem (NVS)
        nor a re-provisioning that rewrites release.pub (fw_dir) swaps the key back."""
        key = self._get(_NVS_KEY)
        if not key:
            key = self._read_key(self.key_path)
            if key is not None and len(key) == 32:
                self._put(_NVS_KEY, key)
        nxt = self._get(_NVS_NEXT, 32 + _RETIRED) or b""
        self._old = nxt[32:]
        return key, nxt[:32] or None

    def _store_keys(self, key, nxt):
        """The release key and the next key (None: none pending), the store first;
        release.pub and release.pub.next mirror them."""
        # the key before the next key: a cut between leaves both the same key
        if key is not None:
            self._put(_NVS_KEY, key)
        self._put(_NVS_NEXT, nxt)
        if key is not None:
            _write_atomic(self.key_path, key)
        _put_file(self.key_path + ".next", nxt and nxt[:32])

    def _check(self):
        """The Verifier for this node: release key (and a rotation's pending next key),
        board, floor; Refused without a key."""
        from . import update

        key, nxt = self._keys()
        if key is None:
            raise self._refuse("no_release_key", "%s not provisioned" % self.key_path)
        if len(key) != 32:
            raise self._refuse("no_release_key", "%s: %d bytes, not 32" % (self.key_path, len(key)))
        if nxt is not None and len(nxt) != 32:
            nxt = None  # a torn write cannot happen (_write_atomic); a hand-made file can
        floor = read_floor(self.fw, self.hal)
        v = self._verifier
        if v is None or v.key != key or v.next != nxt:
            try:
                v = update.Verifier(key, self.board, floor, next_key=nxt)
            except ValueError as e:
                raise self._refuse("no_release_key", str(e))
            self._verifier = v
        v.floor = floor
        return v

    def rotate(self, record):
        """Take a key-rotation record: its new key is kept beside the current one until a
        bundle signed by it verifies (then it replaces the current key). Returns its kid."""
        gc.collect()
        v = self._check()
        try:
            new = v.rotation(record)
        except ValueError:
            self._count(v)
            raise
        finally:
            _unload_crypto()
        from .update import _hex, key_id

        kid = key_id(new)
        old = self._old
        for i in range(0, len(old), 8):
            if old[i:i + 8] == kid:
                raise self._refuse("bad_rotation", "key %s superseded" % _hex(kid))
        if v.next is not None and v.next != new:
            old = (old + v.next_kid)[-_RETIRED:]  # its record, replayed, must not bring it back
        self._store_keys(None, new + old)
        self._verifier = None
        print("update: release key %s accepted as the next key" % _hex(kid))
        return kid

    def _promote(self, v):
        """A bundle signed by the pending next key verified: it is the release key now."""
        from .update import _hex

        self._store_keys(v.next, None)
        print("update: release key %s replaces %s" % (_hex(v.next_kid), _hex(v.kid)))
        self._verifier = None

    # --- OFFER ---

    def offer(self, piece, at=0):
        """Take a bundle's head (8 + N bytes), whole or in pieces at increasing offsets (the
        first holds at least 8 bytes): (have, total) once it is complete and verified, else
        (None, head bytes received so far)."""
        if at == 0:
            self.man = None  # a new offer replaces the old one (the staged files stay)
            self._head = None
            self._got = 0
            if len(piece) < 8:
                raise self._refuse("truncated", "an OFFER's first piece holds the 8-byte head")
            from .update import Pieces, Refused, envelope_len

            try:
                n = envelope_len(piece)  # a wrong N is refused before its bytes are awaited
            except Refused as e:
                raise self._refuse(e.reason, e.detail) from None

            # the pieces as they came (no buffer of 8 + N bytes: a heap fragmented by
            # sampling may have no free block that large)
            self._head = Pieces()
            self._need = 8 + n
        elif self._head is None or at != self._got or not piece:
            return None, self._got  # (an empty piece changes nothing and holds nothing)
        head = self._head
        if self._got + len(piece) > self._need:
            self._head = None
            raise self._refuse("bad_envelope", "head longer than the %d bytes its N gives"
                               % self._need)
        head.append(piece)
        self._got += len(piece)
        if self._got < self._need:
            return None, self._got
        self._head = None
        return self._accept(head)

    def _count(self, v):
        """Fold the Verifier's refusal counts into ours (one table for STATUS)."""
        for r, n in v.refused.items():
            if n:
                self.refused[r] = self.refused.get(r, 0) + n
                v.refused[r] = 0

    def _accept(self, head):
        rec = read_record(self.fw)
        if rec.get("cand"):
            raise self._refuse("busy", "release %s is on trial" % rec.get("cver"))
        gc.collect()  # Ed25519 and SHA-512 load now, into the heap as tidy as it gets
        v = self._check()
        from . import ed25519  # noqa: F401 - loaded before the figure below, every time

        gc.collect()
        print("update: checking an offer, heap free %d" % gc.mem_free())
        try:
            man = v.manifest(head)
        except ValueError:
            self._count(v)
            raise
        finally:
            _unload_crypto()
        if v.next is not None and v.signer == v.next_kid:
            self._promote(v)
        # an app image goes to the next OTA partition (hal/esp32.py; ESP32 boards only)
        self._img = self.hal.Image() if man.image >= 0 else None
        slot = self._target()
        same = _same(slot + _OFFER, head)
        if not same:
            _rmtree(slot)  # another bundle's files, or a slot that ran before: not needed
            self._space(man, slot)
            _makedirs(slot)
            _write_head(slot + _OFFER, head)
        self.man, self.slot, self.version = man, slot, man.version
        self.total = man.size - man.data_start
        self._resume()
        return self.have, self.total

    def _space(self, man, slot):
        spare, block = _spare_blocks(self.fw)
        reserve = self.cfg.get("update_reserve_blocks", RESERVE_BLOCKS)
        # each file its blocks and one for its metadata, the directories a few more
        need = 4
        for i in range(man.count):
            size = man.file(i)[1]
            if i == man.image:  # into the app partition, not the filesystem
                if size > self._img.size:
                    raise self._refuse("space", "image of %d bytes > partition" % size)
                continue
            need += (size + block - 1) // block + 1
        if need > spare - reserve:
            raise self._refuse("space", "%d blocks of %d bytes needed, %d free beside the "
                               "outbox's %d" % (need, block, max(spare - reserve, 0), reserve))

    def _resume(self):
        """Find where staging stopped: checked files under their names, then one .part."""
        start = 0
        for i in range(self.man.count):
            path, size, _ = self.man.file(i)
            p = self.slot + "/" + path
            if i == self.man.image:
                got = self._img.resume(self.slot + _IMG, size)
                if got == size and (self._img.ok or not size):
                    start += size
                    continue
                self._i, self._start, self.have = i, start, start + got
                return
            if size == 0 and _size(p) != 0:
                self._empty(i, p)  # no CHUNK ever carries an empty file: staged here
            if _size(p) == size:
                start += size
                continue
            got = _size(p + ".part")
            if got > size:
                os.remove(p + ".part")
                got = 0
            self._i, self._start, self.have = i, start, start + max(got, 0)
            return
        self._i, self._start, self.have = self.man.count, start, start

    def _empty(self, i, p):
        """Stage file i, an empty one, once its signed digest says it is empty."""
        v = self._verifier
        try:
            v.check_file(self.man, i, b"")
        except ValueError as e:
            self._count(v)
            raise self._refuse("file", str(e))
        _makedirs(p.rsplit("/", 1)[0])
        _write_atomic(p, b"")

    # --- CHUNK ---

    def chunk(self, offset, data):
        """Append data at offset if it is where staging stands; the resulting `have`."""
        if self.man is None:
            raise self._refuse("no_offer", "no OFFER accepted since boot")
        if offset != self.have or not data:
            return self.have
        mv = memoryview(data)
        while len(mv):
            if self._i >= self.man.count:
                raise self._refuse("bad_size", "%d bytes past the last file" % len(mv))
            path, size, digest = self.man.file(self._i)
            p = self.slot + "/" + path
            n = min(len(mv), self._start + size - self.have)
            img = self._i == self.man.image  # into the partition, checked as it is written
            try:
                if img:
                    self._img.put(self.have - self._start, mv[:n], size, digest)
                else:
                    if self.have == self._start:
                        _makedirs(p.rsplit("/", 1)[0])
                    with open(p + ".part", "ab") as f:
                        f.write(mv[:n])
            except (OSError, ValueError) as e:
                self._resume()  # what reached flash (and hashes right) counts, and no more
                raise self._refuse("file" if "bad_hash" in str(e) else "space",
                                   "%s: %s" % (path, e))
            self.have += n
            mv = mv[n:]
            if self.have == self._start + size:
                if img:
                    self._start = self.have
                    self._i += 1
                else:
                    self._finish(p)
        return self.have

    def _finish(self, p):
        """A file is complete: check what is on flash, then give it its name."""
        v = self._verifier
        try:
            with open(p + ".part", "rb") as f:
                v.check_part(self.man, self._i, f)
        except ValueError as e:
            self._count(v)
            os.remove(p + ".part")
            self.have = self._start
            raise self._refuse("file", str(e))
        os.rename(p + ".part", p)
        self._start = self.have
        self._i += 1

    # --- APPLY, ABORT ---

    def apply(self):
        """Record the staged release as the candidate (atomically); the node then reboots."""
        if self.man is not None:
            self._resume()  # every file under its own name, empty ones too
        if self.man is None or self.have != self.total or self._i != self.man.count:
            raise self._refuse("incomplete", "%d of %d bytes staged" % (self.have, self.total))
        rec = read_record(self.fw)
        if rec.get("cand"):
            raise self._refuse("busy", "release %s is on trial" % rec.get("cver"))
        _write_atomic(self.slot + _DONE, self.version.encode())
        rec["cand"] = self.slot.rsplit("/", 1)[1]
        rec["cver"] = self.version
        rec["cfloor"] = self.man.floor
        rec["tries"] = 0
        rec["state"] = "candidate"
        rec["reason"] = None
        img = self._img
        # the record first, then the switch: main.py on the old image tells a cut between
        # the two (tries 0) from a rollback, and switches once more
        rec["cimg"] = img and img.label
        rec["cprev"] = img and self.hal.image_running()
        rec["reswitch"] = 0
        write_record(self.fw, rec)
        if img:
            img.boot()
        print("update: release %s staged in %s, rebooting into it" % (self.version, self.slot))
        self.man = None
        return self.version

    def abort(self):
        if self.slot is None:
            self.slot = self._target()
        rec = read_record(self.fw)
        # never the slot on trial, the one to roll back to, or the one running
        if self.slot.rsplit("/", 1)[1] not in (rec.get("cand"), rec.get("active"),
                                                boot_info().get("slot")):
            _rmtree(self.slot)
        self.man, self.slot, self.version, self.have, self.total = None, None, None, 0, 0
        self._head = None

# --- trial: the candidate proves itself, or the node returns to the previous slot ---

def confirm(fw, hal=None):
    """The candidate booted, sampled and got a pack ACKed: it becomes the active slot."""
    rec = read_record(fw)
    cand = rec.get("cand")
    if not cand:
        return False
    floor = rec.get("cfloor") or 0
    if rec.get("cimg"):
        # the bootloader keeps the new image first: a cut before the record then boots it
        # again on trial (tries counted on), never the old image under a "confirmed" record
        hal.image_confirm()
    if floor > read_floor(fw, hal):
        nvs_set = getattr(hal, "nvs_set", None)
        if nvs_set is not None:
            nvs_set(_NVS_FLOOR, floor)  # NVS first: a filesystem erased later keeps it
        _write_atomic(fw + "/floor", b"%d" % floor)  # first: older bundles are refused now
    rec.update({"active": cand, "ver": rec.get("cver"), "cand": None, "tries": 0,
                "state": "confirmed", "reason": None, "cimg": None})
    write_record(fw, rec)
    print("update: release %s confirmed, security floor %d" % (rec["ver"], floor))
    return True


def roll_back(fw, reason, hal=None):
    """Leave the candidate: the next boot runs the previous slot, and the previous app image
    if it brought one; STATUS tells why. The caller resets."""
    rec = read_record(fw)
    if not rec.get("cand"):
        return rec
    if rec.get("cimg"):
        # the old image set to boot before the record says so: a cut between boots it with
        # the candidate still recorded (main.py: image_rollback), never the failed image
        # under a record that says rolled_back (review 7, finding 4)
        hal.image_back(rec["cimg"], rec["cprev"])
    rec.update({"cand": None, "tries": 0, "state": "rolled_back", "reason": reason,
                "cimg": None})
    write_record(fw, rec)
    print("update: release %s rolled back: %s" % (rec.get("cver"), reason))
    return rec


async def trial(node):
    """Confirm the running candidate once a pack sealed in this boot is ACKed; roll it back
    when update_trial_s pass without that (node/app.py runs this task only on trial)."""
    import asyncio

    fw = boot_info().get("fw") or fw_dir(node.cfg)
    limit_ms = node.cfg.get("update_trial_s", 600) * 1000
    t0 = time.ticks_ms()
    first = node.outbox._next  # the first sequence number this boot seals
    evicted = node.outbox.evicted
    while True:
        if node.outbox.evicted != evicted:
            # a pack gone by eviction is not one ACKed: only packs sealed from now count
            evicted = node.outbox.evicted
            first = node.outbox._next
        link = node.link
        if (link is not None and link.acked and node.outbox._next > first
                and first not in node.outbox):
            confirm(fw, node.hal)
            return
        if time.ticks_diff(time.ticks_ms(), t0) > limit_ms:
            roll_back(fw, "no_ack: no pack ACKed within %d s" % (limit_ms // 1000), node.hal)
            reset(node.hal)
        await asyncio.sleep_ms(500)


def reset(hal):
    """Reboot: the board resets; on the unix port the process ends with REBOOT_EXIT."""
    r = getattr(hal, "reset", None)
    if r is not None:
        r()
    raise SystemExit(75)
