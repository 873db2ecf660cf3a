"""`lantern provision fleet --csv`: 20 rows dry, a run broken at row k (a failed step, Ctrl-C,
a kill) and resumed, and `lantern gateway nodes import` merging without touching another node's
entry. The same fleet run against QEMU boards, killed for real: hil_tests/test_fleet_qemu.py.

The boards are directories standing for their flash (tests/helpers/flash.py): esptool and
mpremote runs act on them, mpremote's scripts run on the MicroPython unix port.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from lantern.agent import cli
from lantern.agent.config import load_keys, write_secret
from lantern.agent.registry import REGISTRY_FILE, Registry, RegistryError, key_id
from lantern.tools.field import fleet
from lantern.tools.field import provision as pv
from lantern.tools.field import provision_steps as ps
from lantern.tools.street.sim import gateway_toml
from tests.helpers.flash import MICROPYTHON, Flash

pytestmark = pytest.mark.fleet


def write_csv(path: Path, n: int, ports: bool = True, link: bool = False) -> list[str]:
    ids = [f"SL-{i:04d}" for i in range(1, n + 1)]
    lines = ["id,pole,location,board,port" + (",group,link_port" if link else "")]
    for i, node in enumerate(ids, 1):
        lines.append(f'{node},{i},"52.{3700 + i},4.{8900 + i}",esp32-devkitc,'
                     + (f"/dev/ttyUSB{i}" if ports else "")
                     + (f",street-{i % 3},/dev/ttyLINK{i}" if link else ""))
    path.write_text("\n".join(lines) + "\n")
    return ids


def test_twenty_rows_dry_run_changes_nothing(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ids = write_csv(tmp_path / "nodes.csv", 20, link=True)
    before = set(tmp_path.iterdir())
    assert cli.main(["provision", "fleet", "--csv", str(tmp_path / "nodes.csv"),
                     "--out", str(tmp_path / "stage"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    report = out[out.index("fleet report:"):]
    assert [line.split()[0] for line in report.splitlines()[1:]] == ids
    assert report.count("dry run") == 20
    for i, node in enumerate(ids, 1):  # every row's steps, on its own ports
        assert f"provisioning {node} (dry run" in out
        assert f"/dev/ttyUSB{i}" in out
        assert f"probe the node on /dev/ttyLINK{i} and read its status" in out
    assert set(tmp_path.iterdir()) == before  # no fragment, no progress, no stage


@pytest.mark.parametrize("bad, says", [
    ("SL 1,1,,esp32-devkitc,", "line 2: id 'SL 1'"),
    ('SL-1,1,"91,4",esp32-devkitc,', "line 2: location '91,4': out of range"),
    ("SL-1,1,52.1,esp32-devkitc,", "expected \"lat,lon\""),
    ("SL-1,1,,,", "line 2: SL-1: no board"),
])
def test_a_bad_row_stops_the_run_before_any_node(tmp_path: Path, bad: str, says: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "nodes.csv").write_text(f"id,pole,location,board,port\n{bad}\n")
    assert cli.main(["provision", "fleet", "--csv", str(tmp_path / "nodes.csv")]) == 2
    assert says in capsys.readouterr().err


class Boards:
    """One flash directory per USB port; `fail` makes a node's deploy fail once, `stop` breaks
    the run off there once (KeyboardInterrupt: Ctrl-C; Killed: SIGKILL)."""

    def __init__(self, tmp: Path, n: int) -> None:
        self.flash = {}
        for i in range(1, n + 1):
            (tmp / f"b{i}").mkdir()
            self.flash[f"/dev/ttyUSB{i}"] = Flash(tmp / f"b{i}")
        self.fail: set[str] = set()
        self.stop: dict[str, type[BaseException]] = {}

    def run(self, argv: list[str], what: str, fix: str, timeout: float = 300) -> str:
        port = argv[argv.index("--port") + 1] if "--port" in argv else argv[4]
        if port in self.fail and "fs" in argv:
            self.fail.discard(port)
            raise pv.StepError(f"{what} failed (exit 1): no answer", fix)
        if port in self.stop and "fs" in argv:
            raise self.stop.pop(port)()
        return self.flash[port].run(argv, what, fix, timeout)


class Killed(BaseException):
    """SIGKILL in the middle of a deploy: nothing of the run goes on (no handler, no report,
    no save); what is on disk is what the next run finds."""


def fleet_of(tmp: Path, n: int, monkeypatch: pytest.MonkeyPatch
             ) -> tuple[list[str], Boards, list[str]]:
    """n rows on n boards (flash directories), and the fleet command flashing and erasing each."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    ids = write_csv(tmp / "nodes.csv", n)
    boards = Boards(tmp, n)
    monkeypatch.setattr(pv, "_run", boards.run)
    monkeypatch.setattr(ps, "soft_reset", lambda port: None)
    image = tmp / "mp.bin"
    image.write_bytes(b"\xe9" + bytes(4095))
    return ids, boards, ["provision", "fleet", "--csv", str(tmp / "nodes.csv"), "--flash",
                         str(image), "--erase", "--firmware", "frozen", "--out",
                         str(tmp / "stage")]


