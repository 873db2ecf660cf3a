"""MCU pin facts and the board-file pin checks (node/board.py loads this for boards with pins)."""


def _r(a, b):
    return tuple(range(a, b + 1))


# Pin facts per MCU, from Espressif's datasheets: GPIOs that exist, the ones wired to the
# module's SPI flash (or octal PSRAM), strapping pins, input-only pins, ADC1 channels (ADC2 is
# shared with Wi-Fi and cannot be read while it runs), USB-JTAG pins.
MCUS = {
    "esp32": {"gpio": _r(0, 19) + _r(21, 23) + _r(25, 27) + _r(32, 39), "flash": _r(6, 11),
              "strapping": (0, 2, 5, 12, 15), "input_only": _r(34, 39), "adc1": _r(32, 39),
              "adc2": (0, 2, 4, 12, 13, 14, 15, 25, 26, 27), "usb": (), "uarts": 3, "i2cs": 2},
    "esp32c3": {"gpio": _r(0, 21), "flash": _r(12, 17), "strapping": (2, 8, 9),
                "input_only": (), "adc1": _r(0, 4), "adc2": (5,), "usb": (18, 19), "uarts": 2,
                "i2cs": 1},
    "esp32s3": {"gpio": _r(0, 21) + _r(26, 48), "flash": _r(26, 32), "octal": _r(33, 37),
                "strapping": (0, 3, 45, 46), "input_only": (), "adc1": _r(1, 10),
                "adc2": _r(11, 20), "usb": (19, 20), "uarts": 3, "i2cs": 2},
}
# which pins of a bus drive the line (must be outputs) and which only listen
_OUT_PINS = {"i2c": ("sda", "scl"), "uart": ("tx",), "adc": ()}
_IN_PINS = {"i2c": (), "uart": ("rx",), "adc": ("pin",)}


def check(c, mcu, board):
    """Check every pin the buses use; record errors and warnings on c (board._Check)."""
    facts = MCUS[mcu]
    forbidden = facts["flash"] + (facts.get("octal", ()) if board.get("octal_psram") else ())
    used = {}
    for kind in ("i2c", "uart", "adc"):
        for name, spec in board.get(kind, {}).items():
            if kind != "adc" and isinstance(spec.get("id"), int):
                limit = facts["i2cs" if kind == "i2c" else "uarts"]
                if spec["id"] >= limit:
                    c.error("%s.%s.id" % (kind, name), "%s has %s 0..%d, got %d" % (
                        mcu, kind.upper(), limit - 1, spec["id"]))
            for role in _OUT_PINS[kind] + _IN_PINS[kind]:
                key = "%s.%s.%s" % (kind, name, role)
                pin = spec.get(role)
                if pin is None:
                    c.error(key, "missing: a %s bus on %s needs its %s pin" % (kind, mcu, role))
                    continue
                if not isinstance(pin, int) or isinstance(pin, bool) or pin not in facts["gpio"]:
                    c.error(key, "GPIO%s does not exist on %s" % (pin, mcu))
                    continue
                if pin in forbidden:
                    c.error(key, "GPIO%d is wired to the SPI flash/PSRAM on %s modules; pick "
                                 "another pin" % (pin, mcu))
                    continue
                if pin in used:
                    c.error(key, "GPIO%d is already used by %s" % (pin, used[pin]))
                used[pin] = key
                if pin in facts["strapping"]:
                    c.warn(key, "GPIO%d is a strapping pin of %s: keep its boot level (no "
                                "pull against it) or the chip may not boot" % (pin, mcu))
                if pin in facts["usb"]:
                    c.warn(key, "GPIO%d is a USB-JTAG pin of %s: USB flashing and the REPL "
                                "over USB stop working" % (pin, mcu))
                if role in _OUT_PINS[kind] and pin in facts["input_only"]:
                    c.error(key, "GPIO%d is input-only on %s and cannot drive %s" % (
                        pin, mcu, role))
                if kind == "adc":
                    if pin in facts["adc2"]:
                        c.warn(key, "GPIO%d is an ADC2 channel: unreadable while Wi-Fi is on; "
                                    "prefer ADC1 (%s)" % (pin, _span(facts["adc1"])))
                    elif pin not in facts["adc1"]:
                        c.error(key, "GPIO%d has no ADC on %s; ADC1 pins: %s" % (
                            pin, mcu, _span(facts["adc1"])))


def _span(pins):
    return "GPIO%d-%d" % (pins[0], pins[-1])
