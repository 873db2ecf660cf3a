"""No default or shared credential ships (ETSI EN 303 645 provision 5.1-1; SECURITY.md).

Every file a gateway or a node receives from us — the example config, the unit, the
installer, the packaging scripts, the board files — is read for a credential written into
it: a token, password, secret or key assigned a literal value, a URL with user:password@, a
64-hex-digit key, a PEM private key. Secrets live only in files the operator makes (mode
0600, named by *_file keys); the example config names no token at all.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted({
    ROOT / "docs" / "gateway.example.toml",
    *(ROOT / "packaging").rglob("*"),
    *(ROOT / "boards").rglob("*.json"),
    ROOT / "boards" / "qemu-mps2-an385" / "manifest.py",
    *(ROOT / "scripts").glob("*.sh"),
} - {ROOT / "packaging" / "requirements.lock"})  # its sha256 hashes are not keys

ASSIGNED = re.compile(
    r"""(?ix)\b(token|password|passwd|secret|api_?key|private_?key|psk|bindkey|key)\b
        \s*[:=]\s*["'][^"'\s]{4,}["']""")
LEAKS = [
    ("a credential assigned a literal", ASSIGNED),
    ("a URL with user:password@", re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")),
    ("a 256-bit key in hex", re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")),
    ("a PEM private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
]
# the installer checks its bundle and the MicroPython source against published SHA-256 sums
HASH_SUM_LINE = re.compile(r"(?i)(sha256|_SHA=|--hash)")


def files() -> list[Path]:
    return [p for p in SHIPPED if p.is_file() and "__pycache__" not in p.parts]


def test_the_shipped_files_are_the_ones_read() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in files()}
    assert {"docs/gateway.example.toml", "packaging/install.sh",
            "packaging/systemd/lantern-gateway.service", "packaging/dist.py"} <= names


@pytest.mark.parametrize("path", files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_credential_is_written_into_a_shipped_file(path: Path) -> None:
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for what, pattern in LEAKS:
            if what == "a 256-bit key in hex" and HASH_SUM_LINE.search(line):
                continue
            assert not pattern.search(line), f"{path.relative_to(ROOT)} line {n}: {what}"


def test_the_example_gateway_config_has_no_token() -> None:
    cfg = tomllib.loads((ROOT / "docs" / "gateway.example.toml").read_text())

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                assert not re.search(r"(?i)token|password|secret", k) or k.endswith("_file"), \
                    f"{where}{k}: a credential in the example"
                walk(v, f"{where}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}].")

    walk(cfg, "")
    # and no token_file is switched on: an installed gateway starts with none configured
    assert not re.search(r"(?m)^\s*token_file\s*=",
                         (ROOT / "docs" / "gateway.example.toml").read_text())


def test_the_installer_writes_an_empty_key_file() -> None:
    text = (ROOT / "packaging" / "install.sh").read_text()
    assert "'[nodes]' > \"$DESTDIR/etc/lantern/keys.toml\"" in text


def test_the_detector_finds_what_it_looks_for() -> None:
    for bad in ['token = "s3cr3t-abc"', "url = 'https://u:pw@example.org/x'",
                '"SL-0001" = "' + "ab" * 32 + '"', "-----BEGIN EC PRIVATE KEY-----"]:
        assert any(p.search(bad) for _, p in LEAKS), bad
    assert not any(p.search('token_file = "platform.token"') for what, p in LEAKS
                   if what == "a credential assigned a literal")