@pytest.mark.micropython
def test_interrupted_at_row_k_and_resumed_without_redoing_finished_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    n, k = 5, 3
    ids, boards, argv = fleet_of(tmp_path, n, monkeypatch)
    boards.fail.add(f"/dev/ttyUSB{k}")  # row k's deploy fails (a cable pulled)
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    progress = json.loads((tmp_path / "nodes.progress.json").read_text())
    assert sorted(progress["done"]) == [i for j, i in enumerate(ids, 1) if j != k]
    assert list(progress["failed"]) == [ids[k - 1]]
    assert "1 failed: run the same command again" in out
    fragment = tmp_path / "nodes.fragment.toml"
    assert stat.S_IMODE(fragment.stat().st_mode) == 0o600
    keys_first = load_keys(fragment)
    ran = {p: len(b.ran) for p, b in boards.flash.items()}

    assert cli.main(argv) == 0  # resumed: only row k runs
    out = capsys.readouterr().out
    for j, node in enumerate(ids, 1):
        if j == k:
            assert len(boards.flash[f"/dev/ttyUSB{j}"].ran) > ran[f"/dev/ttyUSB{j}"]
        else:
            assert len(boards.flash[f"/dev/ttyUSB{j}"].ran) == ran[f"/dev/ttyUSB{j}"], node
            assert f"{node:<32} done before" in out
    keys = load_keys(fragment)
    assert sorted(k_.decode() for k_ in keys) == ids
    assert all(keys[i.encode()] == keys_first[i.encode()] for i in ids if i != ids[k - 1])
    progress = json.loads((tmp_path / "nodes.progress.json").read_text())
    assert sorted(progress["done"]) == ids and progress["failed"] == {}
    for j, node in enumerate(ids, 1):  # each board holds its own key
        flash = boards.flash[f"/dev/ttyUSB{j}"]
        assert (flash.root / "nvs_lantern_node_key").read_bytes() == keys[node.encode()]
        assert json.loads((flash.root / "node.json").read_text())["pole"] == str(j)
    ran = {p: len(b.ran) for p, b in boards.flash.items()}
    assert cli.main(argv) == 0  # a third run: nothing left to do
    assert "5/5 done" in capsys.readouterr().out
    assert {p: len(b.ran) for p, b in boards.flash.items()} == ran


def gateway(tmp: Path, other_key: bytes) -> tuple[Path, Path, Path]:
    """A gateway's config, state dir and key file holding another node's key."""
    state = tmp / "gw"
    state.mkdir(mode=0o700)
    keys = tmp / "gw-keys.toml"
    write_secret(keys, "# the gateway's own comment\n[nodes]\n"
                       f'"SL-9999" = "{other_key.hex()}"\n')
    toml = tmp / "gateway.toml"
    toml.write_text(gateway_toml(state, keys, ["/dev/ttyAMA0"], "http://127.0.0.1:9/"))
    return toml, state, keys


def fragment_of(tmp: Path, nodes: dict[str, bytes], pole: str = "1",
                provisioned: float = 2e9) -> Path:
    f = tmp / f"frag-{len(list(tmp.glob('frag-*')))}.toml"
    text = None
    for node, key in nodes.items():
        text = ps.merge_key(text, str(f), node, key)
    write_secret(f, text or "")
    for node, key in nodes.items():
        fleet.add_meta(f, fleet.Row(2, node, pole, "52.1,4.2", "esp32-devkitc", ""),
                       key_id(key), 60.0, provisioned)
    return f


