"""`make reliability`: every reliability scenario at full size, a JSON table, docs/reliability.md.

The scenarios are the tests in hil_tests/test_reliability.py and tests/test_fuzz_*.py. Under
`make test` they run scaled down; here they run at the sizes the reliability claims are
made at (LANTERN_RELIABILITY=full). Each test records its figures as one JSON row (to the
file named by LANTERN_RELIABILITY_OUT) before it asserts on them, so a failing scenario
still shows up in the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
TESTS = ["hil_tests/test_reliability.py", "tests/test_fuzz_gateway.py", "tests/test_fuzz_node.py"]
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


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [BEGIN, "",
             f"Measured {meta['date']} on {meta['cpus']} CPUs at commit `{meta['commit']}`, "
             f"{meta['size']} size, {meta['seconds']:.0f} s in all "
             f"(`{meta['command']}`; pytest exit status {meta['pytest_rc']}).", "",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.reliability", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the scaled-down sizes of make test")
    p.add_argument("--no-doc", action="store_true", help="print the table, leave the docs")
    p.add_argument("-k", default="", help="only scenarios matching this pytest -k expression")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
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
            "python -m tools.reliability --quick"}
    print(json.dumps({"meta": meta, "scenarios": rows}, indent=1))
    if not args.no_doc and not args.k:
        write_doc(rows, meta)
    bad = [r["scenario"] for r in rows if r.get("lost") or r.get("accepted_forged")
           or r.get("accepted_corrupt")]
    if bad:
        print(f"reliability: nonzero lost/forged/corrupt in {bad}", file=sys.stderr)
    return rc or (1 if bad or not rows else 0)


if __name__ == "__main__":
    sys.exit(main())
