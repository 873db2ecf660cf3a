"""Third review, the way Lantern is installed and used from a shell: packaging/install.sh,
`lantern sim`, and the field tools' output. Each test is a finding: it fails on the tree it was
written on for the reason its docstring gives, and asserts what should happen instead.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from lantern.tools.field.diag_view import render_node, render_self_test
from lantern.tools.field.provision_steps import gateway_snippet

ROOT = Path(__file__).resolve().parents[2]
LANTERN = [sys.executable, "-m", "lantern"]


# ---- install.sh --------------------------------------------------------------------------------


def test_uninstall_with_prefix_set_to_a_shared_folder_removes_only_lantern(
        tmp_path: Path) -> None:
    """install.sh takes PREFIX= ('where the releases go', default /opt/lantern) and lays out
    PREFIX/releases, PREFIX/current and PREFIX/bin, then `--uninstall` runs
    `rm -rf "$DESTDIR$PREFIX"`. An operator who reads PREFIX as a parent folder, as most
    installers mean it (PREFIX=/opt, PREFIX=/usr/local), gets a working install — and the
    uninstall deletes every other program in /opt or /usr/local. Run here under DESTDIR, as
    packaging and tests/tools/test_dist.py run it."""
    root = tmp_path / "root"
    other = root / "opt" / "vendor-app" / "bin" / "vendor-app"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\n")
    mine = root / "opt" / "releases" / "0.1.0-abcdef01"  # what an install with PREFIX=/opt made
    mine.mkdir(parents=True)
    (root / "opt" / "current").symlink_to("releases/0.1.0-abcdef01")
    r = subprocess.run(["bash", str(ROOT / "packaging" / "install.sh"), "--uninstall"],
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], "DESTDIR": str(root), "PREFIX": "/opt"})
    assert other.exists(), f"uninstall removed another program in /opt: {r.stdout}{r.stderr}"


# ---- lantern sim -------------------------------------------------------------------------------


def sim(tmp: Path, *args: str, preexec_fn: Callable[[], None] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LANTERN, "sim", "--seconds", "1", *args], capture_output=True,
                          text=True, timeout=60, cwd=tmp, preexec_fn=preexec_fn)


def one_line(r: subprocess.CompletedProcess[str]) -> None:
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-600:]
    assert r.returncode == 2, (r.returncode, out[-600:])


@pytest.mark.parametrize("args", [
    ["--interval", "nan"],
    ["--interval", "inf"],
    ["--interval", "0.0001"],
    ["--dir", "a-file"],
], ids=["nan", "inf", "rounds-to-0-ms", "dir-is-a-file"])
def test_lantern_sim_refuses_bad_values_in_one_line(tmp_path: Path, args: list[str]) -> None:
    """tools/street/command.py main checks only `interval <= 0`: nan passes it and dies in
    int(nan * 1000) (ValueError), inf in OverflowError, and 0.0001 s becomes interval_ms = 0 — a
    street of nodes that seal frames as fast as MicroPython runs (170 in 3 s each) into their
    outboxes and logs. --dir naming a file dies in mkdir with FileExistsError. All tracebacks or
    a runaway street instead of one line, exit 2."""
    (tmp_path / "a-file").write_text("")
    one_line(sim(tmp_path, *args))


def test_lantern_sim_beyond_the_open_file_limit_says_so(tmp_path: Path) -> None:
    """Each node takes two pseudo-terminals (four descriptors) before anything starts: past
    `ulimit -n`, Python's pty module reports EMFILE as OSError('out of pty devices') and that
    comes out as a traceback — and names the wrong cause."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    r = sim(tmp_path, "--nodes", "50", "--dir", "street", preexec_fn=low_limit)
    one_line(r)
    assert "out of pty devices" not in r.stdout + r.stderr


# ---- what field tools print --------------------------------------------------------------------


def node_report(pole: str) -> dict[str, object]:
    return {"identity": {"id": "SL-0001", "firmware": "0.1.0", "board": "unix-sim",
                         "verified": True},
            "status": {"cfg": {"interval_ms": 60000, "max_frames": 100, "pole": pole},
                       "sensors": [["bme280", 1]]},
            "clock_offset_ms": 0, "rtt_ms": 3, "problems": []}


@pytest.mark.parametrize("pole", ["Main St [north]", "A12 [/] B"])
def test_diag_node_status_prints_the_nodes_text_as_it_is(pole: str) -> None:
    """tools/field/diag_view.py render_node (and render_self_test) hand rich Table cells plain
    str, which rich reads as markup: the pole an installer gave (`provision --pole`), sensor
    names and a sensor's self-test error come from the node. 'Main St [north]' is shown as
    'Main St', and a pole with '[/]' in it makes `lantern diag node status` die with
    rich.errors.MarkupError — the technician gets a traceback instead of the node's status.
    (ffafaab escaped the gateway report only.)"""
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    try:
        console.print(render_node(node_report(pole)))
        console.print(render_self_test([{"name": "bme280", "ok": False,
                                         "error": f"no answer at pole {pole}"}]))
        text = console.export_text()
    finally:
        console.file.close()
    assert f"pole {pole}," in text and f"no answer at pole {pole}" in text, text


def test_provision_gateway_snippet_is_valid_toml_for_any_pole() -> None:
    """tools/field/provision_steps.py gateway_snippet writes `pole = "{pole}"` unescaped: a pole
    with a quote or a backslash in it (`--pole 'Mast 12 "B"'`, `--pole 'A\\12'`) gives the
    installer a [nodes] table to paste that is not TOML, or that says something else."""
    pole = 'Mast 12 "B" \\ east'
    text = gateway_snippet("SL-0001", Path("keys.toml"), pole, None, 60.0)
    lines = text.splitlines()
    start = lines.index('[nodes."SL-0001"]')
    end = lines.index("", start)
    try:
        doc = tomllib.loads("\n".join(lines[start:end]))
    except tomllib.TOMLDecodeError as e:
        pytest.fail(f"the snippet is not TOML ({e}):\n" + "\n".join(lines[start:end]))
    assert doc["nodes"]["SL-0001"]["pole"] == pole
