"""A key rotation on the ESP32 twin (hal/esp32.py, the key in NVS: `key_store: nvs`).

node/rekey.py runs on the twin's port models (tests/esp32_twin): the commit puts the new key
into NVS where hal/esp32.py load_key finds it at the next boot, with its key-used mark.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from lantern.agent import fleetops
from tests.esp32_twin.twin import TwinNode

pytestmark = [pytest.mark.fleet, pytest.mark.micropython, pytest.mark.esp32_twin]

SCRIPT = """
import json
from node import start
from node.hal import esp32 as hal
from node.outbox import _makedirs


class Outbox:
    _next = 77


class N:
    kid = b"SL-0009"
    link = None
    outbox = Outbox()


n = N()
n.hal = hal
with open("node.json") as f:
    n.cfg = json.load(f)
start.keys(n, n.cfg, hal)
_makedirs(n.cfg["state_dir"])  # as the node's outbox does at boot
print("BOOT", n.key.hex(), n.key_version, n.key_first)
if GW:
    from node import rekey

    code, res = rekey.rekey(n, bytes.fromhex(GW), 1)
    print("REKEY", code, res[1].hex())
    print("COMMIT", rekey.commit(n, 1))
"""


def line(out: str, tag: str) -> list[str]:
    for ln in out.splitlines():
        if ln.startswith(tag + " "):
            return ln.split()[1:]
    raise AssertionError(f"no {tag} line in:\n{out}")


def test_a_rotated_key_lands_in_nvs_and_boots(tmp_path: Path) -> None:
    node = TwinNode("SL-0009", tmp_path)
    old = node.key
    gw = X25519PrivateKey.generate()
    gw_pub = gw.public_key().public_bytes_raw().hex()
    out = node.exec(SCRIPT.replace("GW:", f"{gw_pub!r}:").replace("bytes.fromhex(GW)",
                                                                  f"bytes.fromhex({gw_pub!r})"))
    assert line(out, "BOOT") == [old.hex(), "0", "None"], out
    code, node_pub = line(out, "REKEY")
    assert code == "0"
    shared = gw.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(node_pub)))
    new = fleetops.derive(shared, old, "SL-0009", 1)
    assert " ".join(line(out, "COMMIT")) == "(0, {2: 1, 3: 77})", out
    # in NVS (hal/esp32.py's namespace and blob), its key id marked as used
    assert node.nvs("lantern", "node_key") == b"b" + new
    kid = hashlib.sha256(b"lantern key id v1" + new).hexdigest()[:16]
    assert node.nvs("lantern", "key_used") == b"b" + kid.encode()
    out = node.exec(SCRIPT.replace("GW:", "'':"))
    assert line(out, "BOOT") == [new.hex(), "1", "77"], out
