"""The port models offer only what micropython-esp32-stubs says the esp32 port has."""

from __future__ import annotations

from pathlib import Path

import pytest

from .stubcheck import check
from .twin import PORT

MODELS = sorted(p for p in PORT.glob("*.py") if not p.name.startswith("_"))


def test_every_port_module_is_a_model_of_an_esp32_module() -> None:
    assert {p.stem for p in MODELS} >= {"machine", "esp32", "time", "select"}


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
def test_model_matches_the_stubs(model: Path) -> None:
    assert check(model.stem, model.read_text()) == []


def test_the_check_fails_on_what_the_port_does_not_have() -> None:
    # made-up names, a wrong constant, a keyword the port does not take, a wrong default
    source = (PORT / "machine.py").read_text() + '''

def frobnicate():
    pass


WDT_RESET = 9
NOT_A_CONSTANT = 1


class WDT:
    def __init__(self, *, id=0, timeout=5000, window=0):
        pass

    def starve(self):
        pass


class RTC:
    def memory(self, data=None, extra=None):
        pass


def reset_cause(which=0):
    pass
'''
    problems = check("machine", source)
    for expected in ("machine.frobnicate: no such function",
                     "machine.WDT_RESET = 9: the port has 3",
                     "machine.NOT_A_CONSTANT: no such constant",
                     "machine.WDT.__init__: keyword 'window'",
                     "machine.WDT.starve: no such function",
                     "machine.RTC.memory:",
                     "machine.reset_cause: parameter 'which'"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    assert check("frobnicate", "X = 1") == [
        "frobnicate: no stub frobnicate.pyi in micropython-esp32-stubs"]
