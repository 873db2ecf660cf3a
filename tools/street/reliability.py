"""`make reliability`: every reliability scenario at full size, a JSON table, docs/reliability.md.

The scenarios are the tests in hil_tests/test_reliability.py and tests/test_fuzz_*.py. Under
`make test` they run scaled down; here they run at the sizes the reliability claims are
made at (LANTERN_RELIABILITY=full). Each test records its figures as one JSON row (to the
file named by LANTERN_RELIABILITY_OUT) before it asserts on them, so a failing scenario
still shows up in the table.

They run under CPU load as a matter of course (`--load`, busy processes beside the tests):
a full run on an idle machine once showed 0 lost where a loaded one showed a pack lost
(the scenario's own accounting, docs/reliability.md), and machines that run them are rarely
idle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]  # make reliability runs in a clone
DOC = ROOT / "docs" / "reliability.md"
TESTS = ["hil_tests/test_reliability.py", "hil_tests/test_powercut.py",
         "tests/gateway/test_fuzz_gateway.py", "tests/firmware/test_fuzz_node.py"]
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"
COLUMNS = ("scenario", "sent", "delivered", "lost", "duplicates_upstream", "accepted_forged",
           "accepted_corrupt")

T = TypeVar("T")


def full() -> bool:
    return os.environ.get("LANTERN_RELIABILITY") == "full"


def size(quick: T, at_full: T) -> T:
    """The scaled-down figure under `make test`, the full one under `make reliability`."""
    return at_full if full() else quick


def record(row: dict[str, Any]) -> None:
    """Keep one scenario's figures for the table (only when make reliability collects them)."""
    out = os.environ.get("LANTERN_RELIABILITY_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({**row, "size": "full" if full() else "quick"}) + "\n")


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _load_text(meta: dict[str, Any]) -> str:
    n = meta.get("cpu_load_processes", 0)
    text = f"under CPU load: {n} busy process{'es' if n != 1 else ''} beside the tests" if n \
        else "no added CPU load"
    avg = meta.get("loadavg_1m")
    if avg:
        text += f", 1-minute load average {avg['mean']:g} (max {avg['max']:g})"
    return text


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [BEGIN, "",
             f"Measured {meta['date']} on {meta['cpus']} CPUs at commit `{meta['commit']}`, "
             f"{meta['size']} size, {meta['seconds']:.0f} s in all "
             f"(`{meta['command']}`; pytest exit status {meta['pytest_rc']}), "
             f"{_load_text(meta)}.", "",
             "| " + " | ".join(COLUMNS) + " | other figures |",
             "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in COLUMNS and k != "size"}
        other = "; ".join(f"{k}: {json.dumps(v, separators=(', ', ': '))}"
                          for k, v in extra.items())
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + f" | {other} |")
    lines += ["", END]
    return "\n".join(lines)


def write_doc(rows: list[dict[str, Any]], meta: dict[str, Any], doc: Path = DOC) -> None:
    """Replace the generated block of docs/reliability.md, keeping the prose around it."""
    text = doc.read_text() if doc.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + markdown(rows, meta) + tail)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Busy processes beside the tests by default: one keeps a full run under ~15 minutes on 2 CPUs.
DEFAULT_LOAD = 1


@contextmanager
def cpu_load(n: int, every_s: float = 5.0) -> Iterator[dict[str, Any]]:
    """n busy processes for the duration; yields the load averages seen (filled in at exit)."""
    seen: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            seen.append(os.getloadavg()[0])

    # each spins until stopped, or until this process is gone (no orphan left spinning)
    spin = ("import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n"
            "    for _ in range(100000): pass\n")
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out: dict[str, Any] = {"cpu_load_processes": n}
    try:
        yield out
    finally:
        stop.set()
        watcher.join()
        for p in busy:  # by the pids started here
            p.kill()
            p.wait()
        if seen:
            out["loadavg_1m"] = {"mean": round(sum(seen) / len(seen), 2),
                                 "max": round(max(seen), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lantern.tools.street.reliability",
                                description=__doc__)
    p.add_argument("--quick", action="store_true", help="the scaled-down sizes of make test")
    p.add_argument("--no-doc", action="store_true", help="print the table, leave the docs")
    p.add_argument("-k", default="", help="only scenarios matching this pytest -k expression")
    p.add_argument("--load", type=int, default=DEFAULT_LOAD, metavar="N",
                   help=f"busy processes beside the tests (default {DEFAULT_LOAD}; 0: none)")
    args = p.parse_args(argv)
    if args.load < 0:
        p.error(f"--load: expected 0 or more busy processes, got {args.load}")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, cpu_load(args.load) as load:
        out = Path(tmp) / "rows.jsonl"
        env = dict(os.environ, LANTERN_RELIABILITY="quick" if args.quick else "full",
                   LANTERN_RELIABILITY_OUT=str(out))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-o", "timeout=1500", *TESTS]
        if args.k:
            cmd += ["-k", args.k]
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr).returncode
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    rows.sort(key=lambda r: str(r["scenario"]))
    meta = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
            "commit": _commit(), "size": "quick" if args.quick else "full",
            "seconds": time.monotonic() - t0, "pytest_rc": rc,
            "command": "make reliability" if not args.quick else
            "python -m lantern.tools.street.reliability --quick", **load}
    print(json.dumps({"meta": meta, "scenarios": rows}, indent=1))
    if not args.no_doc and not args.k:
        write_doc(rows, meta)
    # (a row weakened on purpose, to show its scenario can fail, must lose: its test checks it)
    bad = [r["scenario"] for r in rows if not r.get("weakened_on_purpose")
           and (r.get("lost") or r.get("accepted_forged") or r.get("accepted_corrupt"))]
    if bad:
        print(f"reliability: nonzero lost/forged/corrupt in {bad}", file=sys.stderr)
    return rc or (1 if bad or not rows else 0)


if __name__ == "__main__":
    sys.exit(main())
