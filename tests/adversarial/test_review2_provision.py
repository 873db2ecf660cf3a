"""Second review (2026-12), provisioning, keys and counters: findings 4 and 6 of the first review,
attacked where their fixes meet resumed runs, replacement boards, backups and deleted state.

The whole `lantern provision node` runs as in tests/adversarial/test_provision_seq.py: its
esptool and mpremote runs act on a directory standing for the board's flash, their scripts run on
the MicroPython unix port there, and the node's firmware boots on that flash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.config import load_keys, write_secret
from lantern.tools.field import nodelink
from lantern.tools.field import provision as pv
from lantern.tools.field import provision_steps as ps
from lantern.tools.street.sim import gateway_toml
from tests.helpers.flash import Flash

from .gateway_harness import RecordingLink, ingest_running

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
NODE = "SL-0042"
KID = NODE.encode()
T_NEW = 1_767_312_000


def _args(tmp: Path, *extra: str) -> argparse.Namespace:
    image = tmp / "micropython.bin"
    image.write_bytes(b"\xe9" + bytes(4095))
    parser = argparse.ArgumentParser()
    pv.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args([
        "provision", "node", "--board", "esp32-devkitc", "--id", NODE, "--port", "/dev/ttyUSB0",
        "--firmware", "frozen", "--out", str(tmp / "stage"), "--keys", str(tmp / "keys.toml"),
        *[str(tmp / "micropython.bin") if a == "IMAGE" else a for a in extra]])


def provision(tmp: Path, flash: Flash, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str], *extra: str,
              run: Callable[..., str] | None = None) -> tuple[int, str]:
    """`lantern provision node ...` as an installer types it; (exit code, what it printed)."""
    monkeypatch.setattr(pv, "_run", run or flash.run)
    monkeypatch.setattr(ps, "soft_reset", lambda port: None)
    capsys.readouterr()
    code = pv.main(_args(tmp, *extra))
    out, err = capsys.readouterr()
    return code, out + err


# The node boots on its flash (ESP32: the key from NVS), binds its counters and reserves BTHome
# counters as its BLE link would; prints (key id, bindkey, the next three BTHome counters).
BOOT_BTHOME = r"""
import json
from node import app, bthome, start
from node.outbox import Outbox
from node.link_ble import Counter

cfg = start.load_config("node.json")
with open("nvs_lantern_node_key", "rb") as f:
    key = f.read()
Outbox(cfg["state_dir"])
start.bind_state(cfg["state_dir"], key, None)
c = Counter(cfg["state_dir"] + "/bthome_counter")
print(json.dumps([start.key_id(key), bthome.derive_bindkey(key).hex(),
                  [c.next() for _ in range(3)]]))
