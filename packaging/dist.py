"""Build the gateway's offline bundle (`make dist`; docs/install.md).

    OUT/lantern-VERSION/                 what install.sh installs from, with no network
      install.sh  systemd/  gateway.example.toml  doc/  prometheus/
      requirements.txt                   the lock, plus Lantern's wheel and any wheel built here
      wheels/                            Lantern's wheel and every locked dependency for CPython
                                         3.11 on x86_64, aarch64 and armv7l (glibc <= 2.36)
      bundle.json                        version, platforms, which file serves which platform
      MANIFEST.sha256                    SHA-256 of every other file (`sha256sum -c`)
    OUT/lantern-VERSION-gateway.tar.gz   the same, to copy to a gateway

Every download is checked against packaging/requirements.lock's hashes and cached (CACHE): a
second build, or one with the cache full and the network cut, asks no index. A dependency
with no wheel for a platform is built once here from its sdist (hash-checked) when it builds
as pure Python; one that needs a compiler ships as its sdist, and install.sh builds it on
the gateway (bundle.json and install.sh name it and what the gateway needs for it).

    python3 packaging/dist.py [--out DIR] [--cache DIR] [--arch x86_64 --arch aarch64 ...]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "packaging" / "requirements.lock"
ARCHES = ("x86_64", "aarch64", "armv7l")
PY = "3.11"  # Debian 12 and Raspberry Pi OS 12 (bookworm): CPython 3.11, glibc 2.36
GLIBC_MAX = 36
# what a pure build of an sdist needs: no compiler (cobs falls back to Python when its C
# extension fails), no Cython (dbus-fast)
PURE_ENV = {"CC": "false", "CXX": "false", "SKIP_CYTHON": "1"}


def say(msg: str) -> None:
    print(f"dist: {msg}", flush=True)


def pip(*args: str, env: dict[str, str] | None = None, quiet: bool = False) -> bool:
    """pip as plain PyPI sees it: no machine-wide config, find-links or constraints."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    e.update(PIP_CONFIG_FILE=os.devnull, **(env or {}))
    cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args]
    out = subprocess.run(cmd, env=e, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL if quiet else None)
    return out.returncode == 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def locked() -> dict[str, tuple[str, set[str]]]:
    """name -> (version, hashes) from the lock."""
    out: dict[str, tuple[str, set[str]]] = {}
    for entry in re.split(r"\n(?=[a-z0-9])", LOCK.read_text()):
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        if m:
            out[norm(m.group(1))] = (m.group(2), set(re.findall(r"sha256:([0-9a-f]{64})", entry)))
    return out


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return norm(path.name.split("-")[0])


def platform_args(arch: str) -> list[str]:
    tags = [f"manylinux_2_{v}_{arch}" for v in range(17, GLIBC_MAX + 1)]
    tags.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    out = ["--only-binary=:all:", "--python-version", PY, "--implementation", "cp",
           "--abi", "cp" + PY.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for t in tags:
        out += ["--platform", t]
    return out


def build_lantern(stage: Path, cache: Path) -> Path:
    """Lantern's wheel from a copy of the tree's files (the build leaves the clone alone)."""
    src = stage / "src"
    src.mkdir()
    git = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True)
    names = ([n for n in git.stdout.decode().split("\0") if n] if git.returncode == 0 else
             [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
              if not {".build", ".venv", ".git", "__pycache__"} & set(p.relative_to(ROOT).parts)
              and (p.is_file() or p.is_symlink())])
    for name in names:
        p = ROOT / name
        if p.is_symlink():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).symlink_to(os.readlink(p))
        elif p.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, src / name)
    build = cache / "build"  # the build backend (setuptools), cached like the rest
    args = ["wheel", "-q", "--no-deps", "--no-index", "--find-links", str(build), str(src),
            "-w", str(stage / "wheel")]
    if not pip(*args, quiet=True):
        if not pip("download", "-q", "--only-binary=:all:", "-d", str(build),
                   "setuptools>=77", "wheel"):
            sys.exit("dist: cannot fetch setuptools to build Lantern's wheel")
        if not pip(*args):
            sys.exit("dist: building Lantern's wheel failed (see above)")
    (wheel,) = (stage / "wheel").glob("lantern-*.whl")
    return wheel


