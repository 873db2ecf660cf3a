"""`lantern provision` on CPython: key file edits, the exact esptool/mpremote commands, mpy-cross
output running on the MicroPython unix port, dry runs, and errors that say how to resume.

End to end against the QEMU board: hil_tests/test_provision.py.
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import stat
import subprocess
import sys
import tomllib
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from lantern.agent.cli import main as lantern
from lantern.agent.config import load_config, load_keys, write_secret
from lantern.tools.field import provision as pv
from lantern.tools.field import provision_steps as ps

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
KEY_A, KEY_B = "aa" * 32, "bb" * 32


def test_keys_text_adds_replaces_and_keeps_everything_else(tmp_path: Path) -> None:
    f = tmp_path / "keys.toml"
    write_secret(f, ps.keys_text(f, "SL-0001", bytes.fromhex(KEY_A)))
    assert load_keys(f) == {b"SL-0001": bytes.fromhex(KEY_A)}
    write_secret(f, f'# ours\n[nodes]\n"SL-0001" = "{KEY_A}"  # pole 1\n\n[other]\nx = 1\n')
    write_secret(f, ps.keys_text(f, "SL-0002", bytes.fromhex(KEY_B)))
    write_secret(f, ps.keys_text(f, "SL-0001", bytes.fromhex(KEY_B)))
    text = f.read_text()
    assert text.startswith("# ours\n") and "[other]\nx = 1" in text
    assert load_keys(f) == {b"SL-0001": bytes.fromhex(KEY_B), b"SL-0002": bytes.fromhex(KEY_B)}
    assert tomllib.loads(text)["other"] == {"x": 1}
    g = tmp_path / "no-table.toml"
    g.write_text("# nothing yet\n")
    assert tomllib.loads(ps.keys_text(g, "SL-9", bytes(32)))["nodes"] == {"SL-9": "00" * 32}


def test_esptool_commands_are_exact() -> None:
    esp32 = {"name": "esp32-devkitc", "hal": "esp32", "mcu": "esp32"}
    py = sys.executable
    assert ps.esptool_commands(esp32, "/dev/ttyUSB0", Path("mp.bin"), erase=True) == [
        [py, "-m", "esptool", "--chip", "esp32", "--port", "/dev/ttyUSB0", "erase-flash"],
        [py, "-m", "esptool", "--chip", "esp32", "--port", "/dev/ttyUSB0", "--baud", "460800",
         "write-flash", "-z", "0x1000", "mp.bin"]]
    s3 = {"name": "esp32-s3-devkitc-1", "hal": "esp32", "mcu": "esp32s3"}
    assert ps.esptool_commands(s3, "/dev/ttyACM0", Path("s3.bin"), erase=False) == [
        [py, "-m", "esptool", "--chip", "esp32s3", "--port", "/dev/ttyACM0", "--baud", "460800",
         "write-flash", "-z", "0x0", "s3.bin"]]


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A serial port with nothing on the other end (a board that is not in its bootloader)."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_flash_runs_esptool_and_says_how_to_resume(tmp_path: Path, silent_port: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "micropython.bin"
    image.write_bytes(b"\xe9" + bytes(4095))
    args = ["provision", "node", "--board", "esp32-devkitc", "--id", "SL-0042", "--port",
            silent_port, "--flash", str(image), "--keys", str(tmp_path / "keys.toml"),
            "--out", str(tmp_path / "stage")]
    argv = sys.argv
    sys.argv = ["lantern", *args]
    try:
        assert lantern(args) == 1
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    # the real esptool ran the exact command and got as far as talking to the chip
    assert "step flash failed: esptool failed (exit 2)" in err
    assert "Failed to connect to ESP32: No serial data received" in err
    assert "what to do: hold BOOT while pressing EN" in err
    assert f"resume with: lantern provision node --board esp32-devkitc --id SL-0042 --port " \
           f"{silent_port} --flash {image}" in err and err.rstrip().endswith("--from flash")
    # flashing comes first (what it does to the node decides the key): nothing made yet
    assert not (tmp_path / "keys.toml").exists() and not (tmp_path / "stage").exists()


def test_dry_run_prints_everything_and_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "mp.bin"
    code = lantern(["provision", "node", "--board", "esp32-devkitc", "--id", "SL-0042",
                    "--pole", "42", "--location", "52.37,4.89", "--port", "/dev/ttyUSB0",
                    "--flash", str(image), "--erase", "--keys", str(tmp_path / "keys.toml"),
                    "--out", str(tmp_path / "stage"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{sys.executable} -m esptool --chip esp32 --port /dev/ttyUSB0 erase-flash" in out
    assert f"write-flash -z 0x1000 {image}" in out
    assert "-m mpremote connect /dev/ttyUSB0 fs cp" in out and "fs cp -r" in out
    assert "mpy-cross -O2" in out and "[10/10] gateway" in out
    assert '[nodes."SL-0042"]' in out and "location = [52.37, 4.89]" in out
    assert "verify: skipped: the node's link is on UART1 (TX GPIO25, RX GPIO26)" in out
    assert re.search(r"if the key is new: its frame sequence starts at \d{13} or above: clock "
                     r"floor \(Unix time in ms\); no gateway queue given", out), out
    assert list(tmp_path.iterdir()) == []


def test_deploy_drops_old_frames_then_sets_the_sequence_in_one_mpremote_run() -> None:
    seq = ps.seq_script("state", 1_800_000_000_000)
    argv = ps.deploy_argv("/dev/ttyUSB0", Path("stage"), False, True, nvs_key=True, seq=seq)
    assert argv[-6:] == ["+", "exec", ps.DROP_OUTBOX, "+", "exec", seq]
    assert "n = 1800000000000\n" in seq
    assert "'state'" in seq and "os.rename(d + '/seq.tmp', d + '/seq')" in seq
    # a key the node already counts under: nothing is dropped, the sequence goes on
    kept = ps.deploy_argv("/dev/ttyUSB0", Path("stage"), False, False, nvs_key=True)
    assert "exec" not in kept


def test_compiled_firmware_loads_on_micropython(tmp_path: Path) -> None:
    """mpy-cross output of the whole node package imports and works on the 1.25 VM."""
    ns = argparse.Namespace(mpy_cross=None, dry_run=False)
    p = pv.Plan(ns, {"name": "x", "hal": "esp32"}, Path("x.json"), tmp_path, None, "mpy")
    (line,) = pv.step_compile(p, False)
    m = re.match(r"compiled (\d+) modules", line)
    assert m and int(m.group(1)) == len(list((tmp_path / "node").rglob("*.mpy"))) >= 20
    script = tmp_path / "check.py"
    script.write_text(
        "import node.cose, node.commands, node.app\n"
        "print(node.commands.__file__, node.app.FIRMWARE_VERSION)\n"
        "b = node.commands.seal(bytes(32), b'SL-1', 7, b'\\xa0', 4)\n"
        "print(node.commands.unseal(bytes(32), b, 4))\n")
    r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(script)],
                       env={"MICROPYPATH": f"{tmp_path}:{ROOT / '.build/micropython/extmod'}"},
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"{tmp_path}/node/commands.mpy 0.1.0",
                                     "(b'SL-1', 7, b'\\xa0')"]


def test_compile_refuses_a_node_of_another_micropython(tmp_path: Path) -> None:
    ns = argparse.Namespace(mpy_cross=None, dry_run=False)
    p = pv.Plan(ns, {"name": "x", "hal": "esp32"}, Path("x.json"), tmp_path, None, "mpy",
                device={"version": "1.22.2", "mpy": (6, 2), "platform": "esp32",
                        "free_kb": 1000})
    with pytest.raises(pv.StepError) as e:
        pv.step_compile(p, False)
    assert "runs MicroPython 1.22.2 (mpy 6.2)" in e.value.what and "(mpy 6.3)" in e.value.what
    assert "--mpy-cross" in e.value.fix


def test_probe_and_version_parsing() -> None:
    d = ps.parse_probe("junk\r\nLANTERN-PROBE 1.25.0 6918 qemu 2040\r\n")
    assert d == {"version": "1.25.0", "mpy": (6, 3), "platform": "qemu", "free_kb": 2040,
                 "state": "none"}
    d = ps.parse_probe("LANTERN-PROBE 1.25.0 6918 esp32 2040 key:0123456789abcdef\r\n")
    assert d["state"] == "key:0123456789abcdef"
    version = ps.mpy_cross_version(ps.find_mpy_cross())
    assert version is not None and version[0].startswith("1.25") and version[1] == (6, 3)


@pytest.mark.parametrize(("args", "what"), [
    (["--id", "SL 42"], "a node id is 1-32 letters"),
    (["--board", "esp33"], "no board 'esp33'"),
    (["--location", "52.3"], "expected LAT,LON"),
    (["--location", "152.3,4"], "out of range"),
    (["--board", "qemu-mps2-an385", "--flash", "x.bin"], "is not flashed with esptool"),
])
def test_bad_input_is_named(args: list[str], what: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--board": "esp32-devkitc", "--id": "SL-0042"}
    for k, v in zip(args[::2], args[1::2], strict=True):
        base[k] = v
    argv = ["provision", "node", *(x for kv in base.items() for x in kv), "--keys",
            str(tmp_path / "k.toml"), "--dry-run"]
    assert lantern(argv) == 1
    err = capsys.readouterr().err
    assert what in err and "what to do:" in err
    if args[:2] == ["--board", "esp33"]:
        assert "esp32-devkitc" in err  # the known boards are listed


def test_resume_command_keeps_everything_but_from() -> None:
    argv = ["provision", "node", "--id", "SL 9", "--new-key", "--from", "flash", "--dry-run"]
    assert pv.resume_command(argv, "deploy") == \
        "provision node --id 'SL 9' --dry-run --from deploy"
    assert pv.resume_command(argv, "key").endswith("--new-key --dry-run --from key")
    # a run that failed before its key step still means the new key it was asked for
    assert pv.resume_command(argv, "device").endswith("--new-key --dry-run --from device")


def test_what_the_gateway_is_told_is_a_valid_config(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_secret(keys, ps.keys_text(keys, "SL-0042", bytes(32)))
    snippet = ps.gateway_snippet("SL-0042", keys, "42", (52.37, 4.89), 60)
    table = snippet[snippet.index("[nodes"):snippet.index("then:")]
    gw = tmp_path / "gateway.toml"
    gw.write_text(f'[gateway]\nstate_dir = "{tmp_path}"\nkeys_file = "{keys}"\n'
                  f'[[links.serial]]\nport = "/dev/ttyUSB0"\n[sinks.http]\n'
                  f'url = "http://127.0.0.1:9/"\n' + table)
    cfg = load_config(gw)
    meta = cfg.nodes["SL-0042"]
    assert (meta.pole, meta.lat, meta.lon, meta.interval_s) == ("42", 52.37, 4.89, 60.0)
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