def test_import_merges_entry_by_entry_and_refuses_a_clash_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = os.urandom(32)
    toml, state, keys = gateway(tmp_path, other)
    k1, k2 = os.urandom(32), os.urandom(32)
    frag = fragment_of(tmp_path, {"SL-0001": k1, "SL-0002": k2})
    assert cli.main(["gateway", "nodes", "import", str(frag), "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert f"SL-0001: key {key_id(k1)} added" in out
    got = load_keys(keys)
    assert got == {b"SL-9999": other, b"SL-0001": k1, b"SL-0002": k2}
    assert "# the gateway's own comment" in keys.read_text()
    with Registry(state / REGISTRY_FILE) as reg:
        r = reg.get("SL-0001")
        assert r is not None and (r.pole, r.lat, r.lon, r.board, r.key_id) == (
            "1", 52.1, 4.2, "esp32-devkitc", key_id(k1))
        assert r.state(0) == "provisioned"
    assert stat.S_IMODE((state / REGISTRY_FILE).stat().st_mode) == 0o600

    # the same fragment again: nothing changes
    before = keys.read_bytes()
    assert cli.main(["gateway", "nodes", "import", str(frag), "--config", str(toml)]) == 0
    assert "SL-0001: already here" in capsys.readouterr().out
    assert keys.read_bytes() == before

    # SL-0001 provisioned again (a wiped board): a newer fragment replaces its key only
    k1b = os.urandom(32)
    newer = fragment_of(tmp_path, {"SL-0001": k1b}, provisioned=3e9)
    assert cli.main(["gateway", "nodes", "import", str(newer), "--config", str(toml)]) == 0
    assert f"replaces {key_id(k1)} (retired)" in capsys.readouterr().out
    assert load_keys(keys) == {b"SL-9999": other, b"SL-0001": k1b, b"SL-0002": k2}

    # clashes: the old fragment (a retired key), another pole, an older key. Refused whole:
    # the good entry beside them (SL-0003) is not taken either
    before = keys.read_bytes()
    k3 = os.urandom(32)
    for frag_, says in [
            (frag, f"SL-0001: key {key_id(k1)} was retired here"),
            (fragment_of(tmp_path, {"SL-0002": k2, "SL-0003": k3}, pole="7"),
             "SL-0002: at pole 1 here, at pole 7"),
            (fragment_of(tmp_path, {"SL-0001": os.urandom(32), "SL-0003": k3},
                         provisioned=1e9), "SL-0001: the gateway has another key")]:
        assert cli.main(["gateway", "nodes", "import", str(frag_), "--config", str(toml)]) == 1
        err = capsys.readouterr().err
        assert "refused, nothing written" in err and says in err, err
        assert keys.read_bytes() == before
    with Registry(state / REGISTRY_FILE) as reg:
        assert reg.get("SL-0003") is None
        with pytest.raises(RegistryError):
            reg.revoke("SL-4242")


def test_the_single_node_flow_tells_a_merge_not_a_copy(tmp_path: Path) -> None:
    text = ps.gateway_snippet("SL-0042", tmp_path / "keys.toml", "42", None, 60)
    assert "lantern gateway nodes import" in text and "--node SL-0042" in text
    assert "copy" not in text



@pytest.mark.micropython
@pytest.mark.parametrize("stop", [KeyboardInterrupt, Killed], ids=["ctrl-c", "kill"])
def test_broken_off_in_row_2_and_resumed_without_redoing_row_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        stop: type[BaseException]) -> None:
    ids, boards, argv = fleet_of(tmp_path, 3, monkeypatch)
    boards.stop["/dev/ttyUSB2"] = stop  # row 2's deploy: its key made and on its way
    progress_file = tmp_path / "nodes.progress.json"
    if stop is Killed:
        with pytest.raises(Killed):
            cli.main(argv)
        progress = json.loads(progress_file.read_text())
        assert progress["running"]["id"] == ids[1]  # the journal names the row it was in
    else:
        assert cli.main(argv) == 130
        out = capsys.readouterr().out
        assert f"{ids[1]:<32} INTERRUPTED" in out and f"{ids[2]:<32} not started" in out
        assert f"interrupted at {ids[1]}: run the same command again" in out
        progress = json.loads(progress_file.read_text())
        assert progress["running"] is None
        assert progress["failed"] == {ids[1]: "interrupted (Ctrl-C)"}
    assert list(progress["done"]) == [ids[0]]
    fragment = tmp_path / "nodes.fragment.toml"
    first = load_keys(fragment)
    assert sorted(first) == [ids[0].encode(), ids[1].encode()]  # row 2's key was made
    ran = {p: len(b.ran) for p, b in boards.flash.items()}
    capsys.readouterr()

    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    if stop is Killed:
        assert f"{ids[1]}: the last run stopped while provisioning it" in out
    assert f"{ids[0]:<32} done before" in out
    assert len(boards.flash["/dev/ttyUSB1"].ran) == ran["/dev/ttyUSB1"]  # row 1 not redone
    assert len(boards.flash["/dev/ttyUSB2"].ran) > ran["/dev/ttyUSB2"]
    keys = load_keys(fragment)
    assert keys[ids[0].encode()] == first[ids[0].encode()]
    # row 2 again from its first step: the board was erased again, so its key is a new one
    # and the one the broken run sent is retired (named by id, never kept)
    old = first[ids[1].encode()]
    assert keys[ids[1].encode()] != old
    text = fragment.read_text()
    assert f"{ids[1]}: retired key {key_id(old)}" in text and old.hex() not in text
    for j, node in enumerate(ids, 1):
        flash = boards.flash[f"/dev/ttyUSB{j}"]
        assert (flash.root / "nvs_lantern_node_key").read_bytes() == keys[node.encode()]
    progress = json.loads(progress_file.read_text())
    assert sorted(progress["done"]) == ids and progress["failed"] == {}
    assert progress["running"] is None
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_a_second_run_on_the_same_csv_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_csv(tmp_path / "nodes.csv", 2)
    with fleet.run_lock(tmp_path / "nodes.progress.json"):
        assert cli.main(["provision", "fleet", "--csv", str(tmp_path / "nodes.csv")]) == 2
    assert "another `lantern provision fleet` is running on this CSV" in capsys.readouterr().err
    assert not (tmp_path / "nodes.fragment.toml").exists()