def fetch(arch: str, cache: Path, lock: dict[str, tuple[str, set[str]]]) -> dict[str, Path]:
    """Every locked dependency for one architecture: name -> wheel (or sdist) in the cache."""
    d = cache / arch
    d.mkdir(parents=True, exist_ok=True)
    got: dict[str, Path] = {}
    for name, (version, hashes) in sorted(lock.items()):
        nowheel = d / f"{name}-{version}.no-wheel"  # known: PyPI has none for this platform
        if not nowheel.exists() and not cached(d, name, version, hashes):
            req = d / f".{name}.txt"
            req.write_text(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}"
                                                             for h in sorted(hashes)) + "\n")
            if not pip("download", "-q", "--no-deps", *platform_args(arch), "--require-hashes",
                       "-r", str(req), "-d", str(d), quiet=True):
                nowheel.write_text(f"no {arch} wheel of {name} {version} on the index\n")
            req.unlink()
        if nowheel.exists():
            got[name] = build_pure(name, version, hashes, cache) or sdist(name, version,
                                                                          hashes, cache)
        else:
            got[name] = cached(d, name, version, hashes)[0]
    return got


def cached(d: Path, name: str, version: str, hashes: set[str]) -> list[Path]:
    return [p for p in d.glob("*.whl") if wheel_name(p) == name
            and p.name.split("-")[1] == version and sha256(p) in hashes]


def sdist(name: str, version: str, hashes: set[str], cache: Path) -> Path:
    """The locked sdist (hash-checked), cached."""
    d = cache / "sdist"
    d.mkdir(parents=True, exist_ok=True)
    for p in d.glob("*"):
        if wheel_name(p) == name and f"-{version}." in p.name and sha256(p) in hashes:
            return p
    req = d / f".{name}.txt"
    req.write_text(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hashes))
                   + "\n")
    if not pip("download", "-q", "--no-deps", "--no-binary=:all:", "--require-hashes",
               "-r", str(req), "-d", str(d)):
        sys.exit(f"dist: {name} {version}: neither a wheel for this platform nor its sdist")
    req.unlink()
    return sdist(name, version, hashes, cache)


def build_pure(name: str, version: str, hashes: set[str], cache: Path) -> Path | None:
    """A pure-Python wheel (py3-none-any) built once from the locked sdist, or None."""
    d = cache / "built"
    d.mkdir(parents=True, exist_ok=True)
    for p in d.glob(f"*-{version}-py3-none-any.whl"):
        if wheel_name(p) == name:
            return p
    if (d / f"{name}-{version}.not-pure").exists():
        return None
    src = sdist(name, version, hashes, cache)
    out = Path(tempfile.mkdtemp())
    try:
        if not pip("wheel", "-q", "--no-deps", str(src), "-w", str(out), env=PURE_ENV,
                   quiet=True):
            (d / f"{name}-{version}.not-pure").write_text("the sdist does not build without "
                                                          "a compiler\n")
            return None
        (whl,) = out.glob("*.whl")
        if any(n.endswith((".so", ".pyd")) for n in zipfile.ZipFile(whl).namelist()):
            (d / f"{name}-{version}.not-pure").write_text("built with compiled code\n")
            return None
        return retag_pure(whl, d)
    finally:
        shutil.rmtree(out)


