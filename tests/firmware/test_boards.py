"""Board files: every one in boards/ passes the JSON schema and node/board.py; broken ones are
refused (or warned about) with a message naming the key and the fix, on CPython and MicroPython."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
BOARDS = ROOT / "boards"
FIRMWARE = ROOT / "firmware"
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_EXTMOD = ROOT / ".build/micropython/extmod"

from node import board  # noqa: E402
from node.drivers import CHIPS  # noqa: E402

SCHEMA = json.loads((BOARDS / "board.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
FILES = sorted(p for p in BOARDS.glob("*.json") if p.name != "board.schema.json")


def load(name: str) -> dict[str, Any]:
    return json.loads((BOARDS / f"{name}.json").read_text())  # type: ignore[no-any-return]


def test_schema_is_valid_and_matches_the_driver_table() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    sensor = SCHEMA["$defs"]["sensor"]
    assert sensor["properties"]["chip"]["enum"] == sorted(CHIPS)
    for rule in sensor["allOf"]:
        chip = rule["if"]["properties"]["chip"]["const"]
        _, kind, addresses, names = CHIPS[chip]
        assert rule["then"]["properties"]["measurements"]["items"]["enum"] == list(names)
        if kind == "i2c":
            assert rule["then"]["properties"]["address"]["anyOf"][0]["enum"] == list(addresses)


def test_the_boards_the_issue_asks_for_exist() -> None:
    names = {p.stem for p in FILES}
    assert {"esp32-devkitc", "unix-sim"} <= names
    mcus = {load(n).get("mcu") for n in names}
    assert {"esp32", "esp32c3", "esp32s3"} <= mcus


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_board_passes_schema_and_validator(path: Path) -> None:
    data = json.loads(path.read_text())
    assert [e.message for e in VALIDATOR.iter_errors(data)] == []
    warnings = board.validate(data, path.name)
    assert data["name"] == path.stem
    if data["hal"] == "esp32":
        assert warnings == []  # our own boards steer clear of strapping pins


def test_every_sensor_type_is_on_some_simulated_board() -> None:
    chips = {s["chip"] for p in FILES if load(p.stem)["hal"] == "unix"
             for s in load(p.stem)["sensors"]}
    assert chips == set(CHIPS)


def bad(base: str, edit: Any) -> dict[str, Any]:
    b = copy.deepcopy(load(base))
    edit(b)
    return b


def sensor(b: dict[str, Any], chip: str) -> dict[str, Any]:
    return next(s for s in b["sensors"] if s["chip"] == chip)


# (board, message expected in the error, whether the JSON schema alone catches it too)
REJECTED = [
    (bad("esp32-devkitc", lambda b: b["i2c"]["i2c0"].update(sda=7)),
     "i2c.i2c0.sda: GPIO7 is wired to the SPI flash", False),
    (bad("esp32-c3-devkitm-1", lambda b: b["uart"]["link"].update(tx=15)),
     "uart.link.tx: GPIO15 is wired to the SPI flash", False),
    (bad("esp32-s3-devkitc-1", lambda b: b["i2c"]["i2c0"].update(scl=35)),
     "GPIO35 is wired to the SPI flash/PSRAM", False),  # octal PSRAM module
    (bad("esp32-devkitc", lambda b: b["i2c"]["i2c0"].update(scl=36)),
     "GPIO36 is input-only on esp32 and cannot drive scl", False),
    (bad("esp32-devkitc", lambda b: b["i2c"]["i2c0"].update(scl=20)),
     "GPIO20 does not exist on esp32", False),
    (bad("esp32-devkitc", lambda b: b["uart"]["pm"].update(rx=21)),
     "GPIO21 is already used by i2c.i2c0.sda", False),
    (bad("esp32-devkitc", lambda b: b["adc"]["battery"].update(pin=23)),
     "GPIO23 has no ADC on esp32; ADC1 pins: GPIO32-39", False),
    (bad("esp32-devkitc", lambda b: b["i2c"]["i2c0"].pop("sda")),
     "missing: a i2c bus on esp32 needs its sda pin", False),
    (bad("esp32-devkitc", lambda b: b["uart"]["pm"].update(id=3)),
     "uart.pm.id: esp32 has UART 0..2, got 3", False),
    (bad("esp32-devkitc", lambda b: b.pop("mcu")), "an esp32 board must name its MCU", True),
    # an INA219 strapped to 0x48 lands on the sound level module
    (bad("unix-sim", lambda b: sensor(b, "ina219").update(address="0x48")),
     "sensors[5].address: 0x48 on i2c0 is already taken by sensors[4] (ina219)", False),
    (bad("unix-sim", lambda b: b["sensors"].append({"chip": "bme680", "bus": "i2c0"})),
     "unknown sensor 'bme680'; known: battery, bh1750, bme280, ina219, ina226, pcba_dbm, "
     "pms5003, scd4x, sps30", True),
    (bad("unix-sim", lambda b: sensor(b, "scd4x").pop("measurements")),
     "scd4x would publish 'humidity' as sensors[0] (bme280) does", False),
    (bad("unix-sim", lambda b: sensor(b, "bme280").update(address="0x78")),
     "bme280 answers at 0x76, 0x77, got '0x78'", True),
    (bad("unix-sim", lambda b: sensor(b, "bh1750").update(bus="battery")),
     "bh1750 is a i2c device; this board's i2c buses: i2c0", False),
    (bad("unix-sim", lambda b: sensor(b, "scd4x").update(measurements=["pm10"])),
     "scd4x measures co2, humidity, temperature, got ['pm10']", True),
    (bad("unix-sim", lambda b: sensor(b, "battery").update(address=17)),
     "battery is a adc device and has no address", True),
    (bad("unix-sim", lambda b: b.update(hal="arduino")), "unknown HAL 'arduino'", True),
    (bad("unix-sim", lambda b: b.update(heap_kb=0)), "heap_kb: expected the simulated VM", True),
    (bad("unix-sim", lambda b: b["i2c"]["i2c0"].update(freq=5)),
     "i2c.i2c0.freq: expected an integer 10000..1000000, got 5", True),
]


@pytest.mark.parametrize(("data", "message", "schema_too"), REJECTED,
                         ids=[m.split(":")[0][:40] for _, m, _ in REJECTED])
def test_broken_boards_are_refused(data: dict[str, Any], message: str, schema_too: bool) -> None:
    with pytest.raises(board.BoardError) as e:
        board.validate(data, "b.json")
    assert message in str(e.value)
    assert str(e.value).startswith("b.json: ")
    assert bool(list(VALIDATOR.iter_errors(data))) == schema_too


@pytest.mark.parametrize(("mcu_board", "pin_key", "pin", "warning"), [
    ("esp32-devkitc", ("i2c", "i2c0", "sda"), 2, "GPIO2 is a strapping pin of esp32"),
    ("esp32-c3-devkitm-1", ("i2c", "i2c0", "sda"), 9, "GPIO9 is a strapping pin of esp32c3"),
    ("esp32-s3-devkitc-1", ("i2c", "i2c0", "sda"), 46, "GPIO46 is a strapping pin of esp32s3"),
    ("esp32-c3-devkitm-1", ("uart", "link", "tx"), 19, "GPIO19 is a USB-JTAG pin"),
    ("esp32-devkitc", ("adc", "battery", "pin"), 4, "GPIO4 is an ADC2 channel"),
])
def test_risky_pins_are_warned_about(mcu_board: str, pin_key: tuple[str, str, str], pin: int,
                                     warning: str) -> None:
    kind, name, role = pin_key
    b = bad(mcu_board, lambda b: b[kind][name].update({role: pin}))
    warnings = board.validate(b, "b.json")
    assert any(warning in w for w in warnings), warnings
    assert list(VALIDATOR.iter_errors(b)) == []


def test_addresses_are_normalised_and_every_problem_is_listed() -> None:
    b = load("unix-sim")
    board.validate(b)
    assert sensor(b, "bme280")["address"] == 0x76 and sensor(b, "scd4x")["address"] == 0x62
    both = bad("esp32-devkitc", lambda b: (b["i2c"]["i2c0"].update(sda=7),
                                            b["sensors"].append({"chip": "x", "bus": "i2c0"})))
    with pytest.raises(board.BoardError) as e:
        board.validate(both, "b.json")
    assert len(str(e.value).splitlines()) == 2


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(board.BoardError, match="cannot read"):
        board.load(str(tmp_path / "none.json"))
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(board.BoardError, match="not valid JSON"):
        board.load(str(tmp_path / "x.json"))


SCRIPT = """
import json, sys
from node import board
for path in sys.argv[1:]:
    try:
        b, w = board.load(path)
        print(json.dumps({"ok": True, "warnings": w}))
    except board.BoardError as e:
        print(json.dumps({"ok": False, "error": str(e)}))
"""


@pytest.mark.micropython
def test_micropython_validates_like_cpython(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), "run `make micropython`"
    cases = list(FILES)
    for i, (data, _, _) in enumerate(REJECTED[:8]):
        p = tmp_path / f"bad{i}.json"
        p.write_text(json.dumps(data))
        cases.append(p)
    warn = bad("esp32-devkitc", lambda b: b["i2c"]["i2c0"].update(sda=2))
    (tmp_path / "warn.json").write_text(json.dumps(warn))
    cases.append(tmp_path / "warn.json")
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(script)]
                       + [str(c) for c in cases], capture_output=True, text=True, timeout=60,
                       env={"MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}"})
    assert r.returncode == 0, r.stderr + r.stdout
    got = [json.loads(line) for line in r.stdout.splitlines()]
    want = []
    for c in cases:
        try:
            _, w = board.load(str(c))
            want.append({"ok": True, "warnings": w})
        except board.BoardError as e:
            want.append({"ok": False, "error": str(e)})
    assert got == want
    assert sum(not g["ok"] for g in got) == 8 and any(g.get("warnings") for g in got)
