"""A board's filesystem as a directory that provisioning's esptool/mpremote runs act on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"

# A stand-in for MicroPython's esp32 module: NVS blobs become files on the flash directory.
ESP32_STUB = """
class NVS:
    def __init__(self, ns):
        self.ns = ns
    def set_blob(self, k, v):
        with open("nvs_%s_%s" % (self.ns, k), "wb") as f:
            f.write(v)
    def commit(self):
        pass
"""


# The node's firmware on its flash: boot (outbox, key binding) and seal `n` packs, a minute
# apart from Unix time `t0`; prints every waiting frame as [seq, hex].
SEAL_SCRIPT = r"""
import json, sys
from node import app, start
from node.outbox import Outbox

cfg = start.load_config("node.json")
if cfg.get("key_store") == "nvs":
    with open("nvs_lantern_node_key", "rb") as f:
        key = f.read()
else:
    key = start.load_key(cfg["key_file"])
ob = Outbox(cfg["state_dir"])
start.bind_state(cfg["state_dir"], key, None)

class Sealer:
    pass

s = Sealer()
s.outbox, s.kid, s.key = ob, cfg["id"].encode(), key
t0 = int(sys.argv[2])
for i in range(int(sys.argv[1])):
    app.Node.seal(s, t0 + 60 * i, {"temperature": 20.5 + i})
print(json.dumps([[q, ob.get(q).hex()] for q in ob.seqs()]))
"""


class Flash:
    """The board's filesystem as a directory; esptool and mpremote runs act on it."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "flash"
        self.root.mkdir()
        self.lib = tmp / "mplib"
        self.lib.mkdir()
        (self.lib / "esp32.py").write_text(ESP32_STUB)
        self.scripts = tmp / "scripts"
        self.scripts.mkdir()
        self.ran: list[list[str]] = []

    def micropython(self, script: str, *args: str) -> str:
        path = self.scripts / f"s{len(list(self.scripts.iterdir()))}.py"
        path.write_text(script)
        mp_path = f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}:{self.lib}"
        r = subprocess.run([str(MICROPYTHON), "-X", "heapsize=1M", str(path), *args],
                           env={"MICROPYPATH": mp_path}, cwd=self.root, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def run(self, argv: list[str], what: str, fix: str, timeout: float = 300) -> str:
        """tools.provision._run, as a board on a USB port would answer it."""
        self.ran.append(argv)
        assert argv[:2] == [sys.executable, "-m"], argv
        if argv[2] == "esptool":
            if "erase-flash" in argv:
                shutil.rmtree(self.root)
                self.root.mkdir()
            return ""  # write-flash: MicroPython itself is not on this directory
        assert argv[2:4] == ["mpremote", "connect"], argv
        out = []
        cmd: list[str] = []
        for a in [*argv[5:], "+"]:
            if a != "+":
                cmd.append(a)
                continue
            if cmd[:3] == ["fs", "cp", "-r"]:
                src = Path(cmd[3])
                shutil.copytree(src, self.root / src.name, dirs_exist_ok=True)
            elif cmd[:2] == ["fs", "cp"]:
                assert cmd[-1] == ":", cmd
                for f in cmd[2:-1]:
                    shutil.copy(f, self.root / Path(f).name)
            elif cmd[0] == "exec":
                out.append(self.micropython(cmd[1]))
            elif cmd[0] == "run":
                out.append(self.micropython(Path(cmd[1]).read_text()))
            else:
                raise AssertionError(f"mpremote {cmd} not expected")
            cmd = []
        return "".join(out)

    def seal(self, n: int, t0: int) -> dict[int, bytes]:
        """Boot the node on this flash and seal n packs from time t0: every waiting frame."""
        rows = json.loads(self.micropython(SEAL_SCRIPT, str(n), str(t0)).splitlines()[-1])
        return {int(s): bytes.fromhex(h) for s, h in rows}
