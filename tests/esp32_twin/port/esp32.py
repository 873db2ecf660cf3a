"""The esp32 port's `esp32` module: NVS, in files of the twin's flash (kept through everything).

As the port (ports/esp32/esp32_nvs.c, ESP-IDF nvs): values set are held until commit(); a
missing key raises OSError(-ESP_ERR_NVS_NOT_FOUND); get_blob into a buffer too small for the
value raises OSError(-ESP_ERR_NVS_INVALID_LENGTH). Keys are at most 15 characters.
"""
# ruff: noqa: UP031, SIM105 - MicroPython: no f-strings in ports, no contextlib


import os as _os

import _twin

_NOT_FOUND = -0x1102
_INVALID_LENGTH = -0x110C
_KEY_TOO_LONG = -0x1109  # ESP_ERR_NVS_KEY_TOO_LONG


class NVS:
    def __init__(self, namespace):
        self._ns = namespace
        self._pending = {}

    def _file(self, key):
        if len(key) > 15:
            raise OSError(_KEY_TOO_LONG)
        try:
            _os.mkdir(_twin.path("nvs"))
        except OSError:
            pass
        return "nvs/%s.%s" % (self._ns, key)

    def _get(self, key, kind):
        f = self._file(key)
        raw = self._pending.get(f)
        if raw is None:
            raw = _twin.read(f)
        if raw is None or raw[:1] != kind:
            raise OSError(_NOT_FOUND)
        return raw[1:]

    def set_i32(self, key, value):
        if not -0x80000000 <= value <= 0x7FFFFFFF:
            raise OverflowError("overflow converting long int to machine word")
        self._pending[self._file(key)] = b"i%d" % value

    def get_i32(self, key):
        return int(self._get(key, b"i"))

    def set_blob(self, key, value):
        self._pending[self._file(key)] = b"b" + bytes(value)

    def get_blob(self, key, buffer):
        data = self._get(key, b"b")
        if len(data) > len(buffer):
            raise OSError(_INVALID_LENGTH)
        buffer[: len(data)] = data
        return len(data)

    def erase_key(self, key):
        f = self._file(key)
        if f not in self._pending and _twin.read(f) is None:
            raise OSError(_NOT_FOUND)
        self._pending[f] = b"-"

    def commit(self):
        for f, raw in self._pending.items():
            if raw == b"-":
                try:
                    _os.remove(_twin.path(f))
                except OSError:
                    pass
            else:
                _twin.write(f, raw)
        self._pending = {}
