"""INA219 model (see ina2xx.py)."""

from .ina2xx import INA219Model as Model  # noqa: F401
