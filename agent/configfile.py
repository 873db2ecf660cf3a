"""A TOML config file that can say on which line a key stands: what every section's parser reads.

`Doc.get` checks a key's type and bounds, `Doc.only` refuses a key its table does not know,
and every error names the file, the line, the dotted key and what was expected.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError

MAX_BYTES = 1 << 20  # a config or key file is a few KiB; refuse what cannot be one


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def toml_string(text: object) -> str:
    """text (a path, an id) as a TOML basic string, for the configs Lantern writes: quote,
    backslash and control characters (DEL too) escaped; other characters as they are."""
    text = str(text)
    return '"' + "".join(
        _TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c)
        for c in text) + '"'


def one_of(names: list[str]) -> str:
    """'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class Doc:
    """A parsed TOML file that can say on which line a key stands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)  # /dev/zero, or a log saved over the config
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        if len(raw) > MAX_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_BYTES >> 20} MiB, too large for a "
                              "Lantern config file; check the path")
        try:
            self.text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                              "save the file as UTF-8") from None
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid TOML for Lantern: arrays or tables nested "
                              "too deep") from None
        except ValueError as e:  # an integer of over 4300 digits: Python's own limit
            raise ConfigError(f"{path}: not valid TOML for Lantern: {str(e).split(':')[0]}"
                              ) from None

    def _lines(self) -> dict[str, int]:
        """Dotted path (tables of arrays indexed, like links.serial[1].baud) → its line."""
        where: dict[str, int] = {}
        table = ""
        counts: dict[str, int] = {}
        for i, line in enumerate(self.text.splitlines(), 1):
            m = re.match(r"\s*\[\[\s*([^\]]+?)\s*\]\]", line)
            if m:
                name = m.group(1)
                counts[name] = counts.get(name, -1) + 1
                table = f"{name}[{counts[name]}]"
                where.setdefault(name, i)
                where[table] = i
                continue
            m = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
            if m:
                table = m.group(1).replace('"', "")
                where.setdefault(table, i)
                continue
            m = re.match(r'\s*(?:"([^"]*)"|([A-Za-z0-9_-]+))\s*=', line)
            if m:
                key = m.group(1) if m.group(1) is not None else m.group(2)
                where.setdefault(f"{table}.{key}" if table else key, i)
        return where

    def line_of(self, key: str) -> int | None:
        """The key's line, or else the line of the nearest table that holds it."""
        where = self._lines()
        while key:
            if key in where:
                return where[key]
            key = key.rsplit(".", 1)[0] if "." in key else ""
        return None

    def error(self, key: str, msg: str) -> ConfigError:
        line = self.line_of(key)
        where = f"{self.path} line {line}" if line else str(self.path)
        return ConfigError(f"{where}: {key}: {msg}")

    def only(self, table: dict[str, Any], dotted: str, known: Iterable[str]) -> None:
        """Refuse a key the table does not know (a typo must not run on a default)."""
        known = sorted(known)
        for k in table:
            if k not in known:
                raise self.error(f"{dotted}.{k}", f"unknown key; expected {one_of(known)}")

    def table(self, parent: dict[str, Any], key: str, dotted: str, known: Iterable[str],
              default: Any = ...) -> dict[str, Any]:
        """A sub-table that may hold only the known keys."""
        t: dict[str, Any] = self.get(parent, key, dotted, dict, default)
        self.only(t, dotted, known)
        return t

    def get(self, table: dict[str, Any], key: str, dotted: str, kind: type | tuple[type, ...],
            default: Any = ..., check: Any = None, fix: str = "") -> Any:
        if key not in table:
            if default is ...:
                raise self.error(dotted, f"missing; {fix}" if fix else "missing")
            return default
        value = table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(dotted, f"expected {_describe(kind)}, got {value!r}")
        # an int taken where a float is: the caller converts it, so it must fit in one
        if isinstance(value, int) and not isinstance(value, bool) and float in _kinds(kind):
            try:
                float(value)
            except OverflowError:
                raise self.error(dotted, f"a {len(str(value))}-digit number is too large; "
                                 f"expected {_describe(kind)}") from None
        if check is not None:
            problem = check(value)
            if problem:
                raise self.error(dotted, problem)
        return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return (kind,) if isinstance(kind, type) else kind


def _describe(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _kinds(kind))


def positive(v: float) -> str | None:
    """A count, a size or a duration: above 0 and finite (TOML has inf; nothing here is)."""
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an int no float holds
        return f"must be a finite number > 0, got a {len(str(v))}-digit number"
    return None if v > 0 and finite else f"must be a finite number > 0, got {v!r}"
