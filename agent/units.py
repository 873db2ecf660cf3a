"""The protocol's canonical measurement names and their SenML units (docs/protocol.md §1).

Lantern nodes leave `u` out of a record whose name is in this table and the gateway restores
it when it resolves a pack (agent/protocol.py resolve_pack), so everything downstream sees the
units as if they had been sent. The table is part of the wire protocol: append only, never
change a unit (nodes in the field rely on it), and upgrade gateways before nodes that send a
new name. docs/measurements.md lists the same table (tests/firmware/test_units.py keeps them equal).
"""

from __future__ import annotations

from types import MappingProxyType

# Units are IANA SenML registry symbols (RFC 8428 §12.1, secondary units of RFC 8798).
UNITS = MappingProxyType({
    # environment, noise, light and lamp
    "temperature": "Cel",
    "humidity": "%RH",
    "pressure": "Pa",
    "pm1": "ug/m3",
    "pm2_5": "ug/m3",
    "pm4": "ug/m3",
    "pm10": "ug/m3",
    "co2": "ppm",
    "illuminance": "lx",
    "LAeq": "dB",
    "LAmax": "dB",
    "lamp_voltage": "V",
    "lamp_current": "A",
    "lamp_power": "W",
    "battery": "V",
    # node health
    "uptime": "s",
    "heap_free": "B",
    "heap_peak": "B",
    "cycle_ms": "ms",
    "energy": "J",
    # corrections (docs/corrections.md): particulate mass corrected for humidity, beside the
    # raw value, and the provisioning offsets a node added to a reading
    "pm1_corr": "ug/m3",
    "pm2_5_corr": "ug/m3",
    "pm4_corr": "ug/m3",
    "pm10_corr": "ug/m3",
    "temperature_offset": "Cel",
    "humidity_offset": "%RH",
    "LAeq_offset": "dB",
    "LAmax_offset": "dB",
})