"""


def adverts(flash: Flash) -> set[tuple[str, int]]:
    _, bindkey, counters = json.loads(flash.micropython(BOOT_BTHOME).splitlines()[-1])
    return {(bindkey, c) for c in counters}


# ---- 1. a run resumed at compile/deploy issues a new key but deploys the old one -------------

@pytest.mark.micropython
def test_resume_from_deploy_puts_the_key_it_issued_on_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A node's board is swapped for a spare (or its flash lost its state) and the staged files
    are deployed again with `--from deploy` ("every step can be repeated safely"). The key step
    sees no counters on the board and issues a new key into the gateway's key file, but the
    config step is skipped, so the stage still holds the old key and that is what is deployed:
    the gateway refuses every frame of the node, and the old key runs again from zero counters
    on the spare (its recorded commands and BTHome keystream valid again)."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    flash = Flash(tmp_path)
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--flash", "IMAGE", "--erase")
    assert code == 0, out
    first = load_keys(tmp_path / "keys.toml")[KID]
    before = adverts(flash)  # in service: BTHome adverts under the first key

    shutil.rmtree(flash.root)  # the spare board: no Lantern state on it
    flash.root.mkdir()
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--from", "deploy")
    assert code == 0, out
    gateway_key = load_keys(tmp_path / "keys.toml")[KID]
    node_key = (flash.root / "nvs_lantern_node_key").read_bytes()
    after = adverts(flash)

    assert node_key == gateway_key, (
        f"the node got key {ps.key_id(node_key)} but the gateway's key file now holds "
        f"{ps.key_id(gateway_key)}: every frame of the node is refused")
    assert node_key != first, "a key whose counters restarted is used again"
    assert not before & after, "BTHome adverts reuse the AES-CCM keystream"


# ---- 2. key.new outlives a node's first boot when a run fails after the copy -----------------

def copy_then_fail(flash: Flash) -> Callable[..., str]:
    """The board's answers, but the deploy's mpremote run fails after the copy: everything
    arrives but the last exec (the sequence), as when it hits a full filesystem."""

    def run(argv: list[str], what: str, fix: str, timeout: float = 300) -> str:
        if "fs" in argv:
            flash.run(argv[:-3], what, fix, timeout)
            raise pv.StepError(f"{what} failed (exit 1):\nOSError: 28", fix)
        return flash.run(argv, what, fix, timeout)

    return run


@pytest.mark.micropython
def test_a_key_the_node_booted_with_is_not_reused_after_an_erase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`key.new` says "no node has booted with this key" until the reset step removes it. A
    deploy that fails after mpremote copied the key (the sequence `exec` hit a full filesystem,
    a cable pulled, Ctrl-C) leaves it behind; the board is power-cycled and runs under the key.
    The installer then starts over with `--flash IMAGE --erase`: key.new is trusted before the
    erase, the key is kept, and the erase restarts its command floor and BTHome counter."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    flash = Flash(tmp_path)
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--flash", "IMAGE", "--erase",
                          run=copy_then_fail(flash))
    assert code == 1 and "step deploy failed" in out, out
    first = load_keys(tmp_path / "keys.toml")[KID]
    assert (flash.root / "nvs_lantern_node_key").read_bytes() == first
    before = adverts(flash)  # the board is power-cycled: it runs under the key

    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--flash", "IMAGE", "--erase")
    assert code == 0, out
    again = load_keys(tmp_path / "keys.toml")[KID]
    after = adverts(flash)
    assert again != first, f"kept the key across the erase: {out.splitlines()[4:6]}"
    assert not before & after, "BTHome adverts reuse the AES-CCM keystream"


@pytest.mark.micropython
def test_the_suggested_resume_keeps_frames_sealed_under_the_key_it_deploys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The reviewer's note: the deploy fails after the copy, the board is power-cycled and
    seals frames under the new key (the one the gateway's key file holds), and the installer
    runs the resume the tool printed (`--from deploy`). Its deploy drops the outbox as if the
    key on the node were being replaced: frames the gateway would take are deleted."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    flash = Flash(tmp_path)
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--flash", "IMAGE", "--erase",
                          run=copy_then_fail(flash))
    assert code == 1 and "--from deploy" in out, out
    key = load_keys(tmp_path / "keys.toml")[KID]
    sealed = flash.seal(3, T_NEW)  # power-cycled: the node runs under the key
    assert len(sealed) == 3

    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--from", "deploy")
    assert code == 0, out
    assert load_keys(tmp_path / "keys.toml")[KID] == key, "the node's key was replaced"
    waiting = {int(n.name) for n in (flash.root / "state/outbox").iterdir()}
    assert set(sealed) <= waiting, \
        f"the resume dropped frames sealed under the key it deploys: {sorted(waiting)}"
    assert flash.micropython(BOOT_BTHOME)  # and the node boots under it


# ---- 3. the gateway: a retired key brought back opens its old window again -------------------

def data_frame(key: bytes, seq: int) -> bytes:
    pack = cbor2.dumps([{0: "temperature", 2: 21.5}])
    return protocol.encode_frame(protocol.DATA, protocol.create_mac0(key, KID, seq, pack))


def acked(link: RecordingLink) -> list[int]:
    """Every sequence number the gateway's ACKs named so far, in order."""
    out: list[int] = []
    for raw in link.sent:
        ftype, body = protocol.decode_frame(raw.strip(b"\0"))
        assert ftype == protocol.ACK
        out += cbor2.loads(protocol.parse_mac0(body).payload)[protocol.ACK_SEQS]
    return out


