"""A CycloneDX SBOM of one release (`make sbom`; docs/install.md).

The gateway's part is made by the `cyclonedx-bom` tool (cyclonedx-py) from the Python
environment install.sh would make: a virtualenv filled from the bundle, offline, with the
same hash-checked requirements. The node's part is added as one firmware component: the
MicroPython release it runs on (scripts/build-micropython.sh) and each firmware module with
its SHA-256. The result is checked with cyclonedx-python-lib's strict JSON schema validator.

    python packaging/sbom.py --bundle .build/dist/lantern-VERSION --out FILE.cdx.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

ROOT = Path(__file__).resolve().parents[1]


def gateway_environment(bundle: Path, work: Path) -> dict:  # type: ignore[type-arg]
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (pip,) = (bundle / "wheels").glob("pip-*.whl")
    subprocess.run([str(venv / "bin" / "python"), f"{pip}/pip", "install", "--isolated", "-q",
                    "--disable-pip-version-check", "--no-index", "--find-links",
                    str(bundle / "wheels"), "--require-hashes", "-r",
                    str(bundle / "requirements.txt")], check=True,
                   env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    out = work / "gateway.cdx.json"
    tool = Path(sys.executable).parent / "cyclonedx-py"
    subprocess.run([str(tool), "environment", "--mc-type", "application",
                    "--pyproject", str(ROOT / "pyproject.toml"), "--output-reproducible",
                    "--sv", "1.6", "-o", str(out), str(venv / "bin" / "python")], check=True)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def node_component(version: str) -> dict:  # type: ignore[type-arg]
    script = (ROOT / "scripts" / "build-micropython.sh").read_text()
    mpy = re.search(r'^VERSION="([0-9.]+)', script, re.M)
    orig = re.search(r"^ORIG_SHA=([0-9a-f]{64})", script, re.M)
    assert mpy and orig, "scripts/build-micropython.sh: no VERSION or ORIG_SHA"
    files = []
    for p in sorted([ROOT / "firmware" / "main.py", *(ROOT / "firmware" / "node").rglob("*.py")]):
        if "__pycache__" in p.parts:
            continue
        rel = p.relative_to(ROOT / "firmware").as_posix()
        files.append({"type": "file", "bom-ref": f"lantern-node/{rel}", "name": rel,
                      "version": version,
                      "hashes": [{"alg": "SHA-256",
                                  "content": hashlib.sha256(p.read_bytes()).hexdigest()}]})
    return {
        "type": "firmware", "bom-ref": "lantern-node", "name": "lantern-node",
        "version": version,
        "description": "the streetlight node's firmware: Lantern's MicroPython modules, "
                       "deployed as .mpy (ESP32) or frozen into the image (qemu board)",
        "licenses": [{"license": {"id": "Apache-2.0"}}],
        "components": [{
            "type": "firmware", "bom-ref": "micropython", "name": "micropython",
            "version": mpy.group(1), "licenses": [{"license": {"id": "MIT"}}],
            "purl": f"pkg:github/micropython/micropython@v{mpy.group(1)}",
            "description": "the interpreter the node runs on (ESP32 port, unix and qemu ports "
                           "in tests); its asyncio is frozen into the qemu image",
            "externalReferences": [{"type": "distribution", "url":
                                    "https://micropython.org/download/",
                                    "hashes": [{"alg": "SHA-256", "content": orig.group(1)}],
                                    "comment": "the source built here: Debian's "
                                               f"micropython_{mpy.group(1)}+ds.orig.tar.xz"}],
        }, *files],
    }


def merge(gateway: dict, node: dict) -> dict:  # type: ignore[type-arg]
    bom = dict(gateway)
    bom.setdefault("components", []).append(node)
    bom["metadata"]["component"]["version"] = node["version"]  # (dynamic in pyproject)
    root = bom["metadata"]["component"]["bom-ref"]
    deps = bom.setdefault("dependencies", [])
    for d in deps:
        if d["ref"] == root:
            d.setdefault("dependsOn", []).append("lantern-node")
    deps += [{"ref": "lantern-node", "dependsOn": ["micropython"]},
             {"ref": "micropython"}]
    return bom


def validate(text: str) -> None:
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        sys.exit(f"sbom: not valid CycloneDX 1.6: {error}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    version = json.loads((args.bundle / "bundle.json").read_text())["version"]
    with tempfile.TemporaryDirectory() as work:
        bom = merge(gateway_environment(args.bundle, Path(work)), node_component(version))
    text = json.dumps(bom, indent=2) + "\n"
    validate(text)
    args.out.write_text(text)
    print(f"sbom: {args.out}: {len(bom['components'])} components (CycloneDX 1.6, valid)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
