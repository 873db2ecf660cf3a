"""The wheel a technician installs: one import package, the node's files inside, no checkout.

Built from the tree's files (tracked and new, as `git ls-files` lists them, copied so the
build leaves the checkout alone) with `pip wheel --no-deps`, installed non-editable into a
fresh venv, and run from a folder outside any checkout. The venv borrows the test venv's
third-party packages through a .pth line (a plain path: the editable Lantern's own .pth files
there are not processed), so only the wheel can provide `lantern`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import lantern

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        path = ROOT / name
        if not path.exists() and not path.is_symlink():
            continue  # deleted in the working tree
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            (src / name).symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w",
                    str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("lantern-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    (Path(site.stdout.strip()) / "lantern-test-deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    return venv


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "lantern"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)})


def test_the_wheel_holds_one_import_package_with_the_node_inside(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"lantern", f"lantern-{lantern.__version__}"
                                                ".dist-info"}
    assert "lantern/firmware/main.py" in names
    assert "lantern/firmware/node/app.py" in names
    assert "lantern/firmware/node/hal/esp32.py" in names
    assert "lantern/boards/esp32-devkitc.json" in names
    assert "lantern/agent/status/index.html" in names or any(
        n.startswith("lantern/agent/status/") and n.endswith(".html") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # every node source and board file of the tree is in it
    tree = {f"lantern/{p.relative_to(ROOT).as_posix()}" for p in
            [*(ROOT / "firmware/node").rglob("*.py"), *(ROOT / "boards").glob("*.json")]
            if "__pycache__" not in p.parts}
    assert tree <= set(names), sorted(tree - set(names))


def test_installed_lantern_runs_outside_a_checkout(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import lantern; print(lantern.__file__, lantern.CHECKOUT)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(installed)) and where.split()[1] == "None", where
    assert run(installed, "--version", cwd=tmp_path).stdout.strip() == \
        f"lantern {lantern.__version__}"


def test_provision_dry_run_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    r = run(installed, "provision", "node", "--board", "esp32-devkitc", "--id", "SL-0042",
            "--port", "/dev/ttyUSB9", "--location", "52.52,13.40", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "[1/10] check: board esp32-devkitc (esp32)" in r.stdout
    # staged in the user's cache, never inside the installed package; nothing changed
    assert f"staging in {tmp_path}/.cache/lantern/provision/SL-0042" in r.stdout
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "keys.toml").exists()
    unknown = run(installed, "provision", "node", "--board", "esp32-nonesuch", "--id",
                  "SL-0042", "--dry-run", cwd=tmp_path)
    assert unknown.returncode != 0 and "esp32-devkitc" in unknown.stdout + unknown.stderr


def test_check_config_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[nodes]\n"SL-0042" = "' + "ab" * 32 + '"\n')
    keys.chmod(0o600)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\nkeys_file = "{keys}"\n\n'
                   '[[links.serial]]\nport = "/dev/ttyUSB0"\n\n'
                   '[sinks.http]\nurl = "https://data.example.org/ingest"\n')
    r = run(installed, "gateway", "check-config", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"{cfg}: OK (1 serial links, 1 node keys)")
    cfg.write_text(cfg.read_text() + "baudrate = 9600\n")
    bad = run(installed, "gateway", "check-config", "--config", str(cfg), cwd=tmp_path)
    assert bad.returncode == 2 and "baudrate" in bad.stderr and "Traceback" not in bad.stderr
