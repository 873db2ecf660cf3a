"""Validate entities against the Smart Data Models schemas kept in tests/data (CC-BY-4.0)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

SDM = Path(__file__).parents[1] / "data" / "smart-data-models"
URLS = {
    "https://smart-data-models.github.io/data-models/common-schema.json":
        "common/common-schema.json",
    "https://smart-data-models.github.io/dataModel.Environment/Environment-schema.json":
        "common/Environment-schema.json",
    "https://raw.githubusercontent.com/smart-data-models/dataModel.Environment/master/"
    "Environment-schema.json": "common/Environment-schema.json",
    "https://smart-data-models.github.io/dataModel.Weather/weather-schema.json":
        "common/weather-schema.json",
    "https://smart-data-models.github.io/dataModel.Device/device-schema.json":
        "common/device-schema.json",
}


def _retrieve(uri: str) -> Resource:
    path = URLS.get(uri)
    if path is None:
        for model in ("AirQualityObserved", "NoiseLevelObserved", "WeatherObserved",
                      "Streetlight", "Device"):
            if uri.endswith(f"/{model}/schema.json"):
                path = f"{model}/schema.json"
    if path is None:
        raise LookupError(f"refusing to fetch {uri}: not in the offline set")
    return Resource.from_contents(json.loads((SDM / path).read_text()))


@cache
def validator(model: str) -> Draft202012Validator:
    schema = json.loads((SDM / model / "schema.json").read_text())
    return Draft202012Validator(schema, registry=Registry(retrieve=_retrieve),
                                format_checker=FormatChecker())


def errors(model: str, key_values: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}"
            for e in validator(model).iter_errors(key_values)]