def retag_pure(whl: Path, dest: Path) -> Path:
    """Copy a wheel with no compiled code as py3-none-any (some backends tag every build with
    the build machine's platform)."""
    dist, version = whl.name.split("-")[:2]
    target = dest / f"{dist}-{version}-py3-none-any.whl"
    if whl.name.endswith("-py3-none-any.whl"):
        shutil.copy2(whl, target)
        return target
    info = f"{dist}-{version}.dist-info"
    src = zipfile.ZipFile(whl)
    files = {n: src.read(n) for n in src.namelist()}
    wheel_meta = files[f"{info}/WHEEL"].decode()
    wheel_meta = re.sub(r"(?m)^Tag: .*\n", "", wheel_meta).replace(
        "Root-Is-Purelib: false", "Root-Is-Purelib: true").rstrip("\n") + "\nTag: py3-none-any\n"
    files[f"{info}/WHEEL"] = wheel_meta.encode()
    record = []
    for n, data in files.items():
        if n == f"{info}/RECORD":
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{n},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        for n in sorted(files, key=lambda n: (n.startswith(info), n)):
            z.writestr(zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0)), files[n])
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".build" / "dist")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "LANTERN_WHEEL_CACHE", ROOT / ".build" / "wheelhouse")))
    ap.add_argument("--arch", action="append", choices=ARCHES)
    args = ap.parse_args()
    arches = args.arch or list(ARCHES)
    out, cache = args.out.resolve(), args.cache.resolve()
    text = (ROOT / "firmware" / "node" / "app.py").read_text()
    version = re.search(r'^FIRMWARE_VERSION = "([^"]+)"$', text, re.M)
    if version is None:
        sys.exit("dist: no FIRMWARE_VERSION in firmware/node/app.py")
    name = f"lantern-{version.group(1)}"
    os.environ.setdefault("SOURCE_DATE_EPOCH", subprocess.run(
        ["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip() or "315532800")  # the same tree gives the same wheel and tarball
    epoch = int(os.environ["SOURCE_DATE_EPOCH"])
    out.mkdir(parents=True, exist_ok=True)
    bundle, tmp = out / name, out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("wheels", "systemd", "doc", "prometheus"):
        (tmp / sub).mkdir(parents=True)
    lock = locked()

    with tempfile.TemporaryDirectory() as stage:
        lantern_whl = build_lantern(Path(stage), cache)
        shutil.copy2(lantern_whl, tmp / "wheels")
    say(f"built {lantern_whl.name}")

    serves: dict[str, list[str]] = {lantern_whl.name: ["any"]}
    compile_on_gateway: dict[str, list[str]] = {}
    extra_hashes: dict[str, set[str]] = {}
    for arch in arches:
        files = fetch(arch, cache, lock)
        for dep, f in files.items():
            shutil.copy2(f, tmp / "wheels" / f.name)
            serves.setdefault(f.name, []).append(arch)
            if not f.name.endswith(".whl"):
                compile_on_gateway.setdefault(arch, []).append(f"{dep}=={lock[dep][0]}")
            elif sha256(f) not in lock[dep][1]:
                extra_hashes.setdefault(dep, set()).add(sha256(f))
        note = "".join(f"; {d} built here as pure Python" for d, f in files.items()
                       if f.parent.name == "built")
        note += "".join(f"; {d} ships as its sdist: compiled on the gateway"
                        for d in compile_on_gateway.get(arch, []))
        say(f"{arch}: {len(files)} locked dependencies{note}")
    if compile_on_gateway:  # pip builds those sdists with setuptools: carry it too
        for p in sorted((cache / "build").glob("setuptools-*.whl"))[-1:]:
            shutil.copy2(p, tmp / "wheels")
            serves[p.name] = ["build"]

    # the requirements install.sh hands pip: the lock with the hashes of the wheels built
    # here added to their entries, then Lantern itself
    reqs = []
    for entry in re.split(r"\n(?=[a-z0-9])", LOCK.read_text()):
        m = re.match(r"([A-Za-z0-9._-]+)==", entry)
        if not m:
            continue
        entry = "\n".join(line for line in entry.splitlines() if not line.strip().startswith("#"))
        for h in sorted(extra_hashes.get(norm(m.group(1)), ())):
            entry = entry.rstrip() + f" \\\n    --hash=sha256:{h}"
        reqs.append(entry.rstrip())
    own = sha256(tmp / "wheels" / lantern_whl.name)
    reqs.append(f"lantern=={version.group(1)} \\\n    --hash=sha256:{own}")
    (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")

    shutil.copy2(ROOT / "packaging" / "install.sh", tmp / "install.sh")
    shutil.copy2(ROOT / "packaging" / "systemd" / "lantern-gateway.service", tmp / "systemd")
    shutil.copy2(ROOT / "docs" / "gateway.example.toml", tmp)
    for doc in ("docs/gateway.md", "docs/install.md", "docs/alerts.md",
                "docs/gateway.example.toml", "SECURITY.md"):
        shutil.copy2(ROOT / doc, tmp / "doc")
    for rules in sorted((ROOT / "packaging" / "prometheus").glob("*.yml")):
        shutil.copy2(rules, tmp / "prometheus")  # the alert rules and their promtool tests
    (tmp / "install.sh").chmod(0o755)
    (tmp / "bundle.json").write_text(json.dumps({
        "name": "lantern", "version": version.group(1), "python": f"CPython {PY}",
        "platforms": arches, "glibc_max": f"2.{GLIBC_MAX}",
        "compile_on_gateway": compile_on_gateway,
        "files": {k: serves[k] for k in sorted(serves)}}, indent=2) + "\n")
    listing = sorted(p for p in tmp.rglob("*") if p.is_file())
    (tmp / "MANIFEST.sha256").write_text("".join(
        f"{sha256(p)}  {p.relative_to(tmp).as_posix()}\n" for p in listing))
    for p in [*tmp.rglob("*"), tmp]:
        os.utime(p, (epoch, epoch), follow_symlinks=False)
    shutil.rmtree(bundle, ignore_errors=True)
    tmp.rename(bundle)

    tarball = out / f"{name}-gateway.tar.gz"
    with open(f"{tarball}.tmp", "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=epoch) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mtime = epoch
            return ti

        for p in [bundle, *sorted(bundle.rglob("*"))]:
            tar.add(p, arcname=p.relative_to(out).as_posix(), recursive=False, filter=clean)
    os.replace(f"{tarball}.tmp", tarball)
    say(f"{bundle} ({len(list((bundle / 'wheels').iterdir()))} files in wheels/) for "
        f"{', '.join(arches)}")
    say(f"{tarball} (sha256 {sha256(tarball)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
