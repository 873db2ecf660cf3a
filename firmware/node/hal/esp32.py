# mypy: check-untyped-defs
"""HAL of ESP32 boards (ESP32, ESP32-C3, ESP32-S3) on MicroPython's esp32 port.

Buses come from the board file: machine.I2C (or SoftI2C with "soft": true), UART and ADC; the
gateway link is the board UART that node.json's link.port names; BLE is the port's `bluetooth`
module. Power: deep sleep with small counters kept in RTC memory (it survives deep sleep, a
watchdog and a soft reset, not a power cut: the port keeps it RTC_NOINIT) and settings in NVS;
the outbox and the security counters stay in flash (littlefs), the node key in NVS. Watchdog:
machine.WDT. Type-checked against micropython-esp32-stubs (`make lint`) and run unmodified by
the ESP32 twin (tests/esp32_twin, docs/esp32.md) against models of machine, esp32, bluetooth.
"""

import gc
import struct

try:
    from typing import Any  # noqa: F401 - for the type comments; not on the board
except ImportError:
    pass

import esp32
import machine

_board = {}  # type: dict[str, Any]
_link_port = None
_ATTEN = (machine.ADC.ATTN_0DB, machine.ADC.ATTN_2_5DB, machine.ADC.ATTN_6DB,
          machine.ADC.ATTN_11DB)
_RTC_MAGIC = 0x4C4F  # "LO": RTC memory holds our counters, not leftovers of another firmware
_RTC_FMT = "<HIIIB"  # magic, wake-ups, awake ms (total), energy mJ (total), flags
_RTC_SYNCED = 1  # flags: the RTC was set from the gateway's clock (it runs on through sleep)
# machine.reset_cause() of the esp32 port (ports/esp32/modmachine.c): a brown-out reads as
# PWRON_RESET, a panic or machine.reset() as HARD_RESET, soft_reset as SOFT_RESET
_RESETS = {machine.PWRON_RESET: "power_on", machine.HARD_RESET: "hard",
           machine.WDT_RESET: "watchdog", machine.DEEPSLEEP_RESET: "deep_sleep",
           machine.SOFT_RESET: "soft"}
_WAKES = {machine.TIMER_WAKE: "timer", machine.EXT0_WAKE: "ext0", machine.EXT1_WAKE: "ext1",
          machine.TOUCHPAD_WAKE: "touchpad", machine.ULP_WAKE: "ulp"}
# NVS counters of resets by cause: they survive power cuts and filesystem reflashes (deep
# sleep wake-ups are counted in RTC memory instead: an NVS write per wake wears the flash)
_NVS_RESETS = {"power_on": "rst_pwr", "hard": "rst_hard", "watchdog": "rst_wdt",
               "soft": "rst_soft"}


def _pin(n):
    return machine.Pin(n)


def sensor_buses(board, cfg):
    """The board's sensor buses: (buses by name, chip time scale 1)."""
    global _board, _link_port
    _board = board
    _link_port = cfg.get("link", {}).get("port")
    buses = {}  # type: dict[str, object]
    for name, spec in board.get("i2c", {}).items():
        freq = spec.get("freq", 100000)
        timeout = spec.get("timeout_us", 50000)
        if spec.get("soft"):
            buses[name] = machine.SoftI2C(scl=_pin(spec["scl"]), sda=_pin(spec["sda"]),
                                          freq=freq, timeout=timeout)
        else:  # the hardware controller's own timeout: 50 ms
            buses[name] = machine.I2C(spec.get("id", 0), scl=_pin(spec["scl"]),
                                      sda=_pin(spec["sda"]), freq=freq)
    for name, spec in board.get("uart", {}).items():
        if name == _link_port:
            continue  # the gateway link: open_uart()
        buses[name] = machine.UART(spec["id"], baudrate=spec.get("baud", 9600), tx=spec["tx"],
                                   rx=spec["rx"], rxbuf=spec.get("rxbuf", 256), timeout=0)
    for name, spec in board.get("adc", {}).items():
        adc = machine.ADC(_pin(spec["pin"]))
        adc.atten(_ATTEN[spec.get("atten", 3)])  # 11 dB: the full 0-3.1 V range by default
        buses[name] = adc
    return buses, 1


