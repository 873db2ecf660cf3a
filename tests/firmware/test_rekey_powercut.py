"""A key rotation cut by a power failure at every write (node/rekey.py, node/start.py keys).

Each case runs REKEY and COMMIT in a MicroPython process (unix port) whose N-th file write
stops half-way (a torn temporary file), after its temporary file, or after its rename; the
test then kills the process (SIGKILL), boots the node's key state again with the firmware's
own boot code, and checks that exactly one key is usable and the rotation state agrees with
it; then the rotation is finished from there.
"""

from __future__ import annotations

import hashlib
import json
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

pytestmark = [pytest.mark.fleet, pytest.mark.micropython]

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_PATH = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"
NODE = "SL-0007"
FIRST = 100  # the fake outbox's next sequence number

SCRIPT = """
import json, sys, time
from node import outbox, start

mode, d, gw_pub = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
cut_at, stage = int(sys.argv[4]), sys.argv[5]


class Outbox:
    _next = FIRST


class Node:
    kid = b"NODE"
    hal = None
    link = None
    outbox = Outbox()
    cfg = {"key_file": d + "/node.key", "state_dir": d + "/state"}


def show(n):
    from node import rekey

    st = rekey.read(rekey.journal_path(n.cfg)) or {}
    p = st.get("p")
    print(json.dumps({"key": n.key.hex(), "v": n.key_version, "first": n.key_first,
                      "prev": n.key_prev.hex() if n.key_prev else None,
                      "p": [p[0], p[1].hex(), p[2].hex(), p[3].hex()] if p else None}))


n = Node()
start.keys(n, n.cfg, None)  # the boot: finishes an interrupted commit
start.bind_state(n.cfg["state_dir"], n.key, None)  # and ties the counters to its key
if mode == "boot":
    show(n)
    sys.exit(0)
from node import rekey

writes = [0]


def cut_write(path, data):
    writes[0] += 1
    if writes[0] == cut_at:
        if stage == "done":
            outbox._write_atomic(path, data)
        else:
            with open(path + ".tmp", "wb") as f:
                f.write(data if stage == "tmp" else data[:len(data) // 2])
        print("CUT")
        while True:
            time.sleep(1)  # the test pulls the plug now
    outbox._write_atomic(path, data)


rekey._write_atomic = cut_write
code, res = rekey.rekey(n, gw_pub, 1)
print(json.dumps({"rekey": code, "node_pub": res[1].hex() if code == 0 else None}))
code, res = rekey.commit(n, 1)
print(json.dumps({"commit": code, "first": res.get(3)}))
show(n)
""".replace("FIRST", str(FIRST)).replace("NODE", NODE)


def run(d: Path, mode: str, gw_pub: bytes, cut: int = 0, stage: str = "done"
        ) -> list[Any]:
    """The script's JSON lines; a cut process is killed once it says CUT."""
    proc = subprocess.Popen([str(MICROPYTHON), "-X", "heapsize=110K", str(d / "run.py"), mode,
                             str(d), gw_pub.hex(), str(cut), stage],
                            env={"MICROPYPATH": MP_PATH}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        if line.startswith("CUT"):
            proc.send_signal(signal.SIGKILL)  # the power cut, between two writes
            break
        if line.startswith("{"):  # else the firmware's own messages
            out.append(json.loads(line))
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode in (0, -signal.SIGKILL), proc.returncode
    return out


def derived(gw: X25519PrivateKey, node_pub: str, old: bytes) -> bytes:
    shared = gw.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(node_pub)))
    info = b"lantern rekey v1" + NODE.encode() + (1).to_bytes(4, "big")
    return HKDF(hashes.SHA256(), 32, old, info).derive(shared)