async def settle(link: RecordingLink, n: int) -> None:
    """Until n sequence numbers are acknowledged (or 2 s: what is not taken stays unACKed)."""
    for _ in range(400):
        if len(acked(link)) >= n:
            return
        await asyncio.sleep(0.005)


async def test_a_retired_keys_recorded_frames_stay_replays_when_an_old_key_file_returns(
        tmp_path: Path) -> None:
    """docs/gateway.md: "Frames made with the old key no longer verify, so this opens no
    replay". They verify again once the old key is back: a key file restored from a backup (the
    queue kept), a retired line un-commented. The window of the returning key is started from
    nothing, so an attacker's recordings of the old key are taken, ACKed and sent upstream again
    (and mark the node alive while its real frames are refused).

    (Failed before: `assert [0, 1, 2, 3, 1767312000000, 3] == [0, 1, 2, 3, 1767312000000]`,
    seq 3 taken again. Each key now keeps its own window: seq 3, below that window, is a replay;
    seq 66, inside it, is a duplicate — acknowledged again as under any window, never taken.)"""
    old_key, new_key = bytes(range(32)), bytes(range(1, 33))
    db = tmp_path / "queue.sqlite"
    link = RecordingLink()
    recorded = list(range(70))  # in service; an attacker records these frames
    async with ingest_running(db, {KID: old_key}) as (ing, _):
        ing.on_data(link, b"".join(data_frame(old_key, s) for s in recorded))
        await settle(link, len(recorded))
    start = 1_767_312_000_000  # re-provisioned: new key, sequence from the clock floor
    async with ingest_running(db, {KID: new_key}) as (ing, _):
        ing.on_data(link, data_frame(new_key, start))
        await settle(link, len(recorded) + 1)
    assert acked(link) == [*recorded, start]

    async with ingest_running(db, {KID: old_key}) as (ing, _):  # keys.toml restored from last month
        ing.on_data(link, data_frame(old_key, 3))  # the attacker replays a recording
        await settle(link, len(recorded) + 2)
        assert acked(link) == [*recorded, start], \
            "a recorded frame of the retired key was taken and ACKed again"
        assert dict(ing.metrics.frames_rejected) == {"replay": 1}
        ing.on_data(link, data_frame(old_key, 66))  # one inside the old key's window
        await settle(link, len(recorded) + 2)
        assert acked(link) == [*recorded, start, 66]  # its ACK again: the node has it already
        assert ing.metrics.duplicates[NODE] == 1
        assert ing.metrics.readings_stored == 0 and NODE not in ing.metrics.nodes  # not alive
    con = sqlite3.connect(db)
    try:
        queued = [s for (s,) in con.execute("SELECT seq FROM frames ORDER BY id")]
    finally:
        con.close()
    assert queued == [*recorded, start], "a recording was queued again"


# ---- 4. a file-key board whose state directory is deleted counts again from zero ------------

BOOT_CMD = r"""
import sys
from node import app, start
from node.hal import unix as hal
from node.outbox import Outbox
from node.commands import Commands

state, key_file, body = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
key = start.load_key(key_file)
Outbox(state)
try:
    start.bind_state(state, key, hal)
except app.ConfigError as e:
    print("refused:", e)
    raise SystemExit

class Actions:
    def set_interval(self, ms):
        print("obeyed set-interval", ms)

Commands("SL-0042", key, state, Actions()).handle(body)
print("done")
"""


