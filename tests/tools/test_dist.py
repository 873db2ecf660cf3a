"""The offline bundle (`make dist`, packaging/dist.py) and its installer (packaging/install.sh).

The installer runs as root on this machine's real paths — /etc, /opt and /var/lib — each an
overlay kept under tmp_path, in a private mount namespace with no network (`unshare -m -n`):
the user `lantern` is really created (in the overlay's /etc/passwd), check-config really runs
as that user, and nothing can reach an index. PID 1 here is not systemd, so the restart and
the "becomes ready under systemd" half of an upgrade are not exercised (install.sh says so,
and the test checks that it does). The downloads are cached in .build/wheelhouse: the first
run of the session fills it from the index, later runs ask no index at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

import lantern

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".build" / "wheelhouse"
PYTHON = "/usr/bin/python3"  # the system's CPython 3.11: one the service user can run
LOCKED = {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9._-]+)==", (
    ROOT / "packaging" / "requirements.lock").read_text(), re.M)}

NAMESPACE = r"""
set -e
T=$1; shift
mount --make-rprivate /
for d in etc opt var/lib; do
    n=${d//\//_}; mkdir -p "$T/$n.up" "$T/$n.work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$n.up,workdir=$T/$n.work" "/$d"
done
exec "$@"
"""

WRITE_QUEUE = """
import asyncio, sys
from pathlib import Path
from lantern.agent.queue.store import Accepted, Store, Window

async def main():
    async with Store(Path(sys.argv[1])) as store:
        for seq in range(1, 41):
            node = f"SL-{seq % 3:04d}"
            recs = [{"n": f"urn:dev:{node}:temperature", "u": "Cel", "v": 20 + seq / 8,
                     "t": 1.7e9 + seq}]
            await store.commit([Accepted(node, seq, b"", recs)], {node: Window(seq, 1, b"")})

asyncio.run(main())
"""


def copy_tree(dest: Path, version: str | None = None) -> Path:
    """The tree's files (as `git ls-files` lists them), optionally as another version."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        path = ROOT / name
        if not path.exists() and not path.is_symlink():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            (dest / name).symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, dest / name)
    if version is not None:
        app = dest / "firmware" / "node" / "app.py"
        app.write_text(re.sub(r'(?m)^FIRMWARE_VERSION = "[^"]+"$',
                              f'FIRMWARE_VERSION = "{version}"', app.read_text()))
    return dest


