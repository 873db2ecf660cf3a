"""Board files (boards/*.json): load and validate, on the node and in CPython tools alike.

A board file names its HAL and MCU, its buses (with pins on real boards) and the sensors on
them. Validation follows boards/board.schema.json for structure and adds what a schema cannot
say: pins wired to the SPI flash are rejected, strapping pins warned about, two sensors at one
I2C address rejected, an unknown chip rejected with the list of known ones, and so on.
"""

import json

from .drivers import CHIPS


class BoardError(ValueError):
    """A board file that cannot be used; the message names the file, the key and the fix."""


HALS = ("esp32", "qemu", "unix")
MCUS = ("esp32", "esp32c3", "esp32s3")  # their pin facts are in node/pins.py
BUS_KINDS = ("i2c", "uart", "adc")


# the current model's figures (docs/sensors.md "Energy"): mA, uA, ms, mAh, all >= 0
SENSOR_POWER = ("measure_ma", "idle_ma", "sleep_ua", "warmup_ms", "measure_ms")
MCU_POWER = ("active_ma", "light_sleep_ma", "deep_sleep_ua", "boot_ms")
RADIO_POWER = ("ble_ma", "ble_pack_ms", "ble_adv_ms", "uart_ma", "uart_pack_ms")


def _figures(c, key, block, names):
    if block is None:
        return
    if not isinstance(block, dict):
        c.error(key, "expected an object of %s" % ", ".join(names))
        return
    for k, v in block.items():
        if k not in names:
            c.error(key + "." + k, "unknown figure; known: %s" % ", ".join(names))
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            c.error(key + "." + k, "expected a number >= 0, got %r" % (v,))


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class _Check:
    def __init__(self, where):
        self.where = where
        self.errors = []
        self.warnings = []

    def error(self, key, msg):
        self.errors.append("%s: %s: %s" % (self.where, key, msg))

    def warn(self, key, msg):
        self.warnings.append("%s: %s: %s" % (self.where, key, msg))


def parse_address(v):
    """An I2C address from the board file: an integer or a "0x.." string."""
    if isinstance(v, str) and v[:2] in ("0x", "0X"):
        try:
            return int(v, 16)
        except ValueError:
            return None
    return v if _int(v) else None


def _buses(c, board, mcu):
    for kind in BUS_KINDS:
        buses = board.get(kind, {})
        if not isinstance(buses, dict):
            c.error(kind, "expected an object of named %s buses" % kind)
            board[kind] = {}
            continue
        for name, spec in buses.items():
            key = "%s.%s" % (kind, name)
            if not isinstance(spec, dict):
                c.error(key, "expected an object")
                buses[name] = {}
                continue
            for k, lo, hi in (("freq", 10000, 1000000), ("baud", 300, 1000000),
                              ("timeout_us", 1, 10000000)):
                if k in spec and (not _int(spec[k]) or not lo <= spec[k] <= hi):
                    c.error(key + "." + k, "expected an integer %d..%d, got %r" % (
                        lo, hi, spec[k]))
            bus_id = spec.get("id")
            if kind != "adc" and bus_id is not None and (not _int(bus_id) or bus_id < 0):
                c.error(key + ".id", "expected a bus number, got %r" % (bus_id,))


