"""Build a simulated board's buses from its board file: one chip model per sensor entry."""

from node.drivers import CHIPS

from .bus import SimADC, SimI2C, SimUART
from .scenario import Scenario


def _model(chip, sc, options):
    mod = __import__("sim." + chip, None, None, ["Model"])
    return mod.Model(sc, chip, options)


def build(board, cfg, node_id, wall_ms=None):
    """(buses by name, chip time scale, scenario) for the board's sensors in a simulated street.

    cfg is the node config's "sim" block (seed, speed, chip_speed, anchor_ms, start_s, tz_h,
    sunrise_h, sunset_h, faults); see docs/sensors.md.
    """
    sc = Scenario(cfg, node_id, wall_ms)
    buses = {}
    chips = set()
    for name in board.get("i2c", {}):
        buses[name] = SimI2C(sc, name)
    for spec in board.get("sensors", ()):
        chip = spec["chip"]
        kind = CHIPS[chip][1]
        bus = spec["bus"]
        options = dict(spec.get("options", {}))
        model = _model(chip, sc, options)
        chips.add(chip)
        if kind == "i2c":
            address = spec.get("address", CHIPS[chip][2][0])
            if isinstance(address, str):
                address = int(address, 16)
            buses[bus].attach(address, model)
        elif kind == "uart":
            buses[bus] = SimUART(sc, model)
        else:
            buses[bus] = SimADC(sc, model)
    for i, (chip, kind, _, _, _) in enumerate(sc.faults):
        if chip in ("lamp", "node"):
            if chip == "lamp" and not chips & {"ina219", "ina226"}:
                raise ValueError("sim.faults[%d]: a lamp fault needs a lamp meter (ina219 or "
                                 "ina226) on the board" % i)
            continue
        if chip != "bus" and chip not in chips:
            raise ValueError("sim.faults[%d].chip: %r is not on this board (%s, or 'bus')" % (
                i, chip, ", ".join(sorted(chips))))
        if kind == "crc" and chip != "bus" and not _model(chip, sc, {}).CRC:
            raise ValueError("sim.faults[%d]: %s has no CRC or checksum; a corrupted byte "
                             "would go unnoticed (use nack, slow, stuck or unplug)" % (i, chip))
    return buses, sc.chip_speed, sc
