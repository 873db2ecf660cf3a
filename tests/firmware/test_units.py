"""The canonical unit table (agent/units.py): one table, the docs and the firmware agree with it.

Nodes leave the unit out for these names and the gateway restores it (docs/protocol.md §1),
so the table is wire protocol: names are added, never removed, and units never change.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lantern.agent import ngsi
from lantern.agent.units import UNITS

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "firmware"))

from tests.ble import mpcompat  # noqa: E402

mpcompat.install()  # node.app reads time.ticks_ms at import: MicroPython's time, on CPython

from node import app, drivers  # noqa: E402

# The table as protocol version 2 released it. Nodes in the field rely on every entry: this
# may only grow (add the new names here too), and a unit here may never change.
RELEASED_V2 = {
    "temperature": "Cel", "humidity": "%RH", "pressure": "Pa", "pm1": "ug/m3",
    "pm2_5": "ug/m3", "pm4": "ug/m3", "pm10": "ug/m3", "co2": "ppm", "illuminance": "lx",
    "LAeq": "dB", "LAmax": "dB", "lamp_voltage": "V", "lamp_current": "A", "lamp_power": "W",
    "battery": "V", "uptime": "s", "heap_free": "B", "heap_peak": "B", "cycle_ms": "ms",
    "energy": "J",
}
# SenML units registry (RFC 8428 §12.1) and its secondary units (RFC 8798) used here
REGISTERED = {"Cel", "%RH", "Pa", "ug/m3", "ppm", "lx", "dB", "V", "A", "W", "s", "ms", "B",
              "J", "hPa", "m", "kg", "Hz", "%", "K", "lm", "mV", "mA", "kW", "kWh", "Wh"}
UNITLESS = {"outbox"}  # a count; "<name>.q" quality flags are unitless too


def doc_tables() -> dict[str, str]:
    """Every `name` | `unit` row of docs/measurements.md's tables."""
    text = (ROOT / "docs/measurements.md").read_text()
    return dict(re.findall(r"^\| `([A-Za-z0-9_]+)` \| `([^`]+)` \|", text, re.M))


def test_released_entries_never_change():
    assert {k: UNITS.get(k) for k in RELEASED_V2} == RELEASED_V2


def test_units_are_registered_senml_symbols():
    assert set(UNITS.values()) <= REGISTERED


def test_measurements_doc_lists_the_table():
    doc = doc_tables()
    assert doc == dict(UNITS)
    assert "| `outbox` | (none) |" in (ROOT / "docs/measurements.md").read_text()


def test_every_firmware_measurement_is_canonical():
    """A driver's name outside the table would travel without a unit and arrive without one."""
    names = {n for *_, ms in drivers.CHIPS.values() for n in ms}
    assert names <= set(UNITS)
    assert not set(app.EXTRA_UNITS) & set(UNITS)  # a canonical name never sends its unit


def test_ngsi_mapping_assumes_the_canonical_units():
    """NGSI-LD unit codes (UN/CEFACT) and conversions are those of the table's units."""
    code = {"Cel": "CEL", "%RH": "C62", "Pa": "A97", "lx": "LUX", "ug/m3": "GQ", "ppm": "59",
            "dB": "2N", "W": "WTT", "V": "VLT", "A": "AMP", "s": "SEC", "B": "AD"}
    for name, attr in ngsi.ATTRS.items():
        assert code[UNITS[name]] == attr.unit_code, name
    for name, (_, unit_code) in ngsi.HEALTH.items():
        assert (name in UNITLESS and unit_code is None) or code[UNITS[name]] == unit_code, name
    # the two conversions: %RH → 0..1 and Pa → hPa
    assert ngsi.ATTRS["humidity"].convert(50.0) == 0.5
    assert ngsi.ATTRS["pressure"].convert(101325) == 1013.25
