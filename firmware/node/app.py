"""The node's main program: sample on an interval, seal each pack, keep it until acknowledged."""

import asyncio
import gc
import hashlib
import json
import os
import time

from . import cbor, cose, senml
from .clock import Clock
from .outbox import Outbox, _write_atomic

FIRMWARE_VERSION = "0.1.0"
_BOOT_MS = time.ticks_ms()  # the node's first instant (an ESP32 has booted ~0.3-1 s before)

# A canonical measurement name (docs/measurements.md) travels without its unit: the gateway
# restores it from the protocol's table, agent/units.py (docs/protocol.md §1). A measurement
# outside that table names its unit here and sends it. Quality flags ("<name>.q") and the
# outbox depth have none.
EXTRA_UNITS = {}  # type: dict[str, str]


class ConfigError(ValueError):
    pass


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


class Node:
    def __init__(self, cfg, hal, board):
        self.cfg = cfg
        self.hal = hal
        self.node_id = cfg["id"]
        self.kid = self.node_id.encode()
        self.key = node_key(cfg, hal)
        self.interval_ms = cfg.get("interval_ms", 60000)
        self.outbox = Outbox(cfg["state_dir"], cfg.get("max_frames", 1000))
        self.key_id = bind_state(cfg["state_dir"], self.key, hal)
        self.clock = Clock(hal)
        self.faults = {}  # latched faults for diagnostics: name -> [count, detail]
        self.boot = boot_record(hal)
        if self.boot["reset"] == "watchdog":  # a task hung last time: the technician sees it
            self.fault("watchdog_reset", "the watchdog reset the node")
        # armed before the sensors: a bus that hangs while they are probed resets the node too
        wdt_ms = cfg.get("watchdog_ms", 30000)
        self.wdt = hal.watchdog(wdt_ms) if wdt_ms and hasattr(hal, "watchdog") else None
        self.wdt_ms = wdt_ms
        self.sensors = open_sensors(hal, board, cfg)
        self.boot_ms = time.ticks_ms()
        self.beat_ms = self.boot_ms  # the sampler's last sign of life (the watchdog feeds on it)
        self.link = None
        self.heap_peak = 0  # most heap in use seen just before a collection (high-water)
        self.cycle_ms = 0  # how long the previous sample → seal → store cycle took
        self.seal_errors = 0  # sample cycles that failed (e.g. out of memory): packs not taken
        self.board = board

    def sample(self):
        """Read every sensor (blocking); one failing sensor never stops the others."""
        now = self.clock.now()
        values = {}
        if isinstance(self.sensors, list):  # a HAL from before sensor_buses()
            for s in self.sensors:
                try:
                    values.update(s.read(now))
                except Exception as e:  # noqa: BLE001 - a sensor fault must not stop the node
                    print("sensor %s failed: %r" % (type(s).__name__, e))
        else:
            values = self.sensors.sample_blocking()
        return now, self._health(values)

    async def sample_async(self):
        """Read every sensor without blocking the link between oversampled readings."""
        if isinstance(self.sensors, list):
            return self.sample()
        now = self.clock.now()
        return now, self._health(await self.sensors.sample())

    def _health(self, values):
        values["uptime"] = time.ticks_diff(time.ticks_ms(), self.boot_ms) // 1000
        values["heap_free"] = self.hal.heap_free()
        values["heap_peak"] = self.heap_peak
        values["cycle_ms"] = self.cycle_ms
        values["outbox"] = len(self.outbox)
        energy = self._energy()
        if energy is not None:
            values["energy"] = energy
        return values

    def _energy(self):
        """Estimated energy of the last interval in J.

        With the sampler's model (node/sampler.py: the board's currents for the
        microcontroller, the radio and every sensor, and what actually ran): its last interval.
        Else awake at active_ma, asleep at sleep_ua, over the previous sample → seal → store
        cycle (the board file's "power": active_ma, sleep_ua, supply_v).
        """
        energy = getattr(self.sensors, "energy", None)
        e = energy() if energy is not None else None
        if e is not None:
            return senml.quantize(e["mj_last"] / 1000, 6)
        power = self.board.get("power") if isinstance(self.board, dict) else None
        if not power or not self.cycle_ms:
            return None
        awake = self.cycle_ms
        asleep = self.interval_ms - awake if self.interval_ms > awake else 0
        uj = power["supply_v"] * (power["active_ma"] * awake + power["sleep_ua"] * asleep / 1000)
        return senml.quantize(uj / 1000000, 6)

    def seal(self, now, values):
        """Encode, MAC and store one pack; returns its sequence number."""
        # no base name (the kid names the node), every number an int or a float32
        records = [senml.record(name, senml.quantize(values[name]), EXTRA_UNITS.get(name))
                   for name in sorted(values)]
        payload = cbor.dumps(senml.pack(None, now, records))
        seq = self.outbox.next_seq()
        protected = {
            cose.H_ALG: cose.ALG_HMAC_256_64, cose.H_KID: self.kid, cose.H_PIV: cose.piv(seq)}
        self.outbox.put(seq, cose.mac0_create(self.key, payload, protected))
        return seq

    async def cycle(self):
        """Sample → seal → store once; a failure loses this pack, never the sampler."""
        t0 = time.ticks_ms()
        self.beat_ms = t0
        seq = None
        try:
            now, values = await self.sample_async()
            t_sampled = time.ticks_ms()
            seq = self.seal(now, values)
            awake = getattr(self.sensors, "awake", None)
            if awake is not None:  # the node's own work after sampling, for the energy model
                awake(time.ticks_diff(time.ticks_ms(), t_sampled))
            self.cycle_ms = time.ticks_diff(time.ticks_ms(), t0)
            used = gc.mem_alloc()
            if used > self.heap_peak:
                self.heap_peak = used
            print("sample seq=%d readings=%d outbox=%d" % (seq, len(values), len(self.outbox)))
            if self.link:
                self.link.kick()
        except Exception as e:  # noqa: BLE001 - one lost pack, not the end of sampling
            # (a MemoryError here once ended this task: the node went silent for good)
            gc.collect()
            if seq is None:
                # no sequence number (flash full), no room for the frame, no memory
                self.seal_errors += 1
                print("sample failed (%d so far): %r" % (self.seal_errors, e))
            else:
                # the pack is stored; only its report or the link's wake-up failed (the
                # link sends it on its next round)
                print("sample seq=%d stored, then: %r" % (seq, e))
        self.beat_ms = time.ticks_ms()
        gc.collect()

    async def sampler(self):
        due = time.ticks_ms()
        # sample_limit: stop sampling after that many packs (tests, demos); the link keeps going
        limit = self.cfg.get("sample_limit", 0)
        taken = 0
        while not limit or taken < limit:
            taken += 1
            await self.cycle()
            # a low battery stretches the interval (node/sampler.py battery_low; packs say so)
            factor = getattr(self.sensors, "interval_factor", 1)
            due = time.ticks_add(due, self.interval_ms * factor)
            wait = time.ticks_diff(due, time.ticks_ms())
            if wait < 0:
                due = time.ticks_ms()
                wait = 0
            await asyncio.sleep_ms(wait)

    async def sleeper(self):
        """node.json deep_sleep: one cycle, deliver, then deep sleep until the next one.

        The board wakes through a reset: main.py boots again, the outbox (flash) and the RTC
        counters (RTC memory) carry over. Awake at most awake_max_ms: what is not acknowledged
        by then waits in the outbox for the next wake-up.
        """
        await self.cycle()
        limit = self.cfg.get("awake_max_ms", 10000)
        while len(self.outbox) and time.ticks_diff(time.ticks_ms(), self.boot_ms) < limit:
            await asyncio.sleep_ms(20)
        self.beat_ms = time.ticks_ms()
        awake = time.ticks_diff(self.beat_ms, _BOOT_MS)
        print("deep sleep: awake %d ms, outbox %d" % (awake, len(self.outbox)))
        factor = getattr(self.sensors, "interval_factor", 1)  # a low battery sleeps longer
        self.hal.deepsleep(max(self.interval_ms * factor - awake, 1000), awake)

    async def watchdog(self):
        """Feed the hardware watchdog while the sampler lives; a hung task resets the node.

        The loop stuck in blocking code feeds nothing; a sampler stuck on an await (a bus that
        never answers) stops its beat, and after an interval and a timeout the feeding stops.
        """
        while True:
            late = time.ticks_diff(time.ticks_ms(), self.beat_ms)
            if late < self.interval_ms + self.wdt_ms:
                self.wdt.feed()
            await asyncio.sleep_ms(self.wdt_ms // 4)

    async def run(self):
        link_cfg = self.cfg["link"]
        if link_cfg.get("type", "uart") == "ble":
            from .link_ble import BleLink

            if not hasattr(self.hal, "bluetooth"):
                raise ConfigError("board %s: its HAL has no BLE radio" % self.cfg["board"])
            self.link = BleLink(self.hal.bluetooth(), self.node_id, self.key, self.outbox,
                                self.clock, self.cfg["state_dir"], link_cfg)
        else:
            from .link_uart import UartLink

            stream = self.hal.open_uart(link_cfg["port"], link_cfg.get("baud", 115200))
            self.link = UartLink(
                stream, self.node_id, self.key, self.outbox, self.clock,
                window=link_cfg.get("window", 4), rto_ms=link_cfg.get("rto_ms", 1000),
            )
        self.attach_diagnostics(self.link)
        print("lantern node %s firmware %s: %d frames waiting, next seq %d" % (
            self.node_id, FIRMWARE_VERSION, len(self.outbox), self.outbox._next))
        if self.wdt is not None:
            asyncio.create_task(self.watchdog())
        if self.cfg.get("deep_sleep") and hasattr(self.hal, "deepsleep"):
            asyncio.create_task(self.link.run())
            await self.sleeper()
        else:
            asyncio.create_task(self.sampler())
            await self.link.run()

    # --- diagnostics: node/commands.py, loaded on the first COMMAND (docs/protocol.md) ---

    def attach_diagnostics(self, link):
        """Let `link` answer COMMAND frames; adopt a sampling interval set by an earlier one."""
        try:
            with open(self.cfg["state_dir"] + "/interval_ms") as f:
                self.interval_ms = int(f.read())
        except (OSError, ValueError):
            pass
        nvs_get = getattr(self.hal, "nvs_get", None)
        if nvs_get is not None:  # NVS outlives a reflashed filesystem: it wins
            self.interval_ms = nvs_get("interval_ms", 0) or self.interval_ms
        if hasattr(self.sensors, "interval_ms"):
            self.sensors.interval_ms = self.interval_ms  # cadences count in intervals
        self._commands = None
        link.commands = self

    def handle(self, body):
        """A COMMAND frame from the link: [(frame type, body, after)] to send back."""
        if self._commands is None:
            # Loaded on demand: most nodes never meet a technician, and RAM is scarce.
            try:
                from .commands import Commands, NodeActions

                self._commands = Commands(self.node_id, self.key, self.cfg["state_dir"],
                                          NodeActions(self))
            except MemoryError:
                print("diagnostics: not enough RAM to load them")
                return []
        return self._commands.handle(body)

    def fault(self, name, detail=""):
        """Latch a fault for `lantern diag` until a technician clears it."""
        f = self.faults.get(name)
        if f is None:
            self.faults[name] = [1, detail]
        else:
            f[0] += 1
            f[1] = detail


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
    import sys

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


def main(config_path):
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
    locked = lock_repl(cfg, hal, board)
    try:
        asyncio.run(Node(cfg, hal, board).run())
    except Exception as e:  # noqa: BLE001 - a locked board must not fall into its REPL
        if not locked:
            raise
        print("node stopped: %r; restarting in 60 s (the REPL stays locked)" % (e,))
        time.sleep(60)
        hal.reset()


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
