"""Resume in a new process: schedules continue, directions and warm starts carry over."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _lightning import read_events, scalar_steps

TESTS = Path(__file__).resolve().parent

SCRIPT = """
import sys, torch, pytorch_lightning as pl
sys.path.insert(0, {tests!r})
from _lightning import DigitsModule, loaders
from lightning_landscape import HessianCallback, LossLandscapeCallback

out, epochs, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
train, val = loaders(n_train=128, batch_size=32)  # 4 steps per epoch
hess = HessianCallback(every_n_train_steps=3, top_k=2)
land = LossLandscapeCallback(every_n_epochs=1, steps=3, steps_1d=3)


class Capture(pl.Callback):
    def on_train_start(self, trainer, module):
        torch.save({{"eigenvectors": hess.eigenvectors, "directions": land.directions}}, f"{{out}}/start_{{epochs}}.pt")


ckpt = pl.callbacks.ModelCheckpoint(dirpath=f"{{out}}/ckpt", save_last=True, every_n_epochs=1)
trainer = pl.Trainer(
    accelerator="cpu", max_epochs=epochs, callbacks=[hess, land, Capture(), ckpt], enable_progress_bar=False,
    enable_model_summary=False, logger=pl.loggers.TensorBoardLogger(out, name="run", version=0),
)
trainer.fit(DigitsModule(), train, val, ckpt_path=f"{{out}}/ckpt/last.ckpt" if resume else None)
torch.save({{"eigenvectors": hess.eigenvectors, "directions": land.directions}}, f"{{out}}/end_{{epochs}}.pt")
"""


def _run(tmp_path: Path, epochs: int, resume: bool) -> None:
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS))))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(epochs), "resume" if resume else "fresh"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_resume_continues_schedules_and_state(tmp_path):
    _run(tmp_path, epochs=2, resume=False)
    _run(tmp_path, epochs=4, resume=True)
    acc = read_events(tmp_path / "run" / "version_0")
    # every 3 optimizer steps over 16 steps, each exactly once across the two processes
    assert sorted(scalar_steps(acc, "hessian/eigenvalue_1")) == [3, 6, 9, 12, 15]
    assert len(acc.Scalars("hessian/eigenvalue_1")) == 5
    # one landscape frame per epoch end: steps 4, 8, 12, 16, none twice, none skipped
    assert [e.step for e in acc.Images("landscape/surface_2d")] == [4, 8, 12, 16]
    first_end = torch.load(tmp_path / "end_2.pt")
    resumed_start = torch.load(tmp_path / "start_4.pt")
    resumed_end = torch.load(tmp_path / "end_4.pt")
    assert torch.equal(first_end["directions"], resumed_start["directions"])
    assert torch.equal(first_end["directions"], resumed_end["directions"])
    # the warm start continues from the eigenvectors of the last measurement before the stop
    assert torch.equal(first_end["eigenvectors"], resumed_start["eigenvectors"])