def dist(src: Path, out: Path, *arches: str) -> Path:
    args = [a for arch in arches for a in ("--arch", arch)]
    r = subprocess.run([sys.executable, str(src / "packaging" / "dist.py"), "--out", str(out),
                        "--cache", str(CACHE), *args], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    (bundle,) = [p for p in out.iterdir() if p.is_dir()]
    return bundle


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 for every platform; v2 (an upgrade) and a v3 whose check-config fails, for this one."""
    tmp = tmp_path_factory.mktemp("dist")
    v = lantern.__version__
    out = {"v1": dist(copy_tree(tmp / "src1"), tmp / "dist1")}
    out["v2"] = dist(copy_tree(tmp / "src2", f"{v}.post1"), tmp / "dist2", "x86_64")
    src3 = copy_tree(tmp / "src3", f"{v}.post2")
    # a release that runs but refuses every config: the installer must not switch to it
    (src3 / "agent" / "broken_cli.py").write_text(
        "import sys\n\nfrom lantern.agent.cli import main as real\n\n\n"
        "def main() -> int:\n    if 'check-config' in sys.argv:\n"
        "        print('lantern: broken on purpose', file=sys.stderr)\n        return 2\n"
        "    return real()\n")
    pyproject = src3 / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(
        'lantern = "lantern.agent.cli:main"', 'lantern = "lantern.agent.broken_cli:main"'))
    out["v3"] = dist(src3, tmp / "dist3", "x86_64")
    return out


def in_root(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """cmd as root on /etc, /opt and /var/lib overlays kept in `root`, with no network."""
    r = subprocess.run(["unshare", "-m", "-n", "--", "bash", "-c", NAMESPACE, "ns", str(root),
                        *cmd], capture_output=True, text=True, timeout=600, cwd="/",
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON": PYTHON,
                            "LANG": "C.UTF-8"})
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def frames(root: Path) -> list[tuple[str, int, bytes]]:
    db = sqlite3.connect(f"file:{root / 'var_lib.up/lantern/queue.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT node, seq, body FROM frames ORDER BY id").fetchall()
    finally:
        db.close()


def current(root: Path) -> str:
    return os.readlink(root / "opt.up/lantern/current")


def populate(root: Path) -> None:
    """Operator's edits and a queue of 40 frames written by the installed gateway's Store."""
    etc = root / "etc.up/lantern"
    (etc / "gateway.toml").write_text((etc / "gateway.toml").read_text().replace(
        "/dev/ttyUSB0", "/dev/ttyAMA0"))
    keys = etc / "keys.toml"
    keys.write_text(keys.read_text() + '"SL-0001" = "' + "ab" * 32 + '"\n')
    in_root(root, "runuser", "-u", "lantern", "--", "/opt/lantern/current/bin/python", "-I",
            "-c", WRITE_QUEUE, "/var/lib/lantern/queue.sqlite")


def test_the_bundle_carries_every_locked_dependency_for_each_platform(
        bundles: dict[str, Path]) -> None:
    b = bundles["v1"]
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["platforms"] == ["x86_64", "aarch64", "armv7l"]
    assert meta["version"] == lantern.__version__
    for arch in meta["platforms"]:
        served = {re.split(r"-\d", f)[0].replace("_", "-").lower()
                  for f, archs in meta["files"].items() if arch in archs}
        assert served == LOCKED, (arch, LOCKED ^ served)
    # the one dependency PyPI has no armv7l wheel for, that needs a compiler: said so
    assert meta["compile_on_gateway"] == {"armv7l": ["cffi==2.1.1"]}
    # every file is in the manifest, and the manifest matches
    listed = {line.split("  ", 1)[1] for line in (b / "MANIFEST.sha256").read_text().splitlines()}
    assert listed == {p.relative_to(b).as_posix() for p in b.rglob("*")
                      if p.is_file() and p.name != "MANIFEST.sha256"}
    subprocess.run(["sha256sum", "--quiet", "--strict", "-c", "MANIFEST.sha256"], cwd=b,
                   check=True)
    assert (b.parent / f"{b.name}-gateway.tar.gz").is_file()
    # requirements.txt pins and hashes everything, Lantern's own wheel included
    reqs = (b / "requirements.txt").read_text()
    assert re.search(rf"^lantern=={re.escape(lantern.__version__)} \\\n    --hash=sha256:", reqs,
                     re.M)


def test_offline_install_then_upgrade_keeps_config_keys_and_every_frame(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = in_root(root, str(bundles["v1"] / "install.sh"))
    assert f"check-config of Lantern {lantern.__version__} as user lantern: OK" in first.stdout
    assert "systemd is not running here" in first.stdout
    assert "lantern:x:" in (root / "etc.up/passwd").read_text()
    populate(root)
    before = frames(root)
    assert len(before) == 40
    etc = root / "etc.up/lantern"
    config, keys = (etc / "gateway.toml").read_text(), (etc / "keys.toml").read_text()
    old = current(root)

    up = in_root(root, str(bundles["v2"] / "install.sh"))
    assert f"check-config of Lantern {lantern.__version__}.post1 as user lantern: OK" in up.stdout
    assert f"the previous one, {old}, is kept for a rollback" in up.stdout
    assert current(root).startswith(f"releases/{lantern.__version__}.post1-")
    assert (etc / "gateway.toml").read_text() == config
    assert (etc / "keys.toml").read_text() == keys
    assert oct((etc / "keys.toml").stat().st_mode & 0o777) == "0o600"
    assert frames(root) == before
    # the new release's own Store opens the queue and counts every frame still to deliver
    r = in_root(root, "runuser", "-u", "lantern", "--", "/opt/lantern/current/bin/python",
                "-I", "-c", "import asyncio, sys\nfrom pathlib import Path\n"
                "from lantern.agent.queue.store import Store\n"
                "async def main():\n"
                "    async with Store(Path(sys.argv[1])) as s:\n"
                "        print((await s.depth())[0])\n"
                "asyncio.run(main())", "/var/lib/lantern/queue.sqlite")
    assert int(r.stdout.split()[-1]) == 40, r.stdout
    r = in_root(root, "/opt/lantern/bin/lantern", "--version")
    assert r.stdout.strip() == f"lantern {lantern.__version__}.post1"


def test_a_release_that_fails_check_config_is_rolled_back(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    in_root(root, str(bundles["v1"] / "install.sh"))
    populate(root)
    before, old = frames(root), current(root)
    r = in_root(root, str(bundles["v3"] / "install.sh"), check=False)
    assert r.returncode == 1
    assert "broken on purpose" in r.stderr
    assert "rolled back, the installed version stays" in r.stderr
    assert current(root) == old
    assert [p.name for p in (root / "opt.up/lantern/releases").iterdir()] == [old.split("/")[1]]
    assert frames(root) == before
    assert in_root(root, "/opt/lantern/bin/lantern", "--version").stdout.strip() == \
        f"lantern {lantern.__version__}"


def test_uninstall_keeps_data_unless_purged(bundles: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    in_root(root, str(bundles["v1"] / "install.sh"))
    populate(root)
    r = in_root(root, str(bundles["v1"] / "install.sh"), "--uninstall")
    assert "kept /etc/lantern (config, keys) and /var/lib/lantern" in r.stdout
    gone = in_root(root, "test", "-e", "/opt/lantern", check=False)
    assert gone.returncode == 1
    assert in_root(root, "test", "-e", "/etc/systemd/system/lantern-gateway.service",
                   check=False).returncode == 1
    assert len(frames(root)) == 40 and (root / "etc.up/lantern/keys.toml").exists()
    in_root(root, str(bundles["v1"] / "install.sh"), "--uninstall", "--purge")
    for path in ("/etc/lantern", "/var/lib/lantern"):
        assert in_root(root, "test", "-e", path, check=False).returncode == 1, path
    assert "lantern:x:" not in (root / "etc.up/passwd").read_text()


def test_a_clone_is_not_a_bundle(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(ROOT / "packaging" / "install.sh")], capture_output=True,
                       text=True, env={"PATH": os.environ["PATH"], "DESTDIR": str(tmp_path)})
    assert r.returncode == 1 and "run `make dist` and `make install`" in r.stderr
    assert not any(tmp_path.iterdir())


def test_sbom_of_a_release_is_valid_cyclonedx(bundles: dict[str, Path], tmp_path: Path) -> None:
    """`make sbom`: the gateway's environment (cyclonedx-py) and the node's firmware in one
    CycloneDX document, valid by cyclonedx-python-lib's own strict schema validation."""
    out = tmp_path / "lantern.cdx.json"
    r = subprocess.run([sys.executable, str(ROOT / "packaging" / "sbom.py"), "--bundle",
                        str(bundles["v1"]), "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    assert bom["metadata"]["component"]["name"] == "lantern"
    assert bom["metadata"]["component"]["version"] == lantern.__version__
    names = {c["name"].lower().replace("_", "-") for c in bom["components"]}
    assert names >= LOCKED, LOCKED - names
    node = next(c for c in bom["components"] if c["name"] == "lantern-node")
    parts = {c["name"]: c for c in node["components"]}
    assert parts["micropython"]["version"] == "1.25.0"
    assert "node/app.py" in parts and "main.py" in parts
    assert all(len(c["hashes"][0]["content"]) == 64 for n, c in parts.items()
               if n != "micropython")
    # a damaged document is refused by the same validator
    bom["components"][0]["type"] = "gadget"
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom)) is not None