def open_uart(port, baud):
    """The gateway link: the board UART named `port`, non-blocking for asyncio streams."""
    spec = _board.get("uart", {}).get(port)
    if spec is None:
        raise ValueError("board %s: no UART %r (have %s)" % (
            _board.get("name"), port, ", ".join(sorted(_board.get("uart", {})))))
    return machine.UART(spec["id"], baudrate=baud, tx=spec["tx"], rx=spec["rx"],
                        rxbuf=spec.get("rxbuf", 2048), timeout=0)


def heap_free():
    gc.collect()
    return gc.mem_free()


def reset():
    machine.reset()


def bluetooth():
    """The port's `bluetooth` module (NimBLE): node/ble.py calls bluetooth.BLE() on it."""
    import bluetooth as bt

    return bt


# ------------------------------------------------------------------ resets and the watchdog


def reset_cause():
    """Why this boot happened: power_on (brown-out included), hard, watchdog, deep_sleep, soft."""
    return _RESETS.get(machine.reset_cause(), "unknown")


def wake_cause():
    """What ended the deep sleep (timer, ext0, ...), or None if this boot was no wake-up."""
    return _WAKES.get(machine.wake_reason())


def count_reset(cause):
    """Count this boot's cause in NVS; returns {cause: count} of every cause counted so far."""
    key = _NVS_RESETS.get(cause)
    if key is not None:
        nvs_set(key, nvs_get(key) + 1)
    return {c: nvs_get(k) for c, k in _NVS_RESETS.items()}


def watchdog(timeout_ms):
    """Start the hardware watchdog (it cannot be stopped); feed() it or the board resets."""
    return machine.WDT(id=0, timeout=timeout_ms)


def identify(seconds):
    """Blink the board's LED (board "led": GPIO number, active high) for `seconds`.

    False when the board names no LED (the node then says so on its console).
    """
    pin = _board.get("led")
    if not isinstance(pin, int):
        return False
    import asyncio

    led = machine.Pin(pin, machine.Pin.OUT)

    async def blink():
        for _ in range(seconds * 4):
            led.value(not led.value())
            await asyncio.sleep_ms(250)
        led.value(0)

    asyncio.create_task(blink())
    return True


# ------------------------------------------------------------------ power


def woke_from_deepsleep():
    return machine.reset_cause() == machine.DEEPSLEEP_RESET


def _rtc_memory():
    raw = machine.RTC().memory()
    if len(raw) == struct.calcsize(_RTC_FMT):
        rec = struct.unpack(_RTC_FMT, raw)
        if rec[0] == _RTC_MAGIC:
            return list(rec[1:])
    return [0, 0, 0, 0]


def _rtc_store(wakes, awake_ms, mj, flags):
    machine.RTC().memory(struct.pack(_RTC_FMT, _RTC_MAGIC, wakes, awake_ms, mj, flags))


def rtc_counters():
    """(wake-ups, awake ms, energy mJ) kept in RTC memory across deep sleep; zeros after a cut."""
    return tuple(_rtc_memory()[:3])


def clock_synced():
    """Whether the RTC holds the gateway's time: it does until power is lost."""
    return bool(_rtc_memory()[3] & _RTC_SYNCED)


def set_clock(epoch_ms):
    """Set the RTC (Unix ms) so the time outlives deep sleep; remembered in RTC memory."""
    import time

    secs = epoch_ms // 1000
    if time.gmtime(0)[0] == 2000:  # the port's epoch (node/clock.py)
        secs -= 946684800
    t = time.gmtime(secs)
    machine.RTC().datetime((t[0], t[1], t[2], t[6], t[3], t[4], t[5], epoch_ms % 1000 * 1000))
    rec = _rtc_memory()
    if not rec[3] & _RTC_SYNCED:
        _rtc_store(rec[0], rec[1], rec[2], rec[3] | _RTC_SYNCED)