def check_state(d: Path, st: dict[str, Any], old: bytes, gw: X25519PrivateKey,
                gw_pub: bytes) -> None:
    """Exactly one usable key, and the rotation state agrees with it."""
    key = bytes.fromhex(st["key"])
    on_file = bytes.fromhex((d / "node.key").read_text())
    assert on_file == key, "the key file holds the key the node uses"
    assert stat.S_IMODE((d / "node.key").stat().st_mode) == 0o600
    rk = d / "state/key.rk"
    if rk.exists():
        assert stat.S_IMODE(rk.stat().st_mode) == 0o600
    if key == old:
        assert (st["v"], st["first"], st["prev"]) == (0, None, None), st
        p = st["p"]
        if p is not None:  # a pending key that is the agreement's, for this gateway key
            assert p[0] == 1 and p[1] == gw_pub.hex()
            assert bytes.fromhex(p[3]) == derived(gw, p[2], old)
    else:
        assert (st["v"], st["first"], st["prev"], st["p"]) == (1, FIRST, old.hex(), None), st


CASES = [(w, s) for w in (1, 2, 3, 4, 5) for s in ("torn", "tmp", "done")]


@pytest.mark.parametrize(("cut", "stage"), CASES)
def test_a_power_cut_at_any_write_leaves_one_usable_key(tmp_path: Path, cut: int,
                                                          stage: str) -> None:
    old = bytes(range(32))
    key_file = tmp_path / "node.key"
    key_file.write_text(old.hex() + "\n")
    key_file.chmod(0o600)
    (tmp_path / "state").mkdir()
    (tmp_path / "run.py").write_text(SCRIPT)
    gw = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    gw_pub = gw.public_key().public_bytes_raw()
    before = run(tmp_path, "rotate", gw_pub, cut, stage)
    (st,) = run(tmp_path, "boot", gw_pub)
    check_state(tmp_path, st, old, gw, gw_pub)
    if cut >= 2:  # the REKEY's record reached flash before the cut: its REPLY went out
        assert before[0]["rekey"] == 0
        if bytes.fromhex(st["key"]) == old:
            assert st["p"] is not None and st["p"][2] == before[0]["node_pub"]
    # rebooted twice: nothing moves
    assert run(tmp_path, "boot", gw_pub) == [st]
    # the gateway asks again (REKEY, COMMIT): the rotation completes, to the same key if the
    # commit had reached flash
    after = run(tmp_path, "rotate", gw_pub)
    final = after[-1]
    check_state(tmp_path, final, old, gw, gw_pub)
    assert final["v"] == 1 and bytes.fromhex(final["key"]) != old
    if st["v"] == 1:
        assert final["key"] == st["key"]
        assert after[0]["rekey"] == 2  # the version is current: REKEY refused, COMMIT answered
    else:
        assert after[0]["rekey"] == 0
        assert final["key"] == derived(gw, after[0]["node_pub"], old).hex()
    assert run(tmp_path, "boot", gw_pub) == [final]
    # the counters are the new key's at once (node/start.py bind_state's marker and key id)
    kid = hashlib.sha256(b"lantern key id v1" + bytes.fromhex(final["key"])).hexdigest()[:16]
    assert (tmp_path / "node.key.used").read_text() == kid
    assert (tmp_path / "state/key_id").read_text() == kid


def test_a_node_provisioned_again_forgets_its_rotations(tmp_path: Path) -> None:
    old = bytes(range(32))
    key_file = tmp_path / "node.key"
    key_file.write_text(old.hex() + "\n")
    key_file.chmod(0o600)
    (tmp_path / "state").mkdir()
    (tmp_path / "run.py").write_text(SCRIPT)
    gw_pub = X25519PrivateKey.generate().public_key().public_bytes_raw()
    assert run(tmp_path, "rotate", gw_pub)[-1]["v"] == 1
    # `lantern provision` writes a new key file; the rotation record beside it is stale
    fresh = bytes(range(100, 132))
    key_file.write_text(fresh.hex() + "\n")
    (st,) = run(tmp_path, "boot", gw_pub)
    assert (st["key"], st["v"], st["prev"], st["p"]) == (fresh.hex(), 0, None, None)
    assert not (tmp_path / "state/key.rk").exists()
