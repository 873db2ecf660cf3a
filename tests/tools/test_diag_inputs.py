"""`lantern diag` given what a technician mistypes or a machine lacks: one line, no traceback.

Each case was a traceback or a wrong message when tried as a user would (issue 20): a
set-interval value was checked only after the port opened, the unreachable-gateway message
lost its `[api]` to the terminal's markup, and `--ble` on a machine without BlueZ died in
D-Bus with FileNotFoundError.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from lantern.tools.field import diag_gateway as dg
from lantern.tools.field.diag_ble import BleTransport
from lantern.tools.field.nodelink import DiagError

LANTERN = [sys.executable, "-m", "lantern"]


@pytest.mark.parametrize(("action", "value", "says"), [
    ("set-interval", "abc", "set-interval needs seconds"),
    ("set-interval", "inf", "set-interval needs seconds"),
    ("identify", "1.5", "identify takes whole seconds"),
])
def test_a_bad_value_is_refused_before_the_port_is_opened(tmp_path: Path, action: str,
                                                          value: str, says: str) -> None:
    port = tmp_path / "ttyUSB-nonesuch"  # were it opened first, the error would name it
    r = subprocess.run([*LANTERN, "diag", "node", action, value, "--port", str(port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("lantern diag: ")
    assert says in r.stderr and str(port) not in r.stderr and "Traceback" not in r.stderr


def test_the_unreachable_message_keeps_its_brackets() -> None:
    rep = dg.unreachable("http://127.0.0.1:9/",
                         "no gateway API at http://127.0.0.1:9/: is [api] enabled, and on this "
                         "host and port?")
    console = Console(record=True, width=200, color_system=None)
    dg.render(rep, console)
    text = console.export_text()
    assert "is [api] enabled, and on this host and port?" in text, text


def test_names_from_the_gateway_are_not_markup() -> None:
    """A node id or link name with brackets (the gateway's text) prints as it is."""
    rep: dict[str, Any] = {
        "state": "degraded", "url": "http://h/[x]", "problems": ["[bold]not bold[/bold]"],
        "summary": "1/1 [nodes]", "nodes": [{"id": "SL-[1]", "age_s": 1.0, "link": "[red]",
                                             "last_seq": 1, "outbox": 0, "battery": None,
                                             "gaps": 0, "gap_s": 0, "flags": []}],
        "queue": {"readings": 0, "bytes": 0, "oldest_age_s": None},
        "upstream": {"http[0]": {"state": "ok"}}, "links": [{"name": "serial [a]", "up": True}],
        "rejections": {}, "notes": ["[link]"]}
    console = Console(record=True, width=200, color_system=None)
    dg.render(rep, console)
    text = console.export_text()
    for shown in ("http://h/[x]", "[bold]not bold[/bold]", "1/1 [nodes]", "SL-[1]", "[red]",
                  "http[0] ok", "serial [a] up", "[link]"):
        assert shown in text, (shown, text)


class NoBlueZ:
    """A bleak scanner backend on a machine without BlueZ: D-Bus's socket is missing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    async def stop(self) -> None:
        pass


async def test_ble_without_bluez_says_so_in_one_line() -> None:
    t = BleTransport("SL-0042", scan_s=1, backend=(NoBlueZ, None))
    with pytest.raises(DiagError) as e:
        await t.open()
    msg = str(e.value)
    assert "Bluetooth is not usable on this machine" in msg and "BlueZ" in msg, msg
    assert "\n" not in msg