def energy_mj(awake_ms, sleep_ms=0):
    """The board file's current model: awake time at active_ma, sleep at sleep_ua (mJ)."""
    p = _board.get("power") or {}
    v = p.get("supply_v", 3.3)
    return (awake_ms * p.get("active_ma", 100) + sleep_ms * p.get("sleep_ua", 10) / 1000) * v / 1000


def deepsleep(ms, awake_ms):
    """Record this cycle in RTC memory, then sleep; the board wakes through a reset."""
    wakes, total_ms, mj, flags = _rtc_memory()
    mj += int(energy_mj(awake_ms, ms))
    _rtc_store(wakes + 1, total_ms + awake_ms, mj, flags)
    machine.deepsleep(ms)


def nvs_get(key, default=0):
    """A small integer setting from NVS (survives reflashing the filesystem)."""
    try:
        return esp32.NVS("lantern").get_i32(key)
    except OSError:
        return default


def nvs_set(key, value):
    nvs = esp32.NVS("lantern")
    nvs.set_i32(key, value)
    nvs.commit()


def nvs_blob(key, size=32):
    """A small binary value from NVS (the release key: node/ota.py), or None."""
    buf = bytearray(size)
    try:
        n = esp32.NVS("lantern").get_blob(key, buf)
    except OSError:
        return None
    return bytes(buf[:n])


def nvs_set_blob(key, value):
    """Set a binary value in NVS; None erases it."""
    nvs = esp32.NVS("lantern")
    if value is None:
        try:
            nvs.erase_key(key)
        except OSError:
            return  # not there: nothing to erase
    else:
        nvs.set_blob(key, value)
    nvs.commit()


# ------------------------------------------------------------------ node key (docs/security.md)
# The key sits in NVS, written there by `lantern provision` (tools/field/provision_steps.py
# nvs_key_script): `mpremote fs cat`, a filesystem dump or a reflash of the filesystem
# partition does not reach it. Only flash encryption with NVS encryption keeps it from a raw
# flash read (esptool read-flash), and only a locked REPL from the REPL itself.

_NVS = "lantern"


def load_key():
    """The 256-bit node key from NVS; ValueError saying what to do if there is none."""
    buf = bytearray(32)
    try:
        n = esp32.NVS(_NVS).get_blob("node_key", buf)
    except OSError:
        n = 0
    if n != 32:
        raise ValueError("no node key in NVS (namespace %s, node_key): provision the node with "
                         "`lantern provision node`" % _NVS)
    return bytes(buf)


def key_used(kid):
    """Whether the key with id `kid` has run on this board (node/start.py bind_state)."""
    buf = bytearray(32)
    try:
        n = esp32.NVS(_NVS).get_blob("key_used", buf)
    except OSError:
        return False
    return bytes(buf[:n]) == kid.encode()


def mark_key_used(kid):
    if not key_used(kid):
        nvs = esp32.NVS(_NVS)
        nvs.set_blob("key_used", kid.encode())
        nvs.commit()


def lock_repl():
    """Ctrl-C at the USB REPL no longer interrupts the running node (node.json lock_repl)."""
    import micropython

    micropython.kbd_intr(-1)


# ------------------------------------------------- whole-firmware images (docs/updates.md)
# The app partition that is not running, written block by block as an update's chunks arrive,
# checked by reading it back, then set to boot. With the bootloader's app rollback on, the new
# image runs once on trial: unless it calls image_confirm() before the next reset, the
# bootloader returns to the previous one by itself.

_IMG_BLOCK = 4096


