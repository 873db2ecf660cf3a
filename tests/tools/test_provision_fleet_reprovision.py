"""A wiped node provisioned again through `lantern provision fleet` and `lantern gateway nodes
import`: delivery resumes with no hand edit at the gateway, and a frame recorded before the
wipe, played back, is refused and counted.

The board is a directory standing for its flash (tests/helpers/flash.py): the node's own
firmware (node.outbox, node.app's sealing, the key binding in node.start) runs on the
MicroPython unix port there, as do provisioning's mpremote scripts; the gateway side is the
real store, registry and ingest (tests/helpers/fleet.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lantern.agent import cli, protocol
from lantern.agent.config import load_keys
from lantern.agent.registry import REGISTRY_FILE, Registry, key_id
from lantern.tools.field import provision as pv
from lantern.tools.field import provision_steps as ps
from lantern.tools.street.sim import gateway_toml
from tests.helpers.flash import MICROPYTHON, Flash
from tests.helpers.fleet import Link, gateway, keys_file_of, send

pytestmark = [pytest.mark.fleet, pytest.mark.micropython]

NODE, OTHER = "SL-0042", "SL-0007"
T_OLD, T_NEW = 1_796_000_000, 1_796_086_400


def framed(bodies: dict[int, bytes]) -> dict[int, bytes]:
    """The node's sealed COSE_Mac0 bodies as its UART link sends them."""
    return {seq: protocol.encode_frame(protocol.DATA, b) for seq, b in bodies.items()}


def run_fleet(tmp: Path, name: str, gw_toml: Path) -> Path:
    """One CSV row for NODE at pole 42, provisioned with an erase; the fragment it wrote."""
    csv_file = tmp / f"{name}.csv"
    csv_file.write_text(f'id,pole,location,board,port\n{NODE},42,"52.37,4.89",esp32-devkitc,'
                        "/dev/ttyUSB0\n")
    image = tmp / "mp.bin"
    image.write_bytes(b"\xe9" + bytes(4095))
    assert cli.main(["provision", "fleet", "--csv", str(csv_file), "--flash", str(image),
                     "--erase", "--firmware", "frozen", "--out", str(tmp / "stage"),
                     "--gateway-config", str(gw_toml)]) == 0
    return tmp / f"{name}.fragment.toml"


async def test_a_wiped_node_delivers_again_and_its_recorded_frame_stays_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    state = tmp_path / "gw"
    state.mkdir(mode=0o700)
    other_key = os.urandom(32)
    keys_file = keys_file_of(tmp_path / "gw-keys.toml", {OTHER: other_key})
    gw_toml = tmp_path / "gateway.toml"
    gw_toml.write_text(gateway_toml(state, keys_file, ["/dev/ttyAMA0"], "http://127.0.0.1:9/"))
    flash = Flash(tmp_path)
    monkeypatch.setattr(pv, "_run", flash.run)
    monkeypatch.setattr(ps, "soft_reset", lambda port: None)

    # provisioned with the fleet tool, merged at the gateway
    frag = run_fleet(tmp_path, "install", gw_toml)
    assert cli.main(["gateway", "nodes", "import", str(frag), "--config", str(gw_toml)]) == 0
    first_key = load_keys(keys_file)[NODE.encode()]

    # in service: its frames delivered; one of them recorded off the air
    link = Link()
    old = framed(flash.seal(3, T_OLD))
    async with gateway(tmp_path, state=state, keys_file=keys_file) as (ing, _, metrics, _s):
        for seq in sorted(old):
            await send(ing, link, old[seq])
        assert metrics.frames_received[NODE] == 3
    recorded = old[max(old)]

    # the board wiped (a flash erase) and provisioned again: a new key
    capsys.readouterr()
    frag2 = run_fleet(tmp_path, "replacement", gw_toml)
    out = capsys.readouterr().out
    assert "starts at" in out and "the gateway's high mark" in out, out
    assert cli.main(["gateway", "nodes", "import", str(frag2), "--config", str(gw_toml)]) == 0
    assert "(retired)" in capsys.readouterr().out
    keys = load_keys(keys_file)
    assert keys[NODE.encode()] != first_key and keys[OTHER.encode()] == other_key
    with Registry(state / REGISTRY_FILE) as reg:
        r = reg.get(NODE)
        assert r is not None and r.key_version == 2 and key_id(first_key) in r.retired
        assert (r.pole, r.lat, r.lon) == ("42", 52.37, 4.89)

    # the gateway (its service restarted, nothing edited): the new frames are taken, the
    # recorded one refused and counted
    new = framed(flash.seal(3, T_NEW))
    assert min(new) > max(old)
    async with gateway(tmp_path, state=state, keys_file=keys_file) as (ing, _, metrics, store):
        for seq in sorted(new):
            await send(ing, link, new[seq])
        assert metrics.frames_received[NODE] == 3
        await send(ing, link, recorded)
        assert metrics.frames_received[NODE] == 3
        assert metrics.frames_rejected == {"mac": 1}
        depth, _ = await store.depth()
    assert depth == 6  # three before the wipe, three after: no collision, nothing lost