@pytest.mark.micropython
def test_a_deleted_state_dir_does_not_restart_a_file_keys_counters(tmp_path: Path) -> None:
    """bind_state's guard against counters gone under a used key is the HAL's (key_used): only
    the ESP32 HAL has one. On boards keeping node.key as a file (unix, qemu), deleting the
    state directory by hand (a technician clearing a stuck outbox) restarts the command floor,
    the BTHome counter and the frame sequence under the same key, silently."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    key = bytes(range(32))
    key_file = tmp_path / "node.key"
    write_secret(key_file, key.hex() + "\n")
    script = tmp_path / "boot.py"
    script.write_text(BOOT_CMD)
    recorded = nodelink.seal(key, KID, 5, cbor2.dumps({1: 3, 2: {1: 5000}}), protocol.COMMAND)

    def boot() -> str:
        r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=1M", str(script),
                            str(tmp_path / "state"), str(key_file), recorded.hex()],
                           env={"MICROPYPATH": MP_PATH}, capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    assert "obeyed set-interval 5000" in boot()  # in service; the command is recorded
    assert "obeyed" not in boot()  # replayed: refused, the floor holds
    shutil.rmtree(tmp_path / "state")
    out = boot()
    assert "obeyed" not in out, "a recorded command was obeyed again under the same key"


# ---- 5. what the reviewer saw but did not test -------------------------------------------------

@pytest.mark.micropython
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="only root can give a file to another user")
def test_a_key_file_created_for_the_gateway_is_the_gateways_to_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(a) With --gateway-config, run as root (`sudo lantern provision ...`), a missing key file
    was created root:root 0600: the gateway's user cannot read it and the gateway does not
    start. It belongs to the owner of the gateway's state_dir."""
    state = tmp_path / "gw-state"
    state.mkdir()
    os.chown(state, 4242, 4343)  # the gateway's user and group
    gw_toml = tmp_path / "gateway.toml"
    keys = tmp_path / "keys.toml"
    gw_toml.write_text(gateway_toml(state, keys, ["/dev/ttyAMA0"], "http://127.0.0.1:9/"))
    flash = Flash(tmp_path)
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--flash", "IMAGE", "--erase",
                          "--gateway-config", str(gw_toml))
    assert code == 0, out
    st = keys.stat()
    assert (st.st_uid, st.st_gid) == (4242, 4343), \
        f"the gateway's key file is {st.st_uid}:{st.st_gid}, its user is 4242"
    assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.micropython
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="only root can give the state_dir to another user")
def test_a_key_file_the_tool_cannot_give_away_says_what_to_chown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(a) Not root (or chown refused): the installer is told the one command to run."""
    state = tmp_path / "gw-state"
    state.mkdir()
    os.chown(state, 4242, 4343)
    gw_toml = tmp_path / "gateway.toml"
    keys = tmp_path / "keys.toml"
    gw_toml.write_text(gateway_toml(state, keys, ["/dev/ttyAMA0"], "http://127.0.0.1:9/"))

    def refused(path: object, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(pv.os, "chown", refused)
    flash = Flash(tmp_path)
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--flash", "IMAGE", "--erase",
                          "--gateway-config", str(gw_toml))
    assert code == 0, out
    assert "the gateway runs as " in out and f"{state}): `sudo chown " in out, out
    assert f" {keys}`, or it cannot read its keys" in out, out


@pytest.mark.micropython
def test_a_key_file_that_cannot_be_written_stops_the_run_before_the_erase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(b) The key file's folder cannot be written (missing, read-only, another user's): the
    OSError escaped as a traceback with no "resume with" hint, after --erase had wiped the
    board. The check step must find it before anything is erased."""
    flash = Flash(tmp_path)
    monkeypatch.setattr(pv, "_run", flash.run)
    monkeypatch.setattr(ps, "soft_reset", lambda port: None)
    args = _args(tmp_path, "--flash", "IMAGE", "--erase")
    args.keys = tmp_path / "no-such-dir" / "keys.toml"  # a typo in --keys
    capsys.readouterr()
    code = pv.main(args)
    err = capsys.readouterr().err
    assert code == 1 and "step check failed" in err and "no-such-dir" in err, err
    assert flash.ran == [], "the board was erased before the key file was found unwritable"