class Image:
    """The next update partition (esp32.Partition.get_next_update()) as a byte-addressed
    store: write(offset, data) in any pieces, a block erased as writing enters it.

    Staging an update's image entry (node/ota.py): put() writes each chunk, reads it back
    from flash into a running SHA-256 and, at each block boundary, records the progress in a
    small file ("N LABEL": N bytes written and hashed, a multiple of the block; "N LABEL ok"
    once the whole image matched). After a reset, resume() hashes those N bytes again from
    flash (a hash's state cannot be kept, the flash can) and the transfer goes on from N.
    """

    def __init__(self):
        # Partition(RUNNING): docs/library/esp32.rst takes BOOT or RUNNING; the stub says str
        running = esp32.Partition(esp32.Partition.RUNNING)  # type: ignore[arg-type]
        self.part = running.get_next_update()
        info = self.part.info()
        self.size = info[3]
        self.label = info[4]
        self.ok = False  # the whole image in the partition matched its digest
        self._mark = ""
        self._h = None  # type: Any
        self._buf = bytearray(768)  # node/ota.py CHUNK_MAX: one chunk read back

    def resume(self, mark, size):
        """Bytes of a size-byte image already written and checked, per the progress file
        mark; the hash of them is taken again from flash."""
        import hashlib

        self._mark = mark
        try:
            with open(mark) as f:
                rec = f.read().split()
            got, ok = int(rec[0]), rec[2:] == ["ok"]
            if rec[1] != self.label or got > size or (got % _IMG_BLOCK and not ok):
                got, ok = 0, False  # another partition's (a switch since), or not ours
        except (OSError, ValueError, IndexError):
            got, ok = 0, False
        self.ok = ok and got == size
        self._h = hashlib.sha256()
        at = 0
        while at < got and not self.ok:  # an image checked whole needs no second look
            n = min(got - at, len(self._buf))
            self._readback(at, n)
            at += n
        return got

    def _readback(self, at, n):
        mv = memoryview(self._buf)[:n]
        self.readinto(at, mv)
        self._h.update(mv)

    def _save(self, got, ok=False):
        import os

        with open(self._mark + ".tmp", "w") as f:
            f.write("%d %s%s" % (got, self.label, " ok" if ok else ""))
        os.rename(self._mark + ".tmp", self._mark)

    def put(self, at, data, size, digest):
        """Write the image's bytes at..at+len(data) (after resume()), check them by reading
        back; ValueError("bad_hash ...") if the whole image differs from digest."""
        self.write(at, data)
        end = at + len(data)
        for i in range(at, end, len(self._buf)):
            self._readback(i, min(len(self._buf), end - i))
        if end == size:
            if self._h.digest() != digest:
                self._save(0)  # anew from the start
                raise ValueError("bad_hash: what reached partition %s differs from the "
                                 "manifest's SHA-256" % self.label)
            self._save(size, True)
            self.ok = True
        elif end // _IMG_BLOCK != at // _IMG_BLOCK:
            self._save(end // _IMG_BLOCK * _IMG_BLOCK)

    def write(self, offset, data):
        if offset + len(data) > self.size:
            raise ValueError("image of %d bytes: partition %s holds %d"
                             % (offset + len(data), self.label, self.size))
        mv = memoryview(data)
        while len(mv):
            block, at = offset // _IMG_BLOCK, offset % _IMG_BLOCK
            if at == 0:
                self.part.ioctl(6, block)  # erase: a write only clears bits
            n = min(len(mv), _IMG_BLOCK - at)
            # any buffer: the port takes it by the buffer protocol (the stub says bytes)
            self.part.writeblocks(block, mv[:n], at)  # type: ignore[call-overload]
            offset += n
            mv = mv[n:]

    def readinto(self, offset, buf):
        self.part.readblocks(offset // _IMG_BLOCK, buf, offset % _IMG_BLOCK)

    def boot(self):
        """Boot this image at the next reset (on trial: see image_confirm)."""
        self.part.set_boot()


def image_running():
    """The label of the app partition this boot runs from (ota_0, ota_1)."""
    return esp32.Partition(esp32.Partition.RUNNING).info()[4]  # type: ignore[arg-type]


def image_trial(fw, rec, save, leave):
    """main.py, before a candidate that brought an app image runs: True if that image is
    the one running. If not, either the switch never happened (a cut between the boot
    record and set_boot: the record says no boot yet; switched once more, then reset) or the
    bootloader went back to the old image because the new one reset before it confirmed
    itself (a crash, the watchdog, a power cut): leave(fw, rec, reason), False."""
    running = image_running()
    if running == rec["cimg"]:
        return True
    if not rec.get("tries") and not rec.get("reswitch"):
        rec["reswitch"] = 1
        save(fw, rec)
        print("boot: image %s was never switched to: switching" % rec["cimg"])
        image_boot(rec["cimg"])
        reset()
    leave(fw, rec, "image_rollback: the bootloader went back to %s: the image in %s reset "
          "before it confirmed itself" % (running, rec["cimg"]))
    return False


def image_back(img, prev):
    """A candidate with the image img is left (node/ota.py roll_back, image_rollback): if img
    runs, set prev to boot at the next reset; True if so. Called before the boot record says
    rolled_back, the reset after it: a cut between the two boots prev with the candidate
    still recorded, which image_trial reports; never img under a record saying rolled_back."""
    if image_running() != img:
        return False
    image_boot(prev)
    return True


def image_rollback(fw, rec, reason, leave):
    """main.py leaves a candidate that brought an image: the previous image set to boot
    (image_back), then leave(fw, rec, reason) writes the record without the image, then the
    reset. A switch that fails leaves the record as it is: the next boot leaves it again."""
    try:
        back = image_back(rec["cimg"], rec["cprev"])
    except OSError as e:
        print("boot: %s not set to boot (%r): the candidate is left again at the next boot"
              % (rec["cprev"], e))
        return
    rec["cimg"] = None
    leave(fw, rec, reason)
    if back:
        reset()


def image_leave(img, prev):
    """For a main.py provisioned before review 7 (an update never replaces main.py), which
    calls this after its record: if img runs, boot prev again and reset."""
    if image_back(img, prev):
        reset()


_BACK_MAX = 3  # switches back to the old image after cuts in its first boots (image_kept)


def image_kept(fw, rec, save):
    """main.py, at each boot while a rollback's record still names the old image (cprev):
    set_boot made that image new to the bootloader, on trial like any, so it confirms itself
    at once, or a reset would return to the image just left. If that already happened (a cut
    in the old image's first boot, before this), it is set to boot again, up to _BACK_MAX
    times: a board that cannot boot its old image stays on the new one and says so."""
    prev = rec["cprev"]
    running = image_running()
    if running != prev:
        back = rec.get("back") or 0
        if back < _BACK_MAX:
            rec["back"] = back + 1
            save(fw, rec)
            print("boot: the bootloader returned to %s: %s set to boot again" % (running, prev))
            image_boot(prev)
            reset()
        rec["reason"] = "%s; %s did not boot: %s kept" % (rec.get("reason"), prev, running)
        print("boot: %s" % rec["reason"])
    else:
        image_confirm()
    rec["cprev"] = None
    rec["back"] = 0
    save(fw, rec)


def image_boot(label):
    """Boot the app partition `label` at the next reset (a rollback chosen by the node)."""
    esp32.Partition(label).set_boot()


def image_confirm():
    """The running image proved itself: the bootloader keeps it (no rollback). False on a
    firmware built without the bootloader's app rollback (the port raises OSError -261):
    there, only the node's own rollback (node/ota.py roll_back, main.py) returns."""
    try:
        esp32.Partition.mark_app_valid_cancel_rollback()
    except OSError:
        return False
    return True
