"""Bad inputs an operator, installer or technician gives Lantern, each with what it must answer.

Every case runs the real command line (`python -m lantern …`) in a folder of its own and
expects a documented exit code and one line that names what to fix (provision adds what to
do and how to resume, docs/field-tools.md) — never a traceback.
tests/test_bad_inputs.py runs them; `python -m tests.helpers.bad_inputs` prints the table
(exit code and message per input) that docs/troubleshooting.md and the session notes quote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LANTERN = [sys.executable, "-m", "lantern"]
KEY = "ab" * 32
GOOD = {
    "gateway": '[gateway]\nstate_dir = "state"\nkeys_file = "keys.toml"\n',
    "link": '[[links.serial]]\nport = "/dev/ttyUSB-lantern-test"\n',
    "sink": '[sinks.http]\nurl = "http://127.0.0.1:9/"\n',
    "api": "[api]\nenabled = false\n",
}


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]  # after `lantern`; {cfg} and {dir} are replaced
    code: int
    says: str  # a part of the one line the user reads
    setup: Callable[[Path], None] = lambda d: None
    prefix: tuple[str, ...] = ()  # e.g. unshare or setpriv


def write_config(d: Path, **parts: str) -> None:
    text = "\n".join(parts.get(k, v) for k, v in GOOD.items()) + parts.get("extra", "")
    (d / "gateway.toml").write_text(text)
    if not (d / "keys.toml").exists():
        (d / "keys.toml").write_text(f'[nodes]\n"SL-0001" = "{KEY}"\n')
        (d / "keys.toml").chmod(0o600)


def cfg(**parts: str) -> Callable[[Path], None]:
    return lambda d: write_config(d, **parts)


def then(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        for s in steps:
            s(d)
    return run


def keygen(d: Path) -> None:
    subprocess.run([*LANTERN, "release", "keygen", "--out", str(d / "k")], check=True,
                   capture_output=True, timeout=60)


CHECK = ["gateway", "check-config", "--config", "{cfg}"]
RUN = ["gateway", "run", "--config", "{cfg}"]
PROV = ["provision", "node", "--board", "esp32-devkitc", "--id", "SL-0042", "--dry-run"]

CASES = [
    Case("config file missing", CHECK, 2, "cannot read: No such file or directory"),
    Case("config is a directory", CHECK, 2, "cannot read: Is a directory",
         lambda d: (d / "gateway.toml").mkdir()),
    Case("config not TOML", CHECK, 2, "not valid TOML",
         lambda d: (d / "gateway.toml").write_text("[gateway\n")),
    Case("config not UTF-8", CHECK, 2, "not UTF-8 text (byte 0xdf); save the file as UTF-8",
         then(cfg(), lambda d: (d / "gateway.toml").write_bytes(
             (d / "gateway.toml").read_bytes() + b"# Stra\xdfe\n"))),
    Case("unknown section", CHECK, 2, "unknown section; expected one of", cfg(extra="[gatway]\n")),
    Case("typo in [gateway]", CHECK, 2, "gateway.keysfile: unknown key; expected",
         cfg(gateway='[gateway]\nstate_dir = "state"\nkeys_file = "keys.toml"\n'
             'keysfile = "k"\n')),
    Case("baud out of range", CHECK, 2, "links.serial[0].baud: must be 50 to 4000000",
         cfg(link='[[links.serial]]\nport = "/dev/ttyUSB0"\nbaud = 99999999999999999\n')),
    Case("baud zero", RUN, 2, "links.serial[0].baud: must be 50 to 4000000",
         cfg(link='[[links.serial]]\nport = "/dev/ttyUSB0"\nbaud = 0\n')),
    Case("no link", CHECK, 2, "no link configured", cfg(link="")),
    Case("no sink", CHECK, 2, "no sink configured", cfg(sink="")),
    Case("typo in [sinks.http]", CHECK, 2, "sinks.http.tokenfile: unknown key",
         cfg(sink='[sinks.http]\nurl = "http://127.0.0.1:9/"\ntokenfile = "t"\n')),
    Case("sink URL not HTTP", CHECK, 2, "sinks.http.url",
         cfg(sink='[sinks.http]\nurl = "ftp://example.org/"\n')),
    Case("log level unknown", CHECK, 2, "expected debug, info, warning or error",
         cfg(gateway='[gateway]\nstate_dir = "state"\nkeys_file = "keys.toml"\n'
             'log_level = "loud"\n')),
    Case("timeout infinite", CHECK, 2, "sinks.http.timeout_s: must be a finite number > 0",
         cfg(sink='[sinks.http]\nurl = "http://127.0.0.1:9/"\ntimeout_s = inf\n')),
    Case("batch age infinite", CHECK, 2, "batch.max_age_s: must be a finite number > 0",
         cfg(extra="[batch]\nmax_age_s = inf\n")),
    Case("batch size zero", CHECK, 2, "batch.max_records: must be 1..10000",
         cfg(extra="[batch]\nmax_records = 0\n")),
    Case("API port out of range", CHECK, 2, "api.port",
         cfg(api="[api]\nport = 70000\n")),
    Case("queue policy unknown", CHECK, 2, "queue.policy",
         cfg(extra='[queue]\npolicy = "drop_newest"\n')),
    Case("keys file missing", CHECK, 2, "keys.toml: node key file: cannot read",
         then(cfg(), lambda d: (d / "keys.toml").unlink())),
    Case("keys file readable by others", CHECK, 2, "lets other users read a secret; run: "
         "chmod 600", then(cfg(), lambda d: (d / "keys.toml").chmod(0o644))),
    Case("key not 64 hex digits", CHECK, 2, "SL-0001",
         then(cfg(), lambda d: (d / "keys.toml").write_text('[nodes]\n"SL-0001" = "abc"\n'))),
    Case("token file missing", CHECK, 2, "cannot read",
         cfg(sink='[sinks.http]\nurl = "http://127.0.0.1:9/"\ntoken_file = "token"\n')),
    Case("state_dir is a file (check-config)", CHECK, 2,
         "gateway.state_dir is a file, not a directory",
         then(cfg(), lambda d: (d / "state").write_text(""))),
    Case("state_dir is a file (run)", RUN, 2, "gateway.state_dir is a file, not a directory",
         then(cfg(), lambda d: (d / "state").write_text(""))),
    Case("state_dir on a read-only filesystem (run)", RUN, 2, "the filesystem is read-only",
         then(cfg(), lambda d: (d / "state").mkdir()),
         ("unshare", "-m", "--propagation", "private", "sh", "-c",
          'mount -t tmpfs -o ro lantern-test "$0/state" && exec "$@"', "{dir}")),
    Case("state_dir on a full disk (run)", RUN, 2, "the disk is full",
         then(cfg(), lambda d: (d / "state").mkdir()),
         ("unshare", "-m", "--propagation", "private", "sh", "-c",
          'mount -t tmpfs -o size=1m lantern-test "$0/state" && exec "$@"', "{dir}")),
    Case("provision: interval 0", [*PROV, "--interval", "0"], 1,
         "--interval 0: a node samples every 1 to 86400 s"),
    Case("provision: interval negative", [*PROV, "--interval", "-5"], 1,
         "a node samples every 1 to 86400 s"),
    Case("provision: unknown board", ["provision", "node", "--board", "esp32-nonesuch", "--id",
                                      "SL-0042", "--dry-run"], 1, "use one of: esp32-c3-devkitm-1"),
    Case("provision: bad node id", ["provision", "node", "--board", "esp32-devkitc", "--id",
                                    "SL 42!", "--dry-run"], 1, "SL 42!"),
    Case("provision: location off the globe", [*PROV, "--location", "200,0"], 1, "--location"),
    Case("diag: set-interval not a number", ["diag", "node", "set-interval", "abc", "--port",
                                             "{dir}/ttyUSB9"], 2,
         "set-interval needs seconds, e.g. `set-interval 60`"),
    Case("diag: identify not whole seconds", ["diag", "node", "identify", "1.5", "--port",
                                              "{dir}/ttyUSB9"], 2,
         "identify takes whole seconds"),
    Case("diag: no such port", ["diag", "node", "status", "--port", "{dir}/ttyUSB9"], 2,
         "is the cable plugged in?"),
    Case("diag: gateway unreachable", ["diag", "gateway", "--url", "http://127.0.0.1:9/"], 2,
         "is [api] enabled"),
    Case("release: verify a file that is not a bundle",
         ["release", "verify", "{dir}/gateway.toml", "--pubkey", "{dir}/k.pub.pem"], 1,
         "not a Lantern update bundle", then(cfg(), keygen)),
    Case("release: public key missing",
         ["release", "verify", "{dir}/gateway.toml", "--pubkey", "{dir}/none.pub.pem"], 2,
         "none.pub.pem", cfg()),
    Case("release: keygen over an existing key", ["release", "keygen", "--out", "{dir}/k"], 2,
         "k.pem", keygen),
    Case("sim: no nodes", ["sim", "--nodes", "0", "--dir", "{dir}/street"], 2,
         "--nodes must be at least 1"),
    Case("sim: interval not a number", ["sim", "--interval", "nan", "--dir", "{dir}/street"], 2,
         "--interval nan: a simulated node samples every"),
    Case("demo: --dir is a file", ["demo", "--nodes", "1", "--seconds", "1", "--dir",
                                   "{dir}/gateway.toml"], 2,
         "gateway.toml is not a folder (", cfg()),
]


def run(case: Case, d: Path) -> subprocess.CompletedProcess[str]:
    case.setup(d)

    def fill(a: str) -> str:
        return a.replace("{cfg}", str(d / "gateway.toml")).replace("{dir}", str(d))

    argv = [fill(a) for a in case.prefix] + LANTERN + [fill(a) for a in case.args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=d,
                          env={**os.environ, "HOME": str(d), "COLUMNS": "400"})


def table() -> str:
    rows = ["| # | input | exit | message |", "| --- | --- | --- | --- |"]
    for i, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as tmp:
            r = run(case, Path(tmp))
        text = (r.stderr + r.stdout).strip().splitlines()
        said = [t for t in text if t.lstrip().startswith(("lantern", "✗"))] or text or [""]
        line = said[0].strip()
        line = line.replace(tmp, "DIR").replace("|", "\\|")
        rows.append(f"| {i} | {case.name} | {r.returncode} | {line} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
