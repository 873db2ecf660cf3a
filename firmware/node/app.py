"""The node's main program: sample on an interval, seal each pack, keep it until acknowledged."""

import asyncio
import gc
import sys
import time

from . import ConfigError, cbor, cose, senml, unload, untimed

FIRMWARE_VERSION = "0.1.0"
_BOOT_MS = time.ticks_ms()  # the node's first instant (an ESP32 has booted ~0.3-1 s before)

# A canonical measurement name (docs/measurements.md) travels without its unit: the gateway
# restores it from the protocol's table, agent/units.py (docs/protocol.md §1). A measurement
# outside that table names its unit here and sends it. Quality flags ("<name>.q") and the
# outbox depth have none.
EXTRA_UNITS = {}  # type: dict[str, str]


class Node:
    def __init__(self, cfg, hal, board):
        self.cfg = cfg
        self.hal = hal
        self.node_id = cfg["id"]
        self.kid = self.node_id.encode()
        self.interval_ms = cfg.get("interval_ms", 60000)
        self.faults = {}  # latched faults for diagnostics: name -> [count, detail]
        _boot().setup(self, cfg, hal, board)
        _unload()
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
        clock = self.clock
        t, shift = clock.now_ms(), clock.shift_ms
        values = await self.sensors.sample()
        # an ACK may set the clock while the sensors warm up: the time read before moves with it
        return (t + clock.shift_ms - shift) // 1000, self._health(values)

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
            # sealed with its time, or held while the clock is not known (docs/time.md)
            seq = await untimed.take(self, now, values)
            awake = getattr(self.sensors, "awake", None)
            if awake is not None:  # the node's own work after sampling, for the energy model
                awake(time.ticks_diff(time.ticks_ms(), t_sampled))
            self.cycle_ms = time.ticks_diff(time.ticks_ms(), t0)
            used = gc.mem_alloc()
            if used > self.heap_peak:
                self.heap_peak = used
            if seq is not None:
                print("sample seq=%d readings=%d outbox=%d" % (
                    seq, len(values), len(self.outbox)))
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
        if (getattr(sys.modules.get("node"), "BOOT", None) or {}).get("trial"):
            from . import ota  # a candidate release on trial (main.py): it proves itself

            asyncio.create_task(ota.trial(self))
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
        self._probe_ms = None  # when the last probe was answered (node/probe.py)
        link.commands = self

    def handle(self, body):
        """A COMMAND frame from the link: [(frame type, body, after)] to send back."""
        if not body and self._commands is None:
            return self._probed()
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

    def _probed(self):
        """An empty COMMAND (who is there?), answered without loading node/commands.py: the
        gateway probes every node it serves (node/probe.py says why)."""
        from . import frame, probe

        now = time.ticks_ms()
        if (self._probe_ms is not None
                and time.ticks_diff(now, self._probe_ms) < probe.STATUS_GAP_MS):
            return []  # a stranger cannot make the node talk faster
        self._probe_ms = now
        ident = {"id": self.node_id, "fw": FIRMWARE_VERSION,
                 "board": self.board.get("name", "?")}
        body = probe.status_body(self.key, self.kid, probe.floor(self.cfg["state_dir"]
                                                                 + "/cmd_counter"),
                                 ident, probe.R_PROBE, probe.boot_upd())
        return [(frame.STATUS, body, None)]

    def fault(self, name, detail=""):
        """Latch a fault for `lantern diag` until a technician clears it."""
        f = self.faults.get(name)
        if f is None:
            self.faults[name] = [1, detail]
        else:
            f[0] += 1
            f[1] = detail


def _boot():
    """node/start.py, loaded for the boot and given back after it (see its docstring)."""
    from . import start

    return start


def _unload():
    unload("start")


def main(config_path):
    cfg, hal, board, locked = _boot().prepare(config_path)
    try:
        node = Node(cfg, hal, board)
        node.config_path = config_path  # OP_CONFIG writes it (node/netcfg.py)
        asyncio.run(node.run())
    except Exception as e:  # noqa: BLE001 - a locked board must not fall into its REPL
        if not locked:
            raise
        print("node stopped: %r; restarting in 60 s (the REPL stays locked)" % (e,))
        time.sleep(60)
        hal.reset()
