"""SensorThings terms: UCUM units, ObservedProperty definitions and sensor families for our
measurements, OData string literals, and the @iot.id a server gives a created entity."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from .http import DeliveryError

# SenML unit (IANA registry) → (UCUM case-sensitive code, its name). 18-088's Datastream:
# the unitOfMeasurement's values SHOULD follow UCUM; `symbol` carries the c/s code.
UNITS: dict[str, tuple[str, str]] = {
    "Cel": ("Cel", "degree Celsius"), "%RH": ("%", "percent"), "%": ("%", "percent"),
    "Pa": ("Pa", "pascal"), "ug/m3": ("ug/m3", "microgram per cubic metre"),
    "ppm": ("[ppm]", "part per million"), "lx": ("lx", "lux"), "dB": ("dB", "decibel"),
    "V": ("V", "volt"), "A": ("A", "ampere"), "W": ("W", "watt"), "J": ("J", "joule"),
    "s": ("s", "second"), "ms": ("ms", "millisecond"), "B": ("By", "byte"),
    "m": ("m", "metre"), "m/s": ("m/s", "metre per second"), "Hz": ("Hz", "hertz"),
}
# measurements whose UCUM unit says more than the SenML one: sound pressure levels are bels
# of sound pressure re 20 uPa (UCUM B[SPL]); a count of frames is an annotated 1
UNIT_OVERRIDE = {"LAeq": ("dB[SPL]", "decibel (A-weighted sound pressure level)"),
                 "LAmax": ("dB[SPL]", "decibel (A-weighted sound pressure level)"),
                 "outbox": ("{frames}", "frames")}
# measurements whose value covers the interval before its time (phenomenonTime is a period)
PERIOD = {"LAeq", "LAmax", "energy"}

_CF = "https://cfconventions.org/Data/cf-standard-names/current/build/cf-standard-name-table.html#"
_EEA = "http://dd.eionet.europa.eu/vocabulary/aq/pollutant/"
_QUDT = "http://qudt.org/vocab/quantitykind/"
# measurement → (ObservedProperty definition URI, description); others: urn:lantern:measurement:
OBSERVED = {
    "temperature": (_CF + "air_temperature", "air temperature"),
    "humidity": (_CF + "relative_humidity", "relative humidity"),
    "pressure": (_CF + "air_pressure", "station air pressure (not reduced to sea level)"),
    "pm1": (_EEA + "6002", "PM1 mass concentration"),
    "pm2_5": (_EEA + "6001", "PM2.5 mass concentration"),
    "pm10": (_EEA + "5", "PM10 mass concentration"),
    "co2": (_EEA + "71", "carbon dioxide mole fraction"),
    "illuminance": (_QUDT + "Illuminance", "illuminance on the upward-facing sensor"),
    "lamp_voltage": (_QUDT + "Voltage", "the luminaire's supply voltage"),
    "lamp_current": (_QUDT + "ElectricCurrent", "the luminaire's current"),
    "lamp_power": (_QUDT + "Power", "the luminaire's power"),
}
# measurement → the sensor family that measures it (one Sensor per node and family)
FAMILY = {"temperature": "climate", "humidity": "climate", "pressure": "climate",
          "pm1": "particulate", "pm2_5": "particulate", "pm4": "particulate",
          "pm10": "particulate", "co2": "co2", "LAeq": "sound", "LAmax": "sound",
          "illuminance": "light", "lamp_voltage": "lamp", "lamp_current": "lamp",
          "lamp_power": "lamp", "battery": "battery"}
FAMILIES = {"climate": "BME280 temperature, humidity and pressure sensor",
            "particulate": "particulate matter sensor (Sensirion SPS30 or Plantower PMS5003)",
            "co2": "Sensirion SCD4x CO2 sensor", "sound": "A-weighted sound level module",
            "light": "ambient light sensor (BH1750 or VEML7700)",
            "lamp": "luminaire power monitor (INA219 or INA226)",
            "battery": "backup cell voltage (ADC through a divider)",
            "node": "the Lantern node's own firmware (health)"}


def literal(text: str) -> str:
    """An OData string literal: single quotes doubled (OData ABNF, SQUOTE-in-string)."""
    return "'" + text.replace("'", "''") + "'"


def entity_id(location: str | None, body: bytes) -> Any:
    """The @iot.id of a created entity: from the 201's Location header, or else the body."""
    if location:
        m = re.search(r"\(([^()]*)\)/?$", urlsplit(location).path)
        if m:
            raw = m.group(1)
            if re.fullmatch(r"-?[0-9]+", raw):
                return int(raw)
            if len(raw) >= 2 and raw[0] == raw[-1] == "'":
                return raw[1:-1].replace("''", "'")
    try:
        return json.loads(body)["@iot.id"]
    except (ValueError, TypeError, KeyError):
        raise DeliveryError("SensorThings server created an entity but said neither its "
                            "Location nor its @iot.id") from None
