"""SensorThings terms: UCUM units, ObservedProperty definitions and sensor families for our
measurements, OData string literals, and the @iot.id a server gives a created entity."""

from __future__ import annotations

import json
import re
from urllib.parse import urljoin, urlsplit

from ..config import shown_url
from .http import SHOWN_MAX, DeliveryError

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


ID_MAX = 2 ** 63  # a numeric @iot.id fits a signed 64-bit integer (FROST's and SQL's ids)
_ID_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:-]{0,127}")  # a UUID, a name: nothing more


def checked_id(value: object) -> int | str | None:
    """An @iot.id the sink can use: an int of bounded size or a short, plain string; else None.

    18-088 §8.2 leaves an id's type to the server: a number or a string. Anything else (an
    object, a list, a boolean, a 5000-digit number, text holding quotes or slashes) is a
    server's answer the sink cannot put in a URL, a cache or a JSON link safely.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -ID_MAX < value < ID_MAX else None
    if isinstance(value, str) and _ID_TEXT.fullmatch(value):
        return value
    return None


def entity_id(location: str | None, body: bytes, collection: str) -> int | str:
    """The @iot.id of a created entity: from the 201's Location header, or else the body.

    `collection` is the URL the entity was POSTed to: a Location elsewhere (another entity
    set, another host) does not name the entity created, and is refused.
    """
    if location:
        where = urlsplit(urljoin(collection, location))
        home = urlsplit(collection)
        m = re.fullmatch(re.escape(home.path.rstrip("/")) + r"\(([^()/]{1,130})\)/?", where.path)
        if (where.scheme, where.netloc) != (home.scheme, home.netloc) or not m:
            raise DeliveryError("SensorThings server created an entity but its Location "
                                f"points elsewhere than {shown_url(collection)}(…): "
                                f"{shown_url(urljoin(collection, location))[:SHOWN_MAX]}")
        raw = m.group(1)
        ident: object = raw
        if re.fullmatch(r"-?[0-9]+", raw):  # a number, never read past 64 bits
            ident = int(raw) if len(raw) <= 20 else None
        elif len(raw) >= 2 and raw[0] == raw[-1] == "'":
            ident = raw[1:-1].replace("''", "'")
        return _usable(ident, "in its Location")
    try:
        ident = json.loads(body)["@iot.id"]
    except (ValueError, TypeError, KeyError, IndexError):
        raise DeliveryError("SensorThings server created an entity but said neither its "
                            "Location nor its @iot.id") from None
    return _usable(ident, "as its @iot.id")


def _usable(ident: object, where: str) -> int | str:
    checked = checked_id(ident)
    if checked is None:
        raise DeliveryError(f"SensorThings server created an entity but gave {where} an id no "
                            "client can use (a number below 2**63 or a short plain string, "
                            f"OGC 18-088 §8.2): {str(ident)[:40]!r}")
    return checked
