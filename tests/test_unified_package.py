"""The unified ``lightning`` package (``import lightning as L``), as Lightning's docs teach it (issue 13.2).

The rest of the suite runs on ``pytorch_lightning``; this focused subset runs the same promises on
``lightning.pytorch`` in fresh processes (so nothing else has imported the other package): the three callbacks and
SAMMixin on a subclass of an existing ``L.LightningModule``, TensorBoard images, LightningCLI from YAML, DDP on two
processes — and ``pytorch_lightning`` is never imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lightning")

TESTS = Path(__file__).resolve().parent

COMMON = """
import sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {tests!r})
import {package} as L
import torch
from torch import nn
from _models import digits
from lightning_landscape import HessianCallback, LossLandscapeCallback, SAMMixin, SharpnessCallback


class Existing(L.LightningModule):  # a user's module, written before they heard of SAM
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class WithSAM(SAMMixin, Existing):
    pass


def loaders():
    x, y = digits(256)
    data = torch.utils.data.TensorDataset
    return (torch.utils.data.DataLoader(data(x[:192], y[:192]), batch_size=32, shuffle=True),
            torch.utils.data.DataLoader(data(x[192:], y[192:]), batch_size=32))
"""


def _run(tmp_path: Path, body: str, timeout: float = 300) -> str:
    script = tmp_path / "unified.py"
    script.write_text(textwrap.dedent(COMMON.format(tests=str(TESTS), package="lightning")) + textwrap.dedent(body))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_callbacks_sam_and_tensorboard_images_with_lightning(tmp_path):
    out = _run(
        tmp_path,
        """
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        callbacks = [
            HessianCallback(every_n_epochs=1, density=True, density_probes=2, density_steps=4),
            SharpnessCallback(every_n_epochs=1, steps=3, samples=2),
            LossLandscapeCallback(every_n_epochs=1, steps=3, steps_1d=3),
        ]
        logger = L.pytorch.loggers.TensorBoardLogger(".", name="tb", version=0)
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=logger, callbacks=callbacks,
                            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
        model = WithSAM(sam=True, sam_rho=0.05)
        train, val = loaders()
        trainer.fit(model, train, val)
        acc = EventAccumulator("tb/version_0", size_guidance={"images": 0})
        acc.Reload()
        images = sorted(acc.Tags()["images"])
        print("IMAGES", images)
        print("STEPS", [e.step for e in acc.Images("landscape/surface_2d")])
        print("SCALARS", all(cb.last_metrics for cb in callbacks))
        print("PL_IMPORTED", "pytorch_lightning" in sys.modules)
        try:
            class Wrong(Existing, SAMMixin):
                pass
        except TypeError as err:
            print("ORDER", "put SAMMixin before" in str(err))
        """,
    )
    assert "IMAGES ['hessian/spectral_density', 'landscape/slice_1d', 'landscape/surface_2d']" in out
    assert "STEPS [6, 12]" in out
    assert "SCALARS True" in out
    assert "PL_IMPORTED False" in out
    assert "ORDER True" in out


@pytest.mark.slow
def test_sam_steps_with_lightning_equal_those_with_pytorch_lightning(tmp_path):
    # the mixin on either package's module gives the same weights (both run the same optimizer_step path)
    body = """
        torch.manual_seed(0)
        model = WithSAM(sam=True, sam_rho=0.1)
        train, _ = loaders()
        L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, deterministic=True).fit(model, torch.utils.data.DataLoader(
                      train.dataset, batch_size=32))
        print("W", [round(float(p.double().sum()), 12) for p in model.parameters()])
        print("OTHER", ("pytorch_lightning" if L.__name__ == "lightning" else "lightning") in sys.modules)
    """
    outs = []
    for package in ("lightning", "pytorch_lightning"):
        script = tmp_path / f"run_{package}.py"  # not lightning.py: it would shadow the package
        script.write_text(textwrap.dedent(COMMON.format(tests=str(TESTS), package=package)) + textwrap.dedent(body))
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs.append(proc.stdout)
    weights = [next(line for line in o.splitlines() if line.startswith("W ")) for o in outs]
    assert weights[0] == weights[1]
    assert "OTHER False" in outs[0] and "OTHER False" in outs[1]  # neither run imported the other package


@pytest.mark.slow
def test_lightning_cli_from_yaml_with_lightning(tmp_path):
    (tmp_path / "config.yaml").write_text(
        textwrap.dedent(
            """
            model:
              lr: 0.1
              sam: true
            trainer:
              max_epochs: 1
              accelerator: cpu
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              callbacks:
                - class_path: lightning_landscape.HessianCallback
                  init_args: {every_n_epochs: 1, top_k: 2}
                - class_path: lightning_landscape.SharpnessCallback
                  init_args: {every_n_epochs: 1, kinds: [worst_case_l2], steps: 3}
            """
        )
    )
    out = _run(
        tmp_path,
        """
        from lightning.pytorch.cli import LightningCLI

        class Data(L.LightningDataModule):
            def train_dataloader(self):
                return loaders()[0]

        cli = LightningCLI(WithSAM, Data, args=["fit", "--config", "config.yaml"], save_config_callback=None)
        print("SAM", cli.model.sam)
        print("METRICS", sorted(k for cb in cli.trainer.callbacks for k in getattr(cb, "last_metrics", {})))
        print("PL_IMPORTED", "pytorch_lightning" in sys.modules)
        """,
    )
    assert "SAM True" in out
    assert "'hessian/eigenvalue_2'" in out and "'sharpness/worst_case_l2'" in out
    assert "PL_IMPORTED False" in out


@pytest.mark.slow
def test_ddp_with_lightning(tmp_path):
    _run(
        tmp_path,
        """
        import os
        cb = HessianCallback(every_n_train_steps=2, top_k=2)
        trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                            callbacks=[cb], enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False)
        trainer.fit(WithSAM(sam=True), loaders()[0])
        rank = int(os.environ.get("LOCAL_RANK", 0))
        with open(f"rank{rank}.txt", "w") as f:  # the ranks share stdout: one file each
            f.write(f"RANK{rank} {cb.last_metrics['hessian/eigenvalue_1']:.10f} {'pytorch_lightning' in sys.modules}")
        """,
        timeout=240,
    )
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    values = [line.split()[1] for line in lines]
    assert values[0] == values[1] and all(line.endswith("False") for line in lines)
