"""The node outbox (firmware/node/outbox.py) against a list model, on CPython and MicroPython.

Random puts, acknowledgements (in and out of order, unknown ones too), evictions at
max_frames and reboots (a new Outbox over the same directory): after every step the outbox
must agree with the model on count, oldest, newest, membership, contents and the sequence
numbers it hands out. The RAM index holds only the oldest HEAD numbers, so the runs go well
beyond HEAD to exercise the refills from the directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "firmware"))
from node import outbox as ob  # noqa: E402

MICROPYTHON = ROOT / ".build/micropython/unix/micropython"

# Runs on both VMs: a seeded script of operations; prints one JSON line per check.
SCRIPT = r"""
import json, sys
from node.outbox import Outbox, HEAD

def run(root, seed, steps, max_frames):
    state = [seed]
    def rnd(n):
        state[0] = (state[0] * 1103515245 + 12345) & 0x7FFFFFFF
        return state[0] % n
    box = Outbox(root, max_frames)
    model = []
    used = set()
    out = []
    for step in range(steps):
        op = rnd(10)
        if op < 5:
            seq = box.next_seq()
            if seq in used:
                out.append("reused %d" % seq)
            used.add(seq)
            box.put(seq, b"frame %d" % seq)
            model.append(seq)
            while len(model) > max_frames:
                model.pop(0)
        elif op < 8 and model:
            # mostly the oldest few (as ACKs come), sometimes any, sometimes unknown
            k = rnd(4)
            seq = model[min(k, len(model) - 1)] if rnd(3) else model[rnd(len(model))]
            if rnd(8) == 0:
                seq = seq + 100000
            got = box.remove(seq)
            want = seq in model
            if want:
                model.remove(seq)
            if got != want:
                out.append("remove %d: %r" % (seq, got))
        elif op == 8:
            box = Outbox(root, max_frames)  # a reboot
        else:
            probe = rnd(max(1, (model[-1] + 5) if model else 5))
            if (probe in box) != (probe in model):
                out.append("contains %d" % probe)
        if len(box) != len(model):
            out.append("len %d %d" % (len(box), len(model)))
        if box.oldest(4) != model[:4]:
            out.append("oldest %r %r" % (box.oldest(4), model[:4]))
        if box.newest() != (model[-1] if model else None):
            out.append("newest %r" % box.newest())
        if step % 25 == 0:
            if box.seqs() != model:
                out.append("seqs at %d" % step)
            for s in model[:3] + model[-3:]:
                if box.get(s) != b"frame %d" % s:
                    out.append("get %d" % s)
    return {"problems": out[:10], "final": len(model), "evicted": box.evicted,
            "head": HEAD}

print(json.dumps(run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
"""


def run_cpython(root: Path, seed: int, steps: int, max_frames: int) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root), str(seed), str(steps),
                           str(max_frames)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "firmware")}, check=True)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("seed", "max_frames"), [(1, 40), (2, 40), (3, 200), (4, 1000)])
def test_outbox_agrees_with_the_model_on_cpython(tmp_path: Path, seed: int,
                                                 max_frames: int) -> None:
    res = run_cpython(tmp_path, seed, 1500, max_frames)
    assert res["problems"] == []
    assert res["final"] > ob.HEAD  # the index really had to refill from the directory


@pytest.mark.micropython
@pytest.mark.parametrize(("seed", "max_frames"), [(1, 40), (5, 300)])
def test_outbox_agrees_with_the_model_on_micropython(tmp_path: Path, seed: int,
                                                     max_frames: int) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    (tmp_path / "mp").mkdir()
    (tmp_path / "cp").mkdir()
    proc = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(script),
                           str(tmp_path / "mp"), str(seed), "1500", str(max_frames)],
                          capture_output=True, text=True, timeout=300,
                          env={"MICROPYPATH": str(ROOT / "firmware")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    mp = json.loads(proc.stdout)
    assert mp["problems"] == []
    assert mp == run_cpython(tmp_path / "cp", seed, 1500, max_frames)  # same steps, same end


def test_a_long_outage_needs_no_memory_per_frame(tmp_path: Path) -> None:
    """1,000 waiting frames: RAM holds the oldest HEAD numbers, not a thousand."""
    box = ob.Outbox(str(tmp_path), 1000)
    for _ in range(1000):
        s = box.next_seq()
        box.put(s, b"x")
    assert len(box) == 1000 and len(box._head) == ob.HEAD
    again = ob.Outbox(str(tmp_path), 1000)  # a reboot with a full outbox
    assert len(again) == 1000 and again.oldest(4) == [0, 1, 2, 3] and again.newest() == 999
    assert again.next_seq() >= 1000
