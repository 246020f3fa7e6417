"""``examples/trajectory.py --fast``: the path's plane is drawn, exported and readable."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import trajectory


def test_trajectory_example_fast(tmp_path):
    result = trajectory.main(["--fast", "--logdir", str(tmp_path / "logs"), "--out", str(tmp_path / "out")])
    assert result["snapshots"] == 17  # the initial weights and 16 steps (2 epochs of 8 batches)
    total = result["explained_variance_1"] + result["explained_variance_2"]
    assert result["explained_variance_1"] >= result["explained_variance_2"] > 0 and total <= 1 + 1e-9
    saved = np.load(tmp_path / "out" / "trajectory.npz")
    assert saved["losses"].shape == (5, 5) and np.isfinite(saved["losses"]).all()