@pytest.mark.micropython
def test_a_key_file_write_that_fails_is_one_line_with_a_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(b) Whatever the check cannot foresee (permissions changed under the run, a full disk):
    the key step's OSError is one line, what to do, and the resume."""
    flash = Flash(tmp_path)
    keys = tmp_path / "keys.toml"

    def refused(path: Path, text: str) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pv, "write_secret", refused)
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--flash", "IMAGE", "--erase")
    assert code == 1, out
    assert f"step key failed: cannot write {keys}: Permission denied" in out, out
    assert "resume with: lantern" in out and out.rstrip().endswith("--from key"), out


@pytest.mark.micropython
def test_an_esp32_stage_keeps_no_copy_of_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(c) On ESP32 boards the key goes into NVS, yet the stage kept node.key and nvs_key.py
    (0600, each holding the key) in .build/provision/ID: a second copy of every node's key on
    the installer's laptop, node.key never even deployed."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    flash = Flash(tmp_path)
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--flash", "IMAGE", "--erase",
                          run=copy_then_fail(flash))
    assert code == 1, out  # a failed deploy leaves none behind either
    code, out = provision(tmp_path, flash, monkeypatch, capsys, "--from", "deploy")
    assert code == 0, out
    key = load_keys(tmp_path / "keys.toml")[KID]
    assert (flash.root / "nvs_lantern_node_key").read_bytes() == key
    holding = [f.name for f in (tmp_path / "stage").rglob("*")
               if f.is_file() and key.hex() in f.read_bytes().decode(errors="replace")]
    assert holding == [], f"the stage keeps the node key in {holding}"
    assert "the key is now only in" in out, out


# The node on a file-key board (unix, qemu): key file and counters as node.json says.
BOOT_FILE_KEY = r"""
from node import app, start
cfg = start.load_config("node.json")
key = start.load_key(cfg["key_file"])
from node.outbox import Outbox
Outbox(cfg["state_dir"])
try:
    print("bound", start.bind_state(cfg["state_dir"], key, None))
except app.ConfigError as e:
    print("refused", e)
"""


@pytest.mark.micropython
def test_a_file_key_board_that_lost_its_state_is_reprovisioned_under_a_new_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 3's marker (`node.key.used`, beside the key) outlives the state directory: the
    node then refuses its key, and provisioning must bring it back under a new one (the old
    marker must not make the node refuse the new key, nor travel with the deploy)."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    flash = Flash(tmp_path)
    monkeypatch.setattr(pv, "_run", flash.run)
    monkeypatch.setattr(ps, "soft_reset", lambda port: None)

    def run(*extra: str) -> str:
        args = _args(tmp_path, *extra)
        args.board = "qemu-mps2-an385"
        capsys.readouterr()
        code = pv.main(args)
        out, err = capsys.readouterr()
        assert code == 0, out + err
        return out

    run()
    first = load_keys(tmp_path / "keys.toml")[KID]
    assert flash.micropython(BOOT_FILE_KEY).split() == ["bound", ps.key_id(first)]
    shutil.rmtree(flash.root / "state")
    assert flash.micropython(BOOT_FILE_KEY).startswith("refused node key")
    out = run()
    second = load_keys(tmp_path / "keys.toml")[KID]
    assert second != first and "the node lost this key's counters" in out, out
    assert not (tmp_path / "stage" / "node.key.used").exists()
    assert flash.micropython(BOOT_FILE_KEY).split() == ["bound", ps.key_id(second)]
