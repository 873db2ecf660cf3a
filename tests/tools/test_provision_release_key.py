"""The release public key on the node at provisioning (issue 16): `lantern provision node
--release-pub NAME.pub.pem` (or the gateway's [updates] release_key) stages it as release.pub
beside node.json and deploys it there, where the node's own update code reads it; a private
key, a malformed file or a small-order key is refused with one line before anything is made.
The simulated street (SimNode, Topology) provisions its nodes the same way.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from lantern.agent.cli import main as lantern
from lantern.agent.config import write_secret
from lantern.tools.field import provision as pv
from lantern.tools.field import provision_steps as ps
from lantern.tools.field import release
from lantern.tools.street.sim import MICROPYTHON, MP_EXTMOD, SimNode

pytestmark = pytest.mark.ota

ROOT = Path(__file__).resolve().parents[2]
# SubjectPublicKeyInfo of an Ed25519 key (RFC 8410): this prefix, then the 32 raw bytes
SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("rel")
    priv, pub = release.keygen(str(d / "rel"))
    return priv, pub


def _pem(der: bytes) -> bytes:
    import base64

    return (b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der)
            + b"-----END PUBLIC KEY-----\n")


def _provision(tmp_path: Path, *extra: str) -> int:
    argv = ["provision", "node", "--board", "esp32-devkitc", "--id", "SL-0042", "--keys",
            str(tmp_path / "keys.toml"), "--out", str(tmp_path / "stage"), *extra]
    saved = sys.argv
    sys.argv = ["lantern", *argv]
    try:
        return lantern(argv)
    finally:
        sys.argv = saved


def test_release_public_gives_the_raw_key_and_its_kid(keypair: tuple[Path, Path]) -> None:
    _, pub = keypair
    raw, kid = ps.release_public(pub)
    key = release.load_public(pub)
    assert raw == key.public_bytes_raw() and len(raw) == 32
    assert kid == release.key_id(key).hex()  # the kid every bundle of this key names


@pytest.mark.parametrize(("make", "said"), [
    (lambda priv, pub: priv.read_bytes(), "is a PRIVATE key; give its public half"),
    (lambda priv, pub: b"not a key at all\n", "not a readable PEM public key"),
    (lambda priv, pub: _pem(SPKI_ED25519 + bytes(32)), "small order"),  # the neutral element
    (lambda priv, pub: generate_private_key(SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
     "not an Ed25519 public key"),
    (lambda priv, pub: pub.read_bytes()[:60], "not a readable PEM public key"),
])
def test_a_private_malformed_or_weak_key_is_refused_in_one_line_before_anything_is_made(
        make: object, said: str, keypair: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "given.pub.pem"
    assert callable(make)
    bad.write_bytes(make(*keypair))
    with pytest.raises(ValueError, match=said):
        ps.release_public(bad)
    assert _provision(tmp_path, "--release-pub", str(bad)) == 1
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("lantern provision: step check failed: --release-pub ")
    assert said in first and str(bad) in first, err
    assert "what to do: give the NAME.pub.pem" in err
    assert "BEGIN" not in err  # no key material echoed
    assert not (tmp_path / "keys.toml").exists() and not (tmp_path / "stage").exists()


def test_a_missing_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _provision(tmp_path, "--release-pub", str(tmp_path / "nope.pub.pem"),
                      "--dry-run") == 1
    assert f"--release-pub {tmp_path / 'nope.pub.pem'}: cannot read: No such file" in \
        capsys.readouterr().err


def test_dry_run_names_the_key_and_the_file_it_deploys(
        keypair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, pub = keypair
    _, kid = ps.release_public(pub)
    assert _provision(tmp_path, "--port", "/dev/ttyUSB0", "--release-pub", str(pub),
                      "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"release.pub: the release public key {pub} (kid {kid}, from --release-pub)" in out
    deploy = next(line for line in out.splitlines() if "] deploy:" in line)
    assert f"{tmp_path / 'stage' / 'release.pub'}" in deploy
    assert list(tmp_path.iterdir()) == []
    # without a key the installer is told what that means, and nothing is deployed for it
    assert _provision(tmp_path, "--port", "/dev/ttyUSB0", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "no release key (--release-pub NAME.pub.pem" in out and "refuses every update" in out
    assert "release.pub" not in next(line for line in out.splitlines() if "] deploy:" in line)


def test_the_gateway_configs_release_key_is_the_default(
        keypair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, pub = keypair
    state = tmp_path / "gw"
    state.mkdir(mode=0o700)
    keys = state / "keys.toml"
    write_secret(keys, ps.keys_text(keys, "SL-0001", bytes(range(32))))
    gw = tmp_path / "gateway.toml"
    gw.write_text(f'[gateway]\nstate_dir = "{state}"\nkeys_file = "{keys}"\n'
                  f'[[links.serial]]\nport = "/dev/ttyUSB0"\n[sinks.http]\n'
                  f'url = "http://127.0.0.1:9/"\n[updates]\nrelease_key = "{pub}"\n')
    argv = ["provision", "node", "--board", "esp32-devkitc", "--id", "SL-0042",
            "--gateway-config", str(gw), "--out", str(tmp_path / "stage"), "--port",
            "/dev/ttyUSB0", "--dry-run"]
    assert lantern(argv) == 0
    out = capsys.readouterr().out
    assert f"(kid {ps.release_public(pub)[1]}, from [updates] release_key of {gw})" in out
    # --release-pub wins over the gateway's
    _, other_pub = release.keygen(str(tmp_path / "other"))
    assert lantern([*argv, "--release-pub", str(other_pub)]) == 0
    assert f"{other_pub} (kid {ps.release_public(other_pub)[1]}, from --release-pub)" in \
        capsys.readouterr().out


def _plan(tmp_path: Path, *extra: str) -> pv.Plan:
    p = argparse.ArgumentParser()
    pv.add_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["provision", "node", "--board", "esp32-devkitc", "--id", "SL-0042",
                         "--keys", str(tmp_path / "keys.toml"), "--out",
                         str(tmp_path / "stage"), "--port", "/dev/ttyUSB0", *extra])
    plan = pv.plan(args)
    plan.key = bytes(range(32))
    return plan


def test_config_stages_release_pub_that_the_nodes_own_update_code_reads(
        keypair: tuple[Path, Path], tmp_path: Path) -> None:
    """The staged file, on the MicroPython unix port, is the key node/ota.py checks with."""
    _, pub = keypair
    raw, _ = ps.release_public(pub)
    plan = _plan(tmp_path, "--release-pub", str(pub))
    pv.step_config(plan, False)
    stage = tmp_path / "stage"
    assert (stage / ps.RELEASE_FILE).read_bytes() == raw
    argv = ps.deploy_argv("/dev/ttyUSB0", stage, True, False, release=True)
    cp = argv[argv.index("cp") + 1:argv.index(":")]
    assert str(stage / ps.RELEASE_FILE) in cp  # to the root, beside node.json
    # the node, in the folder the deploy fills (node.json and release.pub at its root)
    script = (f"import os, json\nos.chdir({str(stage)!r})\nfrom node import ota\n"
              f"cfg = json.load(open('node.json'))\ncfg['state_dir'] = {str(tmp_path / 'st')!r}\n"
              "u = ota.Updater(cfg, 'unix-sim')\nv = u._check()\n"
              "print('KEY', v.key.hex(), u.key_path)\n")
    r = subprocess.run([str(MICROPYTHON), "-c", script], capture_output=True, text=True,
                       timeout=60, env={"MICROPYPATH": f"{ROOT / 'firmware'}:{MP_EXTMOD}"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"KEY {raw.hex()} release.pub" in r.stdout
    # a later run without a key stages none (the node keeps the one it has)
    plan = _plan(tmp_path)
    pv.step_config(plan, False)
    assert not (stage / ps.RELEASE_FILE).exists()
    assert str(stage / ps.RELEASE_FILE) not in ps.deploy_argv("/dev/ttyUSB0", stage, True,
                                                              False, release=False)


def test_the_simulated_street_provisions_its_nodes_with_the_release_key(
        keypair: tuple[Path, Path], tmp_path: Path) -> None:
    raw, _ = ps.release_public(keypair[1])
    node = SimNode("SL-0001", tmp_path, release_pub=raw)
    node.write_config()
    assert (node.dir / "release.pub").read_bytes() == raw
    assert not os.path.exists(tmp_path / "SL-0001" / "release.pub.tmp")
    with pytest.raises(ValueError, match="32 raw bytes, got 31"):
        SimNode("SL-0002", tmp_path, release_pub=raw[:31]).write_config()
    plain = SimNode("SL-0003", tmp_path)
    plain.write_config()
    assert not (plain.dir / "release.pub").exists()
