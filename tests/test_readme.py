"""README's first example runs as pasted and shows frames in TensorBoard within a minute on the CPU (issue 13.1)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _lightning import read_events, scalar_steps

README = Path(__file__).resolve().parents[1] / "README.md"


def first_example() -> str:
    text = README.read_text()
    section = text[text.index("## A first example") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_first_example_is_short_and_complete():
    code = first_example()
    assert len(code.strip().splitlines()) <= 30
    compile(code, "README.md", "exec")  # a whole program, not a fragment


@pytest.mark.slow
def test_the_first_example_runs_as_pasted_and_shows_frames(tmp_path):
    (tmp_path / "first.py").write_text(first_example())
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "first.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert seconds < 60, seconds
    acc = read_events(tmp_path / "lightning_logs" / "version_0")
    steps = sorted(scalar_steps(acc, "hessian/eigenvalue_3"))
    assert len(steps) >= 2 and steps[0] <= 64 and steps[-1] == 640  # the first epoch's end, the fit's end
    assert "hessian/trace" in acc.Tags()["scalars"]
    assert "measurement(s) in this fit" in proc.stderr + proc.stdout