def _sensors(c, board):
    sensors = board.get("sensors", [])
    if not isinstance(sensors, list):
        c.error("sensors", "expected a list")
        return
    at = {}
    publishes = {}
    for i, spec in enumerate(sensors):
        key = "sensors[%d]" % i
        if not isinstance(spec, dict):
            c.error(key, "expected an object")
            continue
        if "driver" in spec and "chip" not in spec:
            # the walking skeleton's placeholder entries, still read by HALs that predate
            # sensor_buses(); they name a driver module instead of a chip
            c.warn(key, "a 'driver' entry (%r) is a placeholder; describe the chip with "
                        "'chip' and 'bus'" % (spec["driver"],))
            continue
        chip = spec.get("chip")
        if chip not in CHIPS:
            c.error(key + ".chip", "unknown sensor %r; known: %s" % (
                chip, ", ".join(sorted(CHIPS))))
            continue
        _, kind, addresses, names = CHIPS[chip]
        bus = spec.get("bus")
        if bus not in board.get(kind, {}):
            c.error(key + ".bus", "%s is a %s device; this board's %s buses: %s" % (
                chip, kind, kind, ", ".join(sorted(board.get(kind, {}))) or "none"))
            continue
        if kind == "i2c":
            raw = spec.get("address", addresses[0])
            addr = parse_address(raw)
            if addr not in addresses:
                c.error(key + ".address", "%s answers at %s, got %r" % (
                    chip, ", ".join("0x%02x" % a for a in addresses), raw))
                continue
            spec["address"] = addr
            other = at.get((bus, addr))
            if other:
                c.error(key + ".address", "0x%02x on %s is already taken by %s" % (
                    addr, bus, other))
            at[(bus, addr)] = "%s (%s)" % (key, chip)
        elif "address" in spec:
            c.error(key + ".address", "%s is a %s device and has no address" % (chip, kind))
        only = spec.get("measurements")
        if only is not None:
            if not isinstance(only, list) or not only or any(n not in names for n in only):
                c.error(key + ".measurements", "%s measures %s, got %r" % (
                    chip, ", ".join(names), only))
                continue
            names = only
        for k in ("options",):
            if k in spec and not isinstance(spec[k], dict):
                c.error(key + "." + k, "expected an object")
        _figures(c, key + ".power", spec.get("power"), SENSOR_POWER)
        n = spec.get("oversample")
        if n is not None and (not _int(n) or not 1 <= n <= 16):
            c.error(key + ".oversample", "expected an integer 1..16, got %r" % (n,))
        for name in names:
            if name in publishes:
                c.error(key, "%s would publish '%s' as %s does; list the ones to keep in "
                             "\"measurements\"" % (chip, name, publishes[name]))
            publishes[name] = "%s (%s)" % (key, chip)


def validate(board, where="board"):
    """Check a board (normalising I2C addresses to integers); returns the warnings.

    Raises BoardError listing every problem found.
    """
    c = _Check(where)
    if not isinstance(board, dict):
        raise BoardError("%s: expected a JSON object" % where)
    for k in ("name", "hal"):
        if not isinstance(board.get(k), str) or not board.get(k):
            c.error(k, "missing or not a string")
    hal = board.get("hal")
    if isinstance(hal, str) and hal not in HALS:
        c.error("hal", "unknown HAL %r; known: %s" % (hal, ", ".join(HALS)))
    mcu = board.get("mcu")
    if mcu is not None and mcu not in MCUS:
        c.error("mcu", "unknown MCU %r; known: %s" % (mcu, ", ".join(sorted(MCUS))))
        mcu = None
    if hal == "esp32" and board.get("mcu") is None:
        c.error("mcu", "an esp32 board must name its MCU: %s" % ", ".join(sorted(MCUS)))
    _buses(c, board, mcu)
    if mcu:
        from . import pins  # the MCU pin tables load only for boards that have pins

        pins.check(c, mcu, board)
    _sensors(c, board)
    heap = board.get("heap_kb")
    if heap is not None and (not _int(heap) or not 16 <= heap <= 4096):
        c.error("heap_kb", "expected the simulated VM's heap in KB, 16..4096, got %r" % (heap,))
    power = board.get("power")
    if power is not None:
        for k in ("active_ma", "sleep_ua", "supply_v"):
            v = power.get(k) if isinstance(power, dict) else None
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                c.error("power." + k, "expected a positive number, got %r" % (v,))
        if isinstance(power, dict):
            for part, keys in (("mcu", MCU_POWER), ("radio", RADIO_POWER), ("cell", ("mah",))):
                _figures(c, "power." + part, power.get(part), keys)
    if c.errors:
        raise BoardError("\n".join(c.errors))
    return c.warnings


def load(path):
    """(board, warnings) from a board file; BoardError if it cannot be used."""
    try:
        with open(path) as f:
            board = json.load(f)
    except OSError:
        raise BoardError("%s: cannot read the board file" % path)
    except ValueError as e:
        raise BoardError("%s: not valid JSON (%s)" % (path, e))
    return board, validate(board, path)
